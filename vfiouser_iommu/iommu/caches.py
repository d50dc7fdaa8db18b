"""IOMMU address-translation caches (IOATC) and their invalidation (spec v1.0.1 §10,
§4.1.1-§4.1.3 command semantics).

Tags follow §10: device contexts by device_id (IODIR.INVAL_DDT), process contexts by
device_id+process_id (IODIR.INVAL_PDT), leaf translations by GSCID+PSCID+IOVA — or
PSCID+IOVA when the G-stage is Bare, GSCID+GPA when the first stage is Bare —
(IOTINVAL.VMA / IOTINVAL.GVMA), G-stage leaves and MSI PTEs by GSCID+GPA
(IOTINVAL.GVMA). Every cache is bounded (least-recently-used entry evicted). Only
successful, valid results are ever inserted: no V=0 entry, no faulting walk.

A leaf-translation entry remembers every G-stage leaf it was built from (the final GPA
and each first-stage table page reached through the G-stage), so IOTINVAL.GVMA with an
address drops every combined entry whose translation depended on that GPA.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field


class Lru(OrderedDict):
    """A bounded mapping that evicts the least recently used entry."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def lookup(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def insert(self, key, value) -> None:
        if self.limit <= 0:
            return
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass(frozen=True, slots=True)
class TlbEntry:
    """One cached leaf translation of the naturally aligned [va_base, va_base+size)."""

    gscid: int | None     # None: G-stage Bare
    pscid: int | None     # None: first stage Bare
    va_base: int
    size: int
    out_base: int
    fs_flags: int | None  # first-stage leaf PTE flags (None: Bare)
    gs_flags: int | None  # G-stage leaf flags (None: Bare)
    pbmt: int
    gpa_base: int | None
    g_leaves: tuple[tuple[int, int], ...] = ()  # (gpa_base, size) of G-stage leaves used

    @property
    def is_global(self) -> bool:
        return bool(self.fs_flags and self.fs_flags & 0x20)

    def covers(self, va: int) -> bool:
        return self.va_base <= va < self.va_base + self.size

    def uses_gpa(self, gpa: int) -> bool:
        return any(base <= gpa < base + size for base, size in self.g_leaves)


class Tlb:
    """Leaf translations keyed by (space, page-size shift, page number).

    A lookup probes each page size currently present, so a superpage entry is found
    from any address inside it.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.entries: OrderedDict = OrderedDict()
        self.shifts: Counter = Counter()

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, space: tuple, va: int) -> TlbEntry | None:
        for shift in self.shifts:
            key = (space, shift, va >> shift)
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                return entry
        return None

    def insert(self, space: tuple, entry: TlbEntry) -> None:
        if self.limit <= 0:
            return
        shift = entry.size.bit_length() - 1
        key = (space, shift, entry.va_base >> shift)
        if key not in self.entries:
            self.shifts[shift] += 1
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.limit:
            old, _ = self.entries.popitem(last=False)
            self._forget(old)

    def _forget(self, key: tuple) -> None:
        self.shifts[key[1]] -= 1
        if not self.shifts[key[1]]:
            del self.shifts[key[1]]

    def drop(self, predicate) -> int:
        doomed = [key for key, entry in self.entries.items() if predicate(entry)]
        for key in doomed:
            del self.entries[key]
            self._forget(key)
        return len(doomed)

    def drop_at(self, space: tuple, va: int, predicate) -> int:
        """Drop entries of `space` covering `va` that satisfy `predicate` (direct probe)."""
        doomed = []
        for shift in self.shifts:
            key = (space, shift, va >> shift)
            entry = self.entries.get(key)
            if entry is not None and predicate(entry):
                doomed.append(key)
        for key in doomed:
            del self.entries[key]
            self._forget(key)
        return len(doomed)

    def clear(self) -> None:
        self.entries.clear()
        self.shifts.clear()


@dataclass
class CacheStats:
    hits: Counter = field(default_factory=Counter)
    misses: Counter = field(default_factory=Counter)
    walks: Counter = field(default_factory=Counter)


class TranslationCaches:
    """All caches of one IOMMU, with the invalidation primitives of §4.1."""

    def __init__(self, ddt: int, pdt: int, iotlb: int, gtlb: int, msi: int):
        self.ddt: Lru = Lru(ddt)
        self.pdt: Lru = Lru(pdt)
        self.iotlb = Tlb(iotlb)
        self.gtlb = Tlb(gtlb)
        self.msi: Lru = Lru(msi)
        self.stats = CacheStats()

    def clear(self) -> None:
        self.ddt.clear()
        self.pdt.clear()
        self.iotlb.clear()
        self.gtlb.clear()
        self.msi.clear()

    # -- IODIR ----------------------------------------------------------------------
    def invalidate_ddt(self, dv: bool, device_id: int) -> None:
        """IODIR.INVAL_DDT: DV=0 all DDT and PDT entries; DV=1 device_id's DC and PCs."""
        if not dv:
            self.ddt.clear()
            self.pdt.clear()
            return
        self.ddt.pop(device_id, None)
        for key in [k for k in self.pdt if k[0] == device_id]:
            del self.pdt[key]

    def invalidate_pdt(self, device_id: int, process_id: int) -> None:
        """IODIR.INVAL_PDT: the process context of (device_id, process_id)."""
        self.pdt.pop((device_id, process_id), None)

    # -- IOTINVAL -------------------------------------------------------------------
    def invalidate_vma(self, gv: bool, gscid: int, pscv: bool, pscid: int, av: bool,
                       addr: int) -> None:
        """IOTINVAL.VMA, every GV/PSCV/AV combination of §4.1.1.

        GV=0 selects host address spaces (G-stage Bare); PSCV=1 spares global entries;
        AV=1 drops the leaf entries covering `addr` (a superpage goes whole).
        """
        space_gscid = gscid if gv else None

        def hit(e: TlbEntry) -> bool:
            if e.gscid != space_gscid:
                return False
            if pscv and (e.pscid != pscid or e.is_global):
                return False
            return not av or e.covers(addr)

        if av and pscv:
            self.iotlb.drop_at((space_gscid, pscid), addr, hit)
        else:
            self.iotlb.drop(hit)

    def invalidate_gvma(self, gv: bool, gscid: int, av: bool, addr: int) -> None:
        """IOTINVAL.GVMA: G-stage leaves, the translations built on them, MSI PTEs.

        GV=0: every entry that went through a G-stage (any VM), and every MSI PTE.
        GV=1, AV=0: all of GSCID. GV=1, AV=1: entries that used a G-stage leaf mapping
        GPA `addr`, and the MSI PTE of the interrupt file at `addr`.
        """
        if not gv:
            self.iotlb.drop(lambda e: e.gscid is not None)
            self.gtlb.clear()
            self.msi.clear()
            return
        if not av:
            self.iotlb.drop(lambda e: e.gscid == gscid)
            self.gtlb.drop(lambda e: e.gscid == gscid)
            for key in [k for k in self.msi if k[0] == gscid]:
                del self.msi[key]
            return
        self.iotlb.drop(lambda e: e.gscid == gscid and e.uses_gpa(addr))
        self.gtlb.drop_at((gscid,), addr, lambda e: True)
        for key in [k for k, v in self.msi.items() if k[0] == gscid and v[2] == addr >> 12]:
            del self.msi[key]
