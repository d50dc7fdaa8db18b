"""Guest memory as the server sees it, and the DMA view an endpoint uses.

`GuestMemory` is the set of guest-physical regions that the VMM has handed us (over
vfio-user, DMA_MAP regions backed by mmapped file descriptors; in tests, plain
bytearrays). Every access is bounds-checked against those regions: nothing outside
them is ever touched. An access that falls outside every region either goes to a
fallback (the vfio-user layer installs one that turns writes into DMA_WRITE messages,
for interrupt-controller doorbells that are not RAM) or raises `MemoryAccessError`.

Ranges can be *poisoned* (`poison`/`unpoison`), modelling memory whose reads return
corrupted data (an uncorrectable ECC error, "poisoned data" in the RISC-V IOMMU spec):
reading any byte of a poisoned range raises `MemoryPoisonError`, a `MemoryAccessError`,
so code that does not ask treats it as an access error. Poison affects reads only: a
write goes through and leaves the poison in place (only `unpoison` removes it), which
keeps an injected error where the test put it. Poison is kept by guest-physical
address, independently of which regions are mapped.

`compare_exchange` is a host atomic compare-and-swap on the mapped buffer (GCC's
libatomic through ctypes), because the guest's vCPUs (QEMU MTTCG threads) update the
same page tables concurrently: the IOMMU's A/D updates must not overwrite a PTE that
software changed between our read and our write. Without libatomic it degrades to a
read-compare-write, atomic only with respect to this process (logged once).

`GuestMemory` tells its listeners (`add_listener`) whenever its regions or poisoned
ranges change: the C translation fast path keeps a copy of the region table and must
drop its pointers into a region before the region's mmap is closed.

`DmaView` is what a device model gets for its DMA: identity here; the IOMMU provides a
translating subclass (`RiscvIommu.dma_view`). Endpoints never know which one they have.
Every DMA access says what it is (read, write) so the translating view can check
permissions.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

_LE = {n: struct.Struct("<" + c) for n, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}
_BE = {n: struct.Struct(">" + c) for n, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}

log = logging.getLogger(__name__)

_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _load_atomics() -> dict[int, tuple[object, type]]:
    """libatomic's `__atomic_compare_exchange_N` for N = 1, 2, 4, 8, by size."""
    name = ctypes.util.find_library("atomic")
    if name is None:
        return {}
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return {}
    atomics = {}
    for size, ctype in ((1, ctypes.c_uint8), (2, ctypes.c_uint16), (4, ctypes.c_uint32),
                        (8, ctypes.c_uint64)):
        fn = getattr(lib, f"__atomic_compare_exchange_{size}", None)
        if fn is None:
            continue
        fn.restype = ctypes.c_bool
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctype, ctypes.c_int, ctypes.c_int]
        atomics[size] = (fn, ctype)
    return atomics


_ATOMICS = _load_atomics()
_warned_not_atomic = False


def atomic_compare_exchange_available(size: int = 8) -> bool:
    """Whether `GuestMemory.compare_exchange` of `size` bytes is a host atomic."""
    return size in _ATOMICS


def _swap(value: int, size: int) -> int:
    return int.from_bytes(value.to_bytes(size, "big"), "little")


class MemoryAccessError(Exception):
    """An access touched guest-physical addresses outside every mapped region."""

    def __init__(self, gpa: int, length: int, why: str = "not mapped"):
        super().__init__(f"guest memory access at {gpa:#x}+{length:#x}: {why}")
        self.gpa = gpa
        self.length = length
        self.why = why


class MemoryPoisonError(MemoryAccessError):
    """A read touched a poisoned range: the memory returned corrupted data."""

    def __init__(self, gpa: int, length: int):
        super().__init__(gpa, length, "poisoned data")


