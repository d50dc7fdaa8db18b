"""Split virtqueues as the device side sees them (virtio 1.2 section 2.7).

A `SplitVirtqueue` holds what the driver programmed through the transport (size, the
three ring addresses, enable, MSI-X vector) and the device's own progress
(`last_avail_idx`, `used_idx`). The transport serves a queue in *steps* (one event-loop
callback each): `SplitVirtqueue.rings` opens a `Rings` for one step, whose `pop` walks
descriptor chains, direct or indirect (section 2.7.5.3), into `DescriptorChain`s and
whose `push`/`publish` return them through the used ring.

How the device reads the rings (docs/performance.md has the measurements behind it):
each ring area (descriptor table, driver area, device area) is translated once per step
with `DmaView.map_sg`, as a device that fetches the whole area in one DMA burst would,
and the step then reads and writes it through that view of guest RAM; an indirect table
is one DMA read. No IOMMU command can run inside a step (commands run on the same
event loop), so a translation held for one step is exactly what an IOTLB hit would
give. An area that is not one contiguous piece of guest RAM (it crosses into another
page of a paging domain, or into memory only DMA messages reach) is accessed per field
through the `DmaView` instead, with the same results.

The used index is published once per step for every chain completed in it (section
2.7.8 lets the device batch), and the transport decides on one interrupt per batch.

`avail_idx` remembers the avail ring's idx as last read: every chain below it is
published (the driver writes ring entries before idx, section 2.7.13.3), so `pop` reads
idx again only when those are used up.

A ring that faults raises `DmaError`. A chain the driver built wrongly (an index out of
range, a loop, a chain longer than the queue, a readable descriptor after a writable
one, a nested or misflagged indirect table) raises `VirtqueueError`. The spec leaves the
device's answer to both open; the transport sets DEVICE_NEEDS_RESET, as QEMU does
(`virtio_error`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from ...memory import DmaView
from .layouts import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_ELEM,
)

VIRTIO_MSI_NO_VECTOR = 0xFFFF
DESC_SIZE = VIRTQ_DESC.size
USED_ELEM_SIZE = VIRTQ_USED_ELEM.size
_U16 = struct.Struct("<H")
_unpack_u16 = _U16.unpack_from
_unpack_desc = VIRTQ_DESC.unpack_from


class VirtqueueError(Exception):
    """The driver broke the virtqueue (section 2.7): the device needs a reset."""


class Buffer(NamedTuple):
    """One descriptor's buffer, in the device's DMA address space.

    Chains hold plain (addr, length) tuples; this names the fields for callers that
    build them.
    """

    addr: int
    length: int


class DescriptorChain:
    """The buffers of one available chain: device-readable ones, then writable ones,
    each an (addr, length) pair."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[tuple[int, int]] | None = None,
                 writable: list[tuple[int, int]] | None = None) -> None:
        self.head = head
        self.readable = [] if readable is None else readable
        self.writable = [] if writable is None else writable

    @property
    def readable_length(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(n for _, n in self.writable)

    def __repr__(self) -> str:
        return f"DescriptorChain({self.head}, {self.readable}, {self.writable})"


def pieces(buffers: Sequence[tuple[int, int]], start: int,
           length: int) -> Iterator[tuple[int, int]]:
    """The (addr, length) pieces of bytes [start, start+length) of the buffers' concatenation.

    Devices must not assume how a message is cut into descriptors (section 2.6.4), so
    they address a chain's bytes by offset and let this cut them.
    """
    for addr, size in buffers:
        if length <= 0:
            return
        if start >= size:
            start -= size
            continue
        n = min(size - start, length)
        yield addr + start, n
        length -= n
        start = 0


class SplitVirtqueue:
    """One split virtqueue: the driver's settings and the device's position in it."""

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= 32768 or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two <= 32768")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.enabled = False
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.last_avail_idx = 0
        self.avail_idx = 0
        self.used_idx = 0

    @property
    def known_pending(self) -> int:
        """The chains available as of the last read of avail.idx, not taken yet (no DMA)."""
        return (self.avail_idx - self.last_avail_idx) & 0xFFFF

    def rings(self, dma: DmaView, *, event_idx: bool) -> Rings:
        """Open the rings for one step (`event_idx`: VIRTIO_F_EVENT_IDX negotiated)."""
        return Rings(self, dma, event_idx)

    # -- one-off accessors (tests and tools) ------------------------------------------------
    def pending(self, dma: DmaView) -> int:
        """How many chains the driver has made available that we have not taken."""
        return self.rings(dma, event_idx=False).pending()

    def pop(self, dma: DmaView, *, indirect: bool) -> DescriptorChain | None:
        """Take the next available chain, or None; `indirect`: INDIRECT_DESC negotiated."""
        rings = self.rings(dma, event_idx=False)
        if not self.known_pending and not rings.pending():
            return None
        return rings.pop(indirect)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Section 2.7.10: has the used index passed `event` going from `old` to `new`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _area(dma: DmaView, addr: int, length: int, write: bool) -> memoryview | None:
    """One view of a whole ring area, or None when it is not one piece of guest RAM."""
    views = dma.map_sg(((addr, length),), write=write)
    return views[0] if views is not None and len(views) == 1 else None


class Rings:
    """One step's access to a queue's three ring areas (see the module docstring)."""

    def __init__(self, vq: SplitVirtqueue, dma: DmaView, event_idx: bool) -> None:
        self.vq = vq
        self.dma = dma
        self.event_idx = event_idx
        # Each area is mapped on its first use in the step (False: not yet).
        self._driver: memoryview | None | bool = False
        self._desc: memoryview | None | bool = False
        self._device: memoryview | None | bool = False
        self._pushed = False

    # -- the driver area ----------------------------------------------------------------------
    def _driver_view(self) -> memoryview | None:
        view = self._driver
        if view is False:
            # flags, idx, ring[size] (and used_event with EVENT_IDX), read by the device
            vq = self.vq
            view = self._driver = _area(self.dma, vq.driver, 4 + 2 * vq.size
                                        + 2 * self.event_idx, False)
        return view

    def _driver_u16(self, offset: int) -> int:
        view = self._driver if self._driver is not False else self._driver_view()
        if view is not None:
            return _unpack_u16(view, offset)[0]
        return self.dma.read_int(self.vq.driver + offset, 2)

    def pending(self) -> int:
        """Chains available and not taken; reads avail.idx and remembers it."""
        vq = self.vq
        avail_idx = self._driver_u16(2)
        count = (avail_idx - vq.last_avail_idx) & 0xFFFF
        if count > vq.size:
            raise VirtqueueError(f"queue {vq.index}: avail idx is {count} entries ahead")
        vq.avail_idx = avail_idx
        return count

    def pop(self, indirect: bool) -> DescriptorChain:
        """Take the next chain the last `pending` saw (the caller knows there is one)."""
        vq = self.vq
        size = vq.size
        head = self._driver_u16(4 + 2 * (vq.last_avail_idx % size))
        vq.last_avail_idx = (vq.last_avail_idx + 1) & 0xFFFF
        if head >= size:
            raise VirtqueueError(f"queue {vq.index}: head {head} out of range")
        if self._desc is False:
            self._desc = _area(self.dma, vq.desc, DESC_SIZE * size, False)
        return self._walk(head, indirect, self._desc)

    def _walk(self, head: int, indirect: bool, table: memoryview | bytes | None
              ) -> DescriptorChain:
        """Section 2.7.5.3: the chain from `head`, through at most one indirect table.

        `table` holds the descriptor table (None: read each descriptor by DMA). The
        budget is how many more descriptors the whole chain may have (the queue size,
        section 2.7.5.3.1); it bounds every loop a driver can build.
        """
        count = budget = self.vq.size
        index, nested = head, False
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        unpack = _unpack_desc
        while True:
            if budget <= 0:
                raise VirtqueueError(f"chain from {head} longer than the queue")
            budget -= 1
            if table is not None:
                addr, length, flags, nxt = unpack(table, DESC_SIZE * index)
            else:
                addr, length, flags, nxt = VIRTQ_DESC.unpack(
                    self.dma.read(self.vq.desc + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not indirect or nested:
                    raise VirtqueueError("indirect descriptor not negotiated or nested")
                if flags & VIRTQ_DESC_F_NEXT or length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(
                        f"indirect descriptor with flags {flags:#x}, len {length:#x}")
                count = length // DESC_SIZE
                if count > budget + 1:
                    raise VirtqueueError(
                        f"indirect table of {count} entries longer than the queue")
                table = self.dma.read(addr, length)  # the whole table in one DMA read
                index, nested, budget = 0, True, budget + 1
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(f"chain from {head}: readable descriptor after a writable")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable)
            if nxt >= count:
                raise VirtqueueError(f"chain from {head}: next {nxt} out of range")
            index = nxt

    def used_event(self) -> int:
        return self._driver_u16(4 + 2 * self.vq.size)

    def no_interrupt(self) -> bool:
        return bool(self._driver_u16(0) & VIRTQ_AVAIL_F_NO_INTERRUPT)

    # -- the device area ------------------------------------------------------------------------
    def _device_area(self) -> memoryview | None:
        if self._device is False:
            size = self.vq.size
            self._device = _area(self.dma, self.vq.device,
                                 4 + USED_ELEM_SIZE * size + 2 * self.event_idx, True)
        return self._device

    def push(self, head: int, written: int) -> None:
        """Put chain `head` in the used ring with `written` bytes; `publish` makes it
        visible to the driver."""
        vq = self.vq
        offset = 4 + USED_ELEM_SIZE * (vq.used_idx % vq.size)
        view = self._device_area()
        if view is not None:
            VIRTQ_USED_ELEM.pack_into(view, offset, head, written)
        else:
            self.dma.write(vq.device + offset, VIRTQ_USED_ELEM.pack(head, written))
        vq.used_idx = (vq.used_idx + 1) & 0xFFFF
        self._pushed = True

    def publish(self) -> None:
        """Write used.idx once for everything pushed in this step (after the elements)."""
        if self._pushed:
            self._device_u16(2, self.vq.used_idx)
            self._pushed = False

    def set_avail_event(self) -> None:
        """Ask to be notified when the driver passes what we have taken (EVENT_IDX)."""
        self._device_u16(4 + USED_ELEM_SIZE * self.vq.size, self.vq.last_avail_idx)

    def _device_u16(self, offset: int, value: int) -> None:
        view = self._device_area()
        if view is not None:
            _U16.pack_into(view, offset, value)
        else:
            self.dma.write(self.vq.device + offset, _U16.pack(value))

    def needs_interrupt(self, old_used_idx: int) -> bool:
        """Whether used entries [old_used_idx, used_idx) deserve a notification (2.7.7)."""
        new = self.vq.used_idx
        if old_used_idx == new:
            return False
        if self.event_idx:
            return vring_need_event(self.used_event(), new, old_used_idx)
        return not self.no_interrupt()

