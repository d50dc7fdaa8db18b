"""What a virtio device type is, independent of its transport (virtio 1.2 sections 2, 5).

A `VirtioDevice` says its device ID, the features it offers, its queues and its
device-specific configuration, and serves one descriptor chain at a time. It never
sees the PCI transport; a test drives it with a chain and a `DmaView`.

Most devices complete a chain as soon as they are handed it. A device whose work
arrives from elsewhere (virtio-net's receive queue waits for packets) or finishes
elsewhere (virtio-blk's disk I/O in a worker thread) keeps the chain instead (`handle`
returns None) and completes it later through its `DeviceContext`, which also lets it
watch a file descriptor from the server's event loop and run a callback on the loop
from another thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from ...memory import DmaView
from .virtqueue import DescriptorChain

# Reserved feature bits (section 6)
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

# What every device of ours offers besides its own features: modern only, DMA through
# the platform's IOMMU, indirect descriptors and event index.
TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
                      | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX)


class DeviceContext(Protocol):
    """What the transport offers a device beyond `handle` (VirtioPciFunction is one)."""

    dma: DmaView

    def complete(self, queue: int, used: list[tuple[int, int]]) -> bool:
        """Return kept chains (head, bytes written) to `queue`'s used ring, notifying the
        driver as the ring asks; False if the device may not complete anything now (not
        running, or the ring just broke): the device should drop what it keeps."""

    def complete_soon(self, queue: int, head: int, written: int) -> None:
        """On the loop: return a kept chain, published together with every other one
        completed before the loop comes back to the transport (one used-index write and
        at most one notification for the batch). Dropped if the device stopped."""

    def watch(self, fd: int, callback: Callable[[], None] | None) -> None:
        """Call `callback` from the event loop whenever `fd` is readable; None stops."""

    def call_soon(self, callback: Callable[[], None]) -> None:
        """From any thread: run `callback` on the event loop, after the current work."""

    def queue_size(self, queue: int) -> int:
        """The size the driver gave `queue` (chains it can hold at once)."""

    def needs_reset(self, why: str) -> None:
        """On the loop: the device cannot go on until the driver resets it."""


class DetachedContext:
    """The context of a device no transport serves: nothing completes, nothing is
    watched, nothing is called back."""

    dma: DmaView | None = None

    def complete(self, queue: int, used: list[tuple[int, int]]) -> bool:
        return False

    def complete_soon(self, queue: int, head: int, written: int) -> None:
        pass

    def watch(self, fd: int, callback: Callable[[], None] | None) -> None:
        pass

    def call_soon(self, callback: Callable[[], None]) -> None:
        pass

    def queue_size(self, queue: int) -> int:
        return 0

    def needs_reset(self, why: str) -> None:
        pass


class DeviceNeedsReset(Exception):
    """The device cannot go on until the driver resets it (DEVICE_NEEDS_RESET)."""


class VirtioDevice(ABC):
    """Base of a device type; subclasses set the class attributes and `handle`."""

    device_id: int = 0
    class_code: int = 0xFF0000
    num_queues: int = 1
    queue_max_size: int = 128
    name: str = "virtio"

    def __init__(self) -> None:
        self.driver_features = 0
        self.context: DeviceContext = DetachedContext()

    def bind(self, context: DeviceContext) -> None:
        """Called by the transport that serves this device."""
        self.context = context

    def device_features(self) -> int:
        """The device-type feature bits offered (bits 0-23); transport bits are added."""
        return 0

    def config(self) -> bytes:
        """The device-specific configuration structure, as the driver reads it."""
        return b""

    def features_ok(self, features: int) -> bool:
        """Whether the device can work with the driver's `features` (section 3.1.1)."""
        return True

    def activate(self, features: int) -> None:
        """The driver accepted `features` (FEATURES_OK is now set)."""
        self.driver_features = features

    def reset(self) -> None:
        """Device reset; a device with work in flight finishes it first (`quiesce`)."""
        self.driver_features = 0

    def quiesce(self) -> None:
        """Wait until no work of ours runs in the background (chains it completes have
        then been handed to `context.call_soon`)."""
        return None

    def close(self) -> None:
        """Release what the device holds (files, threads)."""
        return None

    @abstractmethod
    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int | None:
        """Serve one chain from `queue`; bytes written into its writable buffers, or None
        when the device keeps the chain to complete it later (`DeviceContext.complete`).

        A data buffer that faults is the device's to report (in its status, if it has
        one); `DeviceNeedsReset` when it cannot complete the chain at all.
        """