class Fallback(Protocol):
    """Where accesses outside the mapped regions go (e.g. vfio-user DMA messages)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass
class Region:
    """One contiguous guest-physical range backed by a buffer we can address."""

    gpa: int
    size: int
    buffer: memoryview
    writable: bool = True
    owner: object = field(default=None, repr=False)  # keeps an mmap alive; closed on removal

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Bounds-checked access to the guest-physical regions mapped for DMA."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self.fallback: Fallback | None = None
        # Poisoned [start, end) ranges, sorted and disjoint; empty (falsy) almost always,
        # so the read paths pay one truth test.
        self._poison: list[tuple[int, int]] = []
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every change of the regions or of the poison."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # -- construction -------------------------------------------------------------
    @classmethod
    def ram(cls, base: int, size: int) -> "GuestMemory":
        """Zero-filled RAM at `base`, for tests and tools."""
        mem = cls()
        mem.add_region(base, memoryview(bytearray(size)))
        return mem

    def add_region(self, gpa: int, buffer: memoryview | bytearray, *, writable: bool = True,
                   owner: object = None) -> Region:
        """Map `buffer` at `gpa`. Overlapping an existing region is a caller bug."""
        view = memoryview(buffer).cast("B")
        size = len(view)
        if size == 0 or gpa < 0 or gpa + size > 1 << 64:
            raise ValueError(f"bad region {gpa:#x}+{size:#x}")
        if self.overlapping(gpa, size):
            raise ValueError(f"region {gpa:#x}+{size:#x} overlaps an existing one")
        region = Region(gpa, size, view, writable and not view.readonly, owner)
        i = bisect.bisect_left(self._starts, gpa)
        self._starts.insert(i, gpa)
        self._regions.insert(i, region)
        self._changed()
        return region

    def remove_region(self, gpa: int, size: int) -> Region:
        """Unmap the region that is exactly `gpa`+`size`; KeyError if there is none."""
        i = bisect.bisect_left(self._starts, gpa)
        if i < len(self._regions) and self._regions[i].gpa == gpa and self._regions[i].size == size:
            del self._starts[i]
            region = self._regions.pop(i)
            self._changed()
            return region
        raise KeyError(f"no region {gpa:#x}+{size:#x}")

    def overlapping(self, gpa: int, size: int) -> list[Region]:
        """The regions [gpa, gpa+size) overlaps, in order: regions are sorted and
        disjoint, so they are a run that starts at the one holding or following `gpa`."""
        end = gpa + size
        regions = self._regions
        i = max(bisect.bisect_right(self._starts, gpa) - 1, 0)
        found = []
        while i < len(regions) and regions[i].gpa < end:
            if gpa < regions[i].end:
                found.append(regions[i])
            i += 1
        return found

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def clear(self) -> list[Region]:
        gone, self._regions, self._starts = self._regions, [], []
        self._changed()
        return gone

    # -- poison ----------------------------------------------------------------------
    def poison(self, gpa: int, length: int) -> None:
        """Make reads of [gpa, gpa+length) fail with `MemoryPoisonError`."""
        if length <= 0 or gpa < 0:
            raise ValueError(f"bad poison range {gpa:#x}+{length:#x}")
        start, end = gpa, gpa + length
        kept = []
        for s, e in self._poison:
            if e < start or end < s:
                kept.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        kept.append((start, end))
        self._poison = sorted(kept)
        self._changed()

    def unpoison(self, gpa: int, length: int) -> None:
        """Remove the poison from [gpa, gpa+length) (what is outside stays poisoned)."""
        end = gpa + length
        kept = []
        for s, e in self._poison:
            if s < gpa:
                kept.append((s, min(e, gpa)))
            if e > end:
                kept.append((max(s, end), e))
        self._poison = kept
        self._changed()

    def poisoned(self, gpa: int, length: int = 1) -> bool:
        """Whether any byte of [gpa, gpa+length) is poisoned."""
        ranges = self._poison
        if length <= 0 or not ranges:
            return False
        i = bisect.bisect_right(ranges, (gpa + length - 1, 1 << 65)) - 1
        return i >= 0 and ranges[i][1] > gpa

    @property
    def poisoned_ranges(self) -> tuple[tuple[int, int], ...]:
        """The poisoned (gpa, length) ranges, sorted."""
        return tuple((s, e - s) for s, e in self._poison)

    def _check_poison(self, gpa: int, length: int) -> None:
        if self.poisoned(gpa, length):
            raise MemoryPoisonError(gpa, length)

    # -- lookup ---------------------------------------------------------------------
    def _find(self, gpa: int, length: int) -> Region | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return None
        r = self._regions[i]
        if gpa + length <= r.end:
            return r
        return None

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self._find(gpa, length) is not None

    def slice(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        """A zero-copy view of guest memory; the range must lie inside one region.

        A read-only view of a poisoned range raises `MemoryPoisonError`; a writable view
        (taken to write into) does not, since poison affects reads only.
        """
        if self._poison and not writable:
            self._check_poison(gpa, length)
        r = self._find(gpa, length)
        if r is None or length < 0:
            raise MemoryAccessError(gpa, length)
        if writable and not r.writable:
            raise MemoryAccessError(gpa, length, "region is read-only")
        off = gpa - r.gpa
        return r.buffer[off:off + length]

    # -- bytes ------------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        if self._poison:
            self._check_poison(gpa, length)
        r = self._find(gpa, length)
        if r is not None:
            off = gpa - r.gpa
            return bytes(r.buffer[off:off + length])
        if self.fallback is not None and not self.overlapping(gpa, length):
            return self.fallback.read(gpa, length)
        raise MemoryAccessError(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        r = self._find(gpa, length)
        if r is not None:
            if not r.writable:
                raise MemoryAccessError(gpa, length, "region is read-only")
            off = gpa - r.gpa
            r.buffer[off:off + length] = data
            return
        if self.fallback is not None and not self.overlapping(gpa, length):
            self.fallback.write(gpa, bytes(data))
            return
        raise MemoryAccessError(gpa, length)

    # -- integers ---------------------------------------------------------------------
    def read_int(self, gpa: int, size: int, *, big_endian: bool = False) -> int:
        if self._poison:
            self._check_poison(gpa, size)
        codec = (_BE if big_endian else _LE)[size]
        r = self._find(gpa, size)
        if r is not None:
            return codec.unpack_from(r.buffer, gpa - r.gpa)[0]
        return codec.unpack(self.read(gpa, size))[0]

    def write_int(self, gpa: int, size: int, value: int, *, big_endian: bool = False) -> None:
        self.write(gpa, (_BE if big_endian else _LE)[size].pack(value & ((1 << (8 * size)) - 1)))

    def read_u8(self, gpa: int) -> int:
        return self.read_int(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u8(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 1, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 8, value)

    def compare_exchange(self, gpa: int, size: int, expected: int, new: int, *,
                         big_endian: bool = False) -> int:
        """Write `new` if the value is `expected`; return the value found.

        On a writable region this is one sequentially consistent host compare-and-swap
        (libatomic), atomic with respect to every thread and process sharing the
        memory. The word must be naturally aligned in host memory (PTEs are), else
        `MemoryAccessError`. Read-only regions, addresses served by the fallback and
        hosts without libatomic get a read-compare-write, atomic only with respect to
        this process. A poisoned word raises `MemoryPoisonError` (the read half).
        """
        if self._poison:
            self._check_poison(gpa, size)
        r = self._find(gpa, size)
        atomic = _ATOMICS.get(size)
        if r is None or not r.writable or atomic is None:
            return self._compare_exchange_python(gpa, size, expected, new, big_endian)
        address = ctypes.addressof(ctypes.c_char.from_buffer(r.buffer, gpa - r.gpa))
        if address % size:
            raise MemoryAccessError(gpa, size, "misaligned atomic")
        mask = (1 << (8 * size)) - 1
        expected, new = expected & mask, new & mask
        if big_endian != (sys.byteorder == "big"):
            expected, new = _swap(expected, size), _swap(new, size)
        fn, ctype = atomic
        found = ctype(expected)
        fn(address, ctypes.byref(found), new, _SEQ_CST, _SEQ_CST)
        old = found.value
        return _swap(old, size) if big_endian != (sys.byteorder == "big") else old

    def _compare_exchange_python(self, gpa: int, size: int, expected: int, new: int,
                                 big_endian: bool) -> int:
        global _warned_not_atomic
        if size not in _ATOMICS and not _warned_not_atomic:
            _warned_not_atomic = True
            log.warning("no libatomic: A/D updates are not atomic against the guest's CPUs")
        old = self.read_int(gpa, size, big_endian=big_endian)
        if old == expected:
            self.write_int(gpa, size, new, big_endian=big_endian)
        return old


@dataclass(frozen=True)
class DmaAttrs:
    """What a DMA request carries besides its address (PCIe TLP attributes).

    `pasid` is None when the request has no PASID prefix; `privileged` and `execute` are
    the PASID prefix's PMR and ER bits. The identity view ignores them; a translating
    view checks them (RISC-V IOMMU spec 1.0.1, section 2.3).
    """

    pasid: int | None = None
    privileged: bool = False
    execute: bool = False


NO_ATTRS = DmaAttrs()


class DmaError(Exception):
    """A device's DMA could not be performed (unmapped, or the IOMMU faulted it).

    `fault` carries the IOMMU's fault record when translation failed.
    """

    def __init__(self, addr: int, length: int, write: bool, why: str, fault: object = None):
        kind = "write" if write else "read"
        super().__init__(f"DMA {kind} at {addr:#x}+{length:#x}: {why}")
        self.addr = addr
        self.length = length
        self.write = write
        self.why = why
        self.fault = fault


class SpecialPiece(Protocol):
    """A translated piece of a DMA that is not plain memory (e.g. an MRIF page)."""

    def read(self, length: int) -> bytes: ...

    def write(self, data: memoryview, addr: int, length: int) -> None:
        """Serve the write of `data`; on failure raise `DmaError` for `addr`+`length`."""


class DmaView:
    """The memory a device sees through its DMA: identity (no IOMMU) here.

    Subclasses override `pieces` to translate; the read and write loops are shared.
    Plain `read`/`write` carry the view's own `attrs`; the `*_as` forms take the
    request's.
    """

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.attrs = NO_ATTRS

    def pieces(self, addr: int, length: int, write: bool,
               attrs: DmaAttrs) -> Sequence[tuple[int, int, SpecialPiece | None]]:
        """Translate [addr, addr+length) into (gpa, length, special) pieces, in order.

        The whole range is translated before any byte moves, so a translation that
        fails part-way raises `DmaError` with nothing touched. `special` is None for
        guest memory; otherwise it serves its piece instead.
        """
        return ((addr, length, None),)

    def read(self, addr: int, length: int) -> bytes:
        return self.read_as(addr, length, self.attrs)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.write_as(addr, data, self.attrs)

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.read(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def map_sg(self, buffers: Sequence[tuple[int, int]], *, write: bool,
               attrs: DmaAttrs | None = None) -> list[memoryview] | None:
        """Zero-copy views of guest RAM for a scatter-gather list of DMA buffers.

        Translates every (addr, length) buffer, in order, for a read of memory by the
        device (`write` False: read-only views) or a write into it (`write` True:
        writable views), and returns memoryviews that cover exactly those bytes, in
        order; pieces that are adjacent in one mapped region are merged, so there may
        be fewer views than buffers. Nothing is read or written: the caller moves the
        data (e.g. `os.preadv` straight into the views), so a fault raises `DmaError`
        before any byte moves, as `read`/`write` do.

        Returns None when some piece is not plain guest RAM (an MRIF page, or memory
        only the fallback reaches): the caller then copies through `read_as`/`write_as`.
        Views stay valid while the mapping does; hold them only for one request.
        """
        attrs = self.attrs if attrs is None else attrs
        memory = self.memory
        starts, regions = memory._starts, memory._regions
        runs: list[list] = []  # [region, offset, length] of each merged run
        for addr, length in buffers:
            if length <= 0:
                continue
            for gpa, n, special in self.pieces(addr, length, write, attrs):
                if special is not None:
                    return None
                i = bisect.bisect_right(starts, gpa) - 1  # GuestMemory._find, inlined
                region = regions[i] if i >= 0 else None
                if region is None or gpa + n > region.gpa + region.size:
                    if memory.fallback is not None and not memory.overlapping(gpa, n):
                        return None
                    raise DmaError(addr, length, write, f"guest memory at {gpa:#x}+{n:#x}: "
                                   "not mapped")
                if write and not region.writable:
                    raise DmaError(addr, length, write, "region is read-only")
                if not write and memory._poison and memory.poisoned(gpa, n):
                    raise DmaError(addr, length, write, "poisoned data")
                offset = gpa - region.gpa
                last = runs[-1] if runs else None
                if last is not None and last[0] is region and last[1] + last[2] == offset:
                    last[2] += n
                else:
                    runs.append([region, offset, n])
        views = [region.buffer[off:off + n] for region, off, n in runs]
        return views if write else [view.toreadonly() for view in views]

    def read_as(self, addr: int, length: int, attrs: DmaAttrs) -> bytes:
        """`read` for a request that carries `attrs`."""
        if length == 0:
            return b""
        return self.read_pieces(addr, length, self.pieces(addr, length, False, attrs))

    def read_pieces(self, addr: int, length: int,
                    pieces: Sequence[tuple[int, int, SpecialPiece | None]]) -> bytes:
        """The bytes of the translated `pieces` of the read of [addr, addr+length)."""
        memory = self.memory
        try:
            return b"".join(memory.read(gpa, n) if special is None else special.read(n)
                            for gpa, n, special in pieces)
        except MemoryAccessError as e:
            raise DmaError(addr, length, False, str(e)) from None

    def write_as(self, addr: int, data: bytes | bytearray | memoryview, attrs: DmaAttrs) -> None:
        """`write` for a request that carries `attrs`."""
        length = len(data)
        if length == 0:
            return
        self.write_pieces(addr, data, self.pieces(addr, length, True, attrs))

    def write_pieces(self, addr: int, data: bytes | bytearray | memoryview,
                     pieces: Sequence[tuple[int, int, SpecialPiece | None]]) -> None:
        """Write `data` to the translated `pieces` of [addr, addr+len(data))."""
        length = len(data)
        view = memoryview(data).cast("B")
        done = 0
        try:
            for gpa, n, special in pieces:
                if special is None:
                    self.memory.write(gpa, view[done:done + n])
                else:
                    special.write(view[done:done + n], addr, length)
                done += n
        except MemoryAccessError as e:
            raise DmaError(addr, length, True, str(e)) from None
