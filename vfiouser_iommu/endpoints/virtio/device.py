"""What a virtio device type is, independent of its transport (virtio 1.2 sections 2, 5).

A `VirtioDevice` says its device ID, the features it offers, its queues and its
device-specific configuration, and serves one descriptor chain at a time. It never
sees the PCI transport; a test drives it with a chain and a `DmaView`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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
        self.driver_features = 0

    @abstractmethod
    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int:
        """Serve one chain from `queue`; bytes written into its writable buffers.

        A data buffer that faults is the device's to report (in its status, if it has
        one); `DeviceNeedsReset` when it cannot complete the chain at all.
        """
