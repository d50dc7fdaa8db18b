"""The DMA map table of one vfio-user connection (DMA_MAP / DMA_UNMAP).

Each DMA_MAP (protocol document, "VFIO_USER_DMA_MAP") names an IOVA range and, usually,
a file descriptor for the memory behind it; we mmap that fd MAP_SHARED with the
protection the flags allow and add the mapping to the function's `GuestMemory`. A map
without an fd is remembered but not addressable: accesses to it go through the
session's message fallback (DMA_READ/DMA_WRITE). UNMAP, UNMAP_ALL and disconnect
remove mappings from `GuestMemory` and close them.

Choices where the protocol leaves one: any overlap with an existing map is EEXIST (the
protocol document's rule; QEMU always unmaps before re-mapping), addresses and sizes
must be 4 KiB aligned (we advertise `pgsizes` 4096), and more than `max_maps` maps (or
more than the server-wide `DmaMapBudget`) is ENOSPC.

A map keeps no file descriptor: `map_fd` mmaps through libc (cffi) and the fd is closed
at once, so a client's maps cannot exhaust the fd table (issue 14; Python's `mmap`
keeps a dup of every fd it maps). The mapping lives while anything views it: an
endpoint still holding a slice at unmap keeps it mapped until the slice dies.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import stat
from dataclasses import dataclass

import cffi

from ..memory import GuestMemory, Region
from .limits import MAX_DMA_MAPS_PER_CLIENT
from .wire import DMA_MAP_READ, DMA_MAP_WRITE

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
DEFAULT_MAX_MAPS = MAX_DMA_MAPS_PER_CLIENT

_ffi = cffi.FFI()
_ffi.cdef("""
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
""")
_libc = _ffi.dlopen(None)
_MAP_FAILED = _ffi.cast("void *", -1)


class DmaMapError(Exception):
    def __init__(self, error: int, why: str):
        super().__init__(why)
        self.errno = error


def map_fd(fd: int, size: int, offset: int, writable: bool) -> tuple[memoryview, object]:
    """mmap `size` bytes of `fd` at `offset`, MAP_SHARED; (view, owner) without
    keeping the fd. The mapping is unmapped when the owner and every view of it are
    gone. Raises OSError from mmap, ValueError for a range past the end of a file (its
    pages would raise SIGBUS when touched)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
        raise ValueError(f"{offset:#x}+{size:#x} is past the end of the file ({st.st_size:#x})")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    ptr = _libc.mmap(_ffi.NULL, size, prot, mmap.MAP_SHARED, fd, offset)
    if ptr == _MAP_FAILED:
        error = _ffi.errno
        raise OSError(error, os.strerror(error))
    owner = _ffi.gc(ptr, lambda p: _libc.munmap(p, size))
    view = memoryview(_ffi.buffer(owner, size))
    return (view if writable else view.toreadonly()), owner


class DmaMapBudget:
    """Maps the whole server may hold (limits.py: the VMA budget), shared by clients."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


@dataclass
class DmaMapping:
    addr: int
    size: int
    flags: int
    region: Region | None  # None: no fd, reachable only through DMA messages


class DmaMapTable:
    """The mappings one client made, mirrored into `memory`."""

    def __init__(self, memory: GuestMemory, max_maps: int = DEFAULT_MAX_MAPS,
                 budget: DmaMapBudget | None = None) -> None:
        self.memory = memory
        self.max_maps = max_maps
        self.budget = budget or DmaMapBudget(max_maps)
        self.mappings: dict[int, DmaMapping] = {}
        # The maps' start addresses, sorted: maps are disjoint, so an overlap check
        # needs only the neighbours of the new map (O(log n), issue 14).
        self._starts: list[int] = []

    def __len__(self) -> int:
        return len(self.mappings)

    def map(self, addr: int, size: int, flags: int, fd: int | None, offset: int) -> DmaMapping:
        """Add a mapping; takes ownership of `fd` (closed whatever happens)."""
        try:
            self._check_map(addr, size, flags, offset)
            region = None if fd is None else self._mmap(addr, size, flags, fd, offset)
        finally:
            if fd is not None:
                os.close(fd)
        mapping = DmaMapping(addr, size, flags, region)
        self.mappings[addr] = mapping
        bisect.insort(self._starts, addr)
        self.budget.used += 1
        return mapping

    def _check_map(self, addr: int, size: int, flags: int, offset: int) -> None:
        if flags & ~(DMA_MAP_READ | DMA_MAP_WRITE):
            raise DmaMapError(errno.EINVAL, f"unknown DMA_MAP flags {flags:#x}")
        if size == 0 or addr % PAGE_SIZE or size % PAGE_SIZE or offset % PAGE_SIZE:
            raise DmaMapError(errno.EINVAL, f"unaligned DMA_MAP {addr:#x}+{size:#x}@{offset:#x}")
        if addr + size > 1 << 64:
            raise DmaMapError(errno.EINVAL, f"DMA_MAP {addr:#x}+{size:#x} wraps")
        m = self._overlapped(addr, size)
        if m is not None:
            raise DmaMapError(errno.EEXIST,
                              f"DMA_MAP {addr:#x}+{size:#x} overlaps {m.addr:#x}+{m.size:#x}")
        if len(self.mappings) >= self.max_maps:
            raise DmaMapError(errno.ENOSPC, f"more than {self.max_maps} DMA maps")
        if self.budget.used >= self.budget.limit:
            raise DmaMapError(errno.ENOSPC,
                              f"the server holds {self.budget.limit} DMA maps, its limit")

    def _overlapped(self, addr: int, size: int) -> DmaMapping | None:
        """A map that [addr, addr+size) overlaps, if any."""
        i = bisect.bisect_right(self._starts, addr)
        if i:
            before = self.mappings[self._starts[i - 1]]
            if before.addr + before.size > addr:
                return before
        if i < len(self._starts) and self._starts[i] < addr + size:
            return self.mappings[self._starts[i]]
        return None

    def _mmap(self, addr: int, size: int, flags: int, fd: int, offset: int) -> Region:
        writable = bool(flags & DMA_MAP_WRITE)
        try:
            view, owner = map_fd(fd, size, offset, writable)
        except (OSError, ValueError, OverflowError) as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            raise DmaMapError(code, f"mmap of DMA_MAP {addr:#x}+{size:#x} failed: {e}") from None
        try:
            return self.memory.add_region(addr, view, writable=writable, owner=owner)
        finally:
            # Only the region's own view keeps the mapping, so that it goes with it.
            view.release()

    def unmap(self, addr: int, size: int) -> DmaMapping:
        mapping = self.mappings.get(addr)
        if mapping is None or mapping.size != size:
            raise DmaMapError(errno.ENOENT, f"no DMA map {addr:#x}+{size:#x}")
        del self.mappings[addr]
        del self._starts[bisect.bisect_left(self._starts, addr)]
        self.budget.used -= 1
        self._release(mapping)
        return mapping

    def unmap_all(self) -> list[DmaMapping]:
        gone = list(self.mappings.values())
        self.mappings.clear()
        self._starts.clear()
        self.budget.used -= len(gone)
        for mapping in gone:
            self._release(mapping)
        return gone

    def _release(self, mapping: DmaMapping) -> None:
        region = mapping.region
        if region is None:
            return
        self.memory.remove_region(region.gpa, region.size)
        # The mapping goes when the last view of it does: now, unless an endpoint
        # still holds a slice (then with that slice).
        try:
            region.buffer.release()
        except BufferError:
            log.info("DMA map %#x+%#x still referenced at unmap", mapping.addr, mapping.size)
        region.owner = None
