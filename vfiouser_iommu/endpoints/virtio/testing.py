"""The driver's side of a virtio-pci function, for tests and tools (virtio 1.2 4.1, 2.7).

`FakeHost` is a `FunctionHost` double that records interrupts and runs deferred work
when asked. `VirtioPciDriver` programs a `VirtioPciFunction` through its BAR and config
space as Linux's virtio_pci_modern driver does, builds split rings in a `GuestMemory`,
and reads the used rings back. Nothing here is used by the server.
"""

from __future__ import annotations

import select
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ...memory import GuestMemory
from ...pci.config import MSIX_CONTROL_ENABLE, CapId
from .layouts import VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from .pci import (
    ACKNOWLEDGE,
    BAR_STRUCTURES,
    CC,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    NOTIFY_CFG,
    NOTIFY_OFF_MULTIPLIER,
    VirtioPciFunction,
)

RING_AREA = 0x4000  # bytes of guest memory per queue: descriptors, avail, used


class FakeHost:
    """Records every interrupt; `run` executes what the function deferred and, like the
    server's loop, calls the callbacks of watched file descriptors that are readable;
    it also waits for the background work of the devices it `waits_for` (their worker
    threads)."""

    def __init__(self) -> None:
        self.irqs: list[tuple[int, int]] = []
        self.soon: deque[Callable[[], None]] = deque()
        self.watched: dict[int, Callable[[], None]] = {}
        self._quiesce: list[Callable[[], None]] = []

    def trigger(self, irq_index: int, vector: int) -> bool:
        self.irqs.append((irq_index, vector))
        return True

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)  # deque.append is atomic: worker threads may call it

    def wait_for(self, quiesce: Callable[[], None]) -> None:
        """`run` waits on `quiesce()` before it decides nothing is left to run."""
        if quiesce not in self._quiesce:
            self._quiesce.append(quiesce)

    def watch_fd(self, fd: int, callback: Callable[[], None] | None) -> None:
        if callback is None:
            self.watched.pop(fd, None)
        else:
            self.watched[fd] = callback

    def readable(self) -> list[int]:
        """The watched file descriptors that are readable now."""
        if not self.watched:
            return []
        return select.select(list(self.watched), [], [], 0)[0]

    def run(self, limit: int = 10_000) -> int:
        """Run deferred callbacks, readable fds' callbacks and what background work
        hands back until none is left (or `limit` calls); how many ran."""
        ran = 0
        while ran < limit:
            if not self.soon:
                for quiesce in self._quiesce:
                    quiesce()
            if self.soon:
                self.soon.popleft()()
            else:
                ready = self.readable()
                if not ready:
                    break
                self.watched[ready[0]]()
            ran += 1
        return ran


@dataclass
class QueueLayout:
    desc: int
    avail: int
    used: int
    size: int
    next_free: int = 0
    avail_idx: int = 0


