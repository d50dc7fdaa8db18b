"""The DMA map table of one vfio-user connection (DMA_MAP / DMA_UNMAP).

Each DMA_MAP (protocol document, "VFIO_USER_DMA_MAP") names an IOVA range and, usually,
a file descriptor for the memory behind it; we mmap that fd MAP_SHARED with the
protection the flags allow and add the mapping to the function's `GuestMemory`. A map
without an fd is remembered but not addressable: accesses to it go through the
session's message fallback (DMA_READ/DMA_WRITE). UNMAP, UNMAP_ALL and disconnect
remove mappings from `GuestMemory` and close them.

Choices where the protocol leaves one: any overlap with an existing map is EEXIST (the
protocol document's rule; QEMU always unmaps before re-mapping), addresses and sizes
must be 4 KiB aligned (we advertise `pgsizes` 4096), and more than `max_maps` maps is
ENOSPC.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
from dataclasses import dataclass

from ..memory import GuestMemory, Region
from .wire import DMA_MAP_READ, DMA_MAP_WRITE

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
DEFAULT_MAX_MAPS = 65535


class DmaMapError(Exception):
    def __init__(self, error: int, why: str):
        super().__init__(why)
        self.errno = error


@dataclass
class DmaMapping:
    addr: int
    size: int
    flags: int
    region: Region | None  # None: no fd, reachable only through DMA messages


class DmaMapTable:
    """The mappings one client made, mirrored into `memory`."""

    def __init__(self, memory: GuestMemory, max_maps: int = DEFAULT_MAX_MAPS) -> None:
        self.memory = memory
        self.max_maps = max_maps
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
        prot = (mmap.PROT_READ if flags & DMA_MAP_READ else 0) | \
               (mmap.PROT_WRITE if flags & DMA_MAP_WRITE else 0)
        try:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot or mmap.PROT_READ,
                           offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            raise DmaMapError(code, f"mmap of DMA_MAP {addr:#x}+{size:#x} failed: {e}") from None
        views = [memoryview(mm)]
        if not flags & DMA_MAP_WRITE:
            views.append(views[0].toreadonly())
        try:
            return self.memory.add_region(addr, views[-1], writable=bool(flags & DMA_MAP_WRITE),
                                          owner=mm)
        finally:
            # Only the region's own view may keep the mmap exported, so that unmap can
            # close it.
            for view in views:
                view.release()

    def unmap(self, addr: int, size: int) -> DmaMapping:
        mapping = self.mappings.get(addr)
        if mapping is None or mapping.size != size:
            raise DmaMapError(errno.ENOENT, f"no DMA map {addr:#x}+{size:#x}")
        del self.mappings[addr]
        del self._starts[bisect.bisect_left(self._starts, addr)]
        self._release(mapping)
        return mapping

    def unmap_all(self) -> list[DmaMapping]:
        gone = list(self.mappings.values())
        self.mappings.clear()
        self._starts.clear()
        for mapping in gone:
            self._release(mapping)
        return gone

    def _release(self, mapping: DmaMapping) -> None:
        region = mapping.region
        if region is None:
            return
        self.memory.remove_region(region.gpa, region.size)
        region.buffer.release()
        try:
            region.owner.close()
        except BufferError:
            # An endpoint still holds a slice; the mapping dies with its last view.
            log.warning("DMA map %#x+%#x still referenced at unmap", mapping.addr, mapping.size)
