"""Split virtqueues as the device side sees them (virtio 1.2 section 2.7).

A `SplitVirtqueue` holds what the driver programmed through the transport (size, the
three ring addresses, enable, MSI-X vector) and the device's own progress
(`last_avail_idx`, `used_idx`). `pop` walks one descriptor chain, direct or indirect
(section 2.7.5.3), into a `DescriptorChain`; `push` returns it through the used ring.

`avail_idx` remembers the avail ring's idx as last read (`pending`): every chain below
it is published (the driver writes ring entries before idx, section 2.7.13.3), so
`pop` takes those without another translated read and reads idx again only when they
are used up.

Every access goes through the function's `DmaView`, so a faulting ring raises
`DmaError`. A chain the driver built wrongly (an index out of range, a loop, a chain
longer than the queue, a readable descriptor after a writable one, a nested or
misflagged indirect table) raises `VirtqueueError`. The spec leaves the device's answer
to both open; the transport sets DEVICE_NEEDS_RESET, as QEMU does (`virtio_error`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

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


class VirtqueueError(Exception):
    """The driver broke the virtqueue (section 2.7): the device needs a reset."""


@dataclass(frozen=True)
class Buffer:
    """One descriptor's buffer, in the device's DMA address space."""

    addr: int
    length: int


@dataclass
class DescriptorChain:
    """The buffers of one available chain: device-readable ones, then writable ones."""

    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def readable_length(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(b.length for b in self.writable)


def pieces(buffers: list[Buffer], start: int, length: int) -> Iterator[tuple[int, int]]:
    """The (addr, length) pieces of bytes [start, start+length) of the buffers' concatenation.

    Devices must not assume how a message is cut into descriptors (section 2.6.4), so
    they address a chain's bytes by offset and let this cut them.
    """
    for buf in buffers:
        if length <= 0:
            return
        if start >= buf.length:
            start -= buf.length
            continue
        n = min(buf.length - start, length)
        yield buf.addr + start, n
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

    # -- ring addresses (section 2.7) --------------------------------------------------------
    def _avail_idx_addr(self) -> int:
        return self.driver + 2

    def _avail_ring_addr(self, slot: int) -> int:
        return self.driver + 4 + 2 * slot

    def _used_event_addr(self) -> int:
        return self.driver + 4 + 2 * self.size

    def _used_elem_addr(self, slot: int) -> int:
        return self.device + 4 + USED_ELEM_SIZE * slot

    def _avail_event_addr(self) -> int:
        return self.device + 4 + USED_ELEM_SIZE * self.size

    # -- the driver's side, read ----------------------------------------------------------------
    def pending(self, dma: DmaView) -> int:
        """How many chains the driver has made available that we have not taken.

        Reads avail.idx and remembers it in `avail_idx`.
        """
        avail_idx = dma.read_int(self._avail_idx_addr(), 2)
        count = (avail_idx - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            raise VirtqueueError(f"queue {self.index}: avail idx is {count} entries ahead")
        self.avail_idx = avail_idx
        return count

    @property
    def known_pending(self) -> int:
        """The chains available as of the last read of avail.idx, not taken yet (no DMA)."""
        return (self.avail_idx - self.last_avail_idx) & 0xFFFF

    def pop(self, dma: DmaView, *, indirect: bool) -> DescriptorChain | None:
        """Take the next available chain, or None; `indirect`: INDIRECT_DESC negotiated.

        avail.idx is read only when the chains known from its last read are used up.
        """
        if not self.known_pending and not self.pending(dma):
            return None
        slot = self.last_avail_idx % self.size
        head = dma.read_int(self._avail_ring_addr(slot), 2)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: head {head} out of range")
        chain = DescriptorChain(head)
        _walk(dma, self.desc, self.size, head, chain, self.size, indirect=indirect)
        return chain

    def set_avail_event(self, dma: DmaView) -> None:
        """Ask to be notified when the driver passes what we have taken (EVENT_IDX)."""
        dma.write_int(self._avail_event_addr(), 2, self.last_avail_idx)

    # -- the device's side, written ------------------------------------------------------------
    def push(self, dma: DmaView, head: int, written: int) -> None:
        """Return chain `head` with `written` bytes written into its writable buffers."""
        slot = self.used_idx % self.size
        dma.write(self._used_elem_addr(slot), VIRTQ_USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        dma.write_int(self.device + 2, 2, self.used_idx)

    def push_batch(self, dma: DmaView, used: list[tuple[int, int]]) -> None:
        """Return several chains (head, written), publishing them with one used.idx
        write after all their elements: a frame spread over several chains
        (virtio-net's MRG_RXBUF) must never be seen in part: the driver takes every
        element below used.idx (section 2.7.8)."""
        for head, written in used:
            slot = self.used_idx % self.size
            dma.write(self._used_elem_addr(slot), VIRTQ_USED_ELEM.pack(head, written))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
        dma.write_int(self.device + 2, 2, self.used_idx)

    def needs_interrupt(self, dma: DmaView, old_used_idx: int, *, event_idx: bool) -> bool:
        """Whether used entries [old_used_idx, used_idx) deserve a notification (2.7.7)."""
        if old_used_idx == self.used_idx:
            return False
        if event_idx:
            used_event = dma.read_int(self._used_event_addr(), 2)
            return vring_need_event(used_event, self.used_idx, old_used_idx)
        return not dma.read_int(self.driver, 2) & VIRTQ_AVAIL_F_NO_INTERRUPT


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Section 2.7.10: has the used index passed `event` going from `old` to `new`?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _read_desc(dma: DmaView, table: int, index: int) -> tuple[int, int, int, int]:
    return VIRTQ_DESC.unpack(dma.read(table + DESC_SIZE * index, DESC_SIZE))


def _walk(dma: DmaView, table: int, count: int, index: int, chain: DescriptorChain,
          budget: int, *, indirect: bool, nested: bool = False) -> int:
    """Append the chain starting at `index` of a `count`-entry table; the budget left.

    `budget` is how many more descriptors the whole chain may have (the queue size,
    section 2.7.5.3.1); it bounds every loop a driver can build.
    """
    while True:
        if budget <= 0:
            raise VirtqueueError(f"chain from {chain.head} longer than the queue")
        budget -= 1
        addr, length, flags, nxt = _read_desc(dma, table, index)
        if flags & VIRTQ_DESC_F_INDIRECT:
            budget = _indirect(dma, addr, length, flags, chain, budget, indirect, nested)
        else:
            _append(chain, Buffer(addr, length), flags & VIRTQ_DESC_F_WRITE)
        if not flags & VIRTQ_DESC_F_NEXT:
            return budget
        if nxt >= count:
            raise VirtqueueError(f"chain from {chain.head}: next {nxt} out of range")
        index = nxt


def _indirect(dma: DmaView, addr: int, length: int, flags: int, chain: DescriptorChain,
              budget: int, allowed: bool, nested: bool) -> int:
    if not allowed or nested:
        raise VirtqueueError("indirect descriptor not negotiated or nested")
    if flags & VIRTQ_DESC_F_NEXT or length == 0 or length % DESC_SIZE:
        raise VirtqueueError(f"indirect descriptor with flags {flags:#x}, len {length:#x}")
    entries = length // DESC_SIZE
    if entries > budget + 1:
        raise VirtqueueError(f"indirect table of {entries} entries longer than the queue")
    return _walk(dma, addr, entries, 0, chain, budget + 1, indirect=True, nested=True)


def _append(chain: DescriptorChain, buf: Buffer, writable: int) -> None:
    if writable:
        chain.writable.append(buf)
    elif chain.writable:
        raise VirtqueueError(f"chain from {chain.head}: readable descriptor after a writable")
    else:
        chain.readable.append(buf)