class VirtioPciDriver:
    """Drives one function; guest memory `mem` holds the rings from `base` on."""

    def __init__(self, function: VirtioPciFunction, mem: GuestMemory, base: int) -> None:
        self.fn = function
        self.mem = mem
        self.base = base
        self.queues: dict[int, QueueLayout] = {}
        if isinstance(getattr(function, "host", None), FakeHost):
            function.host.wait_for(function.device.quiesce)

    # -- registers ---------------------------------------------------------------------------
    def read(self, field: str, size: int) -> int:
        raw = self.fn.region_read(BAR_STRUCTURES, CC[field], size)
        return int.from_bytes(raw, "little")

    def write(self, field: str, size: int, value: int) -> None:
        self.fn.region_write(BAR_STRUCTURES, CC[field], value.to_bytes(size, "little"))

    def device_features(self) -> int:
        features = 0
        for sel in (0, 1):
            self.write("device_feature_select", 4, sel)
            features |= self.read("device_feature", 4) << (32 * sel)
        return features

    def set_status(self, value: int) -> None:
        self.write("device_status", 1, value)

    @property
    def status(self) -> int:
        return self.read("device_status", 1)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, then ACKNOWLEDGE, DRIVER, features, FEATURES_OK; whether it stuck."""
        self.set_status(0)
        self.set_status(ACKNOWLEDGE)
        self.set_status(ACKNOWLEDGE | DRIVER)
        features = self.device_features() if features is None else features
        for sel in (0, 1):
            self.write("driver_feature_select", 4, sel)
            self.write("driver_feature", 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        return bool(self.status & FEATURES_OK)

    def enable_msix(self) -> None:
        off = self.fn.config.capabilities[CapId.MSIX] + 2
        control = self.fn.config.read_int(off, 2) | MSIX_CONTROL_ENABLE
        self.fn.region_write(7, off, control.to_bytes(2, "little"))

    def setup_queue(self, index: int, size: int | None = None, vector: int | None = None) -> int:
        """Program queue `index` (rings zeroed); the vector the device read back."""
        self.write("queue_select", 2, index)
        size = size or self.read("queue_size", 2)
        self.write("queue_size", 2, size)
        area = self.base + RING_AREA * index
        layout = QueueLayout(area, area + 16 * size, (area + 16 * size + 6 + 2 * size + 3) & ~3,
                             size)
        self.mem.write(area, bytes(RING_AREA))
        for name, addr in (("queue_desc", layout.desc), ("queue_driver", layout.avail),
                           ("queue_device", layout.used)):
            self.write(name, 8, addr)
        if vector is not None:
            self.write("queue_msix_vector", 2, vector)
        self.write("queue_enable", 2, 1)
        self.queues[index] = layout
        return self.read("queue_msix_vector", 2)

    def driver_ok(self) -> None:
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    # -- rings --------------------------------------------------------------------------------
    def write_desc(self, index: int, slot: int, addr: int, length: int, flags: int,
                   nxt: int = 0) -> None:
        q = self.queues[index]
        self.mem.write(q.desc + 16 * slot, VIRTQ_DESC.pack(addr, length, flags, nxt))

    def add_chain(self, index: int, buffers: list[tuple[int, int, bool]],
                  *, indirect_at: int | None = None) -> int:
        """Put a chain of (addr, len, writable) buffers on the queue; its head.

        With `indirect_at`, the buffers go into an indirect table at that address.
        """
        q = self.queues[index]
        if indirect_at is not None:
            for i, (addr, length, writable) in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | \
                    (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.mem.write(indirect_at + 16 * i, VIRTQ_DESC.pack(addr, length, flags, i + 1))
            head = q.next_free % q.size
            q.next_free += 1
            self.write_desc(index, head, indirect_at, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT)
            return self.make_available(index, head)
        slots = [(q.next_free + i) % q.size for i in range(len(buffers))]
        q.next_free += len(buffers)
        for i, (addr, length, writable) in enumerate(buffers):
            more = i + 1 < len(buffers)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if more else 0)
            self.write_desc(index, slots[i], addr, length, flags, slots[i + 1] if more else 0)
        return self.make_available(index, slots[0])

    def make_available(self, index: int, head: int) -> int:
        q = self.queues[index]
        self.mem.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(q.avail + 2, q.avail_idx)
        return head

    def notify(self, index: int) -> None:
        self.fn.region_write(BAR_STRUCTURES, NOTIFY_CFG + NOTIFY_OFF_MULTIPLIER * index,
                             index.to_bytes(2, "little"))

    def used_idx(self, index: int) -> int:
        return self.mem.read_u16(self.queues[index].used + 2)

    def used(self, index: int) -> list[tuple[int, int]]:
        """Every used element so far, (id, len), oldest first (no wrap-around)."""
        q = self.queues[index]
        return [(self.mem.read_u32(q.used + 4 + 8 * i), self.mem.read_u32(q.used + 8 + 8 * i))
                for i in range(min(self.used_idx(index), q.size))]
