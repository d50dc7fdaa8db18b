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

Cache modes (docs/introspection.md): `spec` (the default, bounded LRU caches), `max`
(unbounded, never evicting) and `none` (nothing cached).
`negative` holds invalid (V=0) results when negative caching is on (a deliberate
deviation: the spec forbids caching V=0 entries); it is looked at only on a miss. Every
invalidation returns how many entries it removed.
"""

from __future__ import annotations

import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

PAGE = 4096
#: Cache modes (`TranslationCaches.configure`).
CACHE_MODES = ("spec", "max", "none")
_UNBOUNDED = sys.maxsize


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
    # What the entry was built from, when the invalidation checker is on (checker.Source).
    source: object = field(default=None, compare=False, repr=False)

    @property
    def is_global(self) -> bool:
        return bool(self.fs_flags and self.fs_flags & 0x20)

    def covers(self, va: int, size: int = 1) -> bool:
        """Whether the entry overlaps [va, va+size) (one address by default)."""
        return self.va_base < va + size and va < self.va_base + self.size

    def uses_gpa(self, gpa: int, size: int = 1) -> bool:
        return any(base < gpa + size and gpa < base + length
                   for base, length in self.g_leaves)



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

    def peek(self, space: tuple, va: int) -> TlbEntry | None:
        """`lookup` without touching the LRU order (for tools)."""
        for shift in self.shifts:
            entry = self.entries.get((space, shift, va >> shift))
            if entry is not None:
                return entry
        return None


def napot_range(page: int, width: int = 52) -> tuple[int, int]:
    """(base, size) of a NAPOT-encoded page number (IOTINVAL S=1, ATS.INVAL S=1): X
    trailing ones name 2^(X+1) pages, aligned to that size. All `width` bits one is
    UNSPECIFIED: we take the whole space."""
    ones = (~page & (page + 1)).bit_length() - 1  # trailing 1 bits
    if ones >= width:
        return 0, 1 << (width + 12)
    size = PAGE << (ones + 1)
    return (page << 12) & ~(size - 1), size


def iotinval_range(fields: dict[str, int]) -> tuple[int, int]:
    """(address, size) an IOTINVAL with AV=1 names: one page, or S=1's NAPOT range.

    NL=1 also names the non-leaf entries there; the model caches none, so leaf
    invalidation of the range is exactly what NL asks for.
    """
    if fields.get("S"):
        return napot_range(fields["ADDR"])
    return fields["ADDR"] << 12, PAGE


def vma_covers(entry: TlbEntry, gv: bool, gscid: int, pscv: bool, pscid: int, av: bool,
               addr: int, size: int = 1) -> bool:
    """Whether IOTINVAL.VMA with these operands removes `entry` (§4.1.1 table); with
    AV=1 the entries overlapping [addr, addr+size)."""
    if entry.gscid != (gscid if gv else None):
        return False
    if pscv and (entry.pscid != pscid or entry.is_global):
        return False
    return not av or entry.covers(addr, size)


def gvma_covers(entry: TlbEntry, gv: bool, gscid: int, av: bool, addr: int,
                size: int = 1) -> bool:
    """Whether IOTINVAL.GVMA removes a leaf-translation `entry` (IOTLB or G-stage)."""
    if not gv:
        return entry.gscid is not None
    if entry.gscid != gscid:
        return False
    return (not av or entry.uses_gpa(addr, size)
            or (entry.pscid is None and entry.covers(addr, size)))


@dataclass
class CacheStats:
    hits: Counter = field(default_factory=Counter)
    misses: Counter = field(default_factory=Counter)
    walks: Counter = field(default_factory=Counter)


class NegativeCaches:
    """Invalid (V=0) results, kept until the invalidation that covers them (negative=on).

    Device contexts by device_id, process contexts by (device_id, process_id), MSI PTEs by
    the MSI cache's key (values: what the checker needs to re-read them), and page-table
    results as `TlbEntry`s with no permission (fs_flags or gs_flags 0) covering the region
    of the invalid PTE, so that the IOTINVAL rules apply to them unchanged.
    """

    def __init__(self, ddt: int, pdt: int, iotlb: int, gtlb: int, msi: int):
        self.ddt: Lru = Lru(ddt)
        self.pdt: Lru = Lru(pdt)
        self.iotlb = Tlb(iotlb)
        self.gtlb = Tlb(gtlb)
        self.msi: Lru = Lru(msi)

    def __len__(self) -> int:
        return len(self.ddt) + len(self.pdt) + len(self.iotlb) + len(self.gtlb) + len(self.msi)


class TranslationCaches:
    """All caches of one IOMMU, with the invalidation primitives of §4.1."""

    def __init__(self, ddt: int, pdt: int, iotlb: int, gtlb: int, msi: int):
        self.limits = (ddt, pdt, iotlb, gtlb, msi)
        self.mode = "spec"
        self.ddt: Lru = Lru(ddt)
        self.pdt: Lru = Lru(pdt)
        self.iotlb = Tlb(iotlb)
        self.gtlb = Tlb(gtlb)
        self.msi: Lru = Lru(msi)
        self.negative: NegativeCaches | None = None
        self.stats = CacheStats()

    def configure(self, mode: str = "spec", negative: bool = False,
                  lru=None, tlb=None) -> None:
        """Switch cache mode and negative caching; every cache starts empty (entries may
        be evicted at any time, so this is invisible to correct software). `lru(kind,
        limit)` and `tlb(kind, limit)` make the caches (the invalidation checker passes
        checking ones); kinds are "ddt", "pdt", "msi" and "iotlb", "gtlb"."""
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode {mode!r}: want one of {', '.join(CACHE_MODES)}")
        lru = lru or (lambda kind, limit: Lru(limit))
        tlb = tlb or (lambda kind, limit: Tlb(limit))
        limits = {"spec": self.limits, "max": (_UNBOUNDED,) * 5, "none": (0,) * 5}[mode]
        self.mode = mode
        self.ddt, self.pdt = lru("ddt", limits[0]), lru("pdt", limits[1])
        self.msi = lru("msi", limits[4])
        self.iotlb, self.gtlb = tlb("iotlb", limits[2]), tlb("gtlb", limits[3])
        self.negative = NegativeCaches(*limits) if negative and mode != "none" else None

    def clear(self) -> None:
        for cache in (self.ddt, self.pdt, self.iotlb, self.gtlb, self.msi):
            cache.clear()
        if self.negative is not None:
            for cache in (self.negative.ddt, self.negative.pdt, self.negative.iotlb,
                          self.negative.gtlb, self.negative.msi):
                cache.clear()

    def _both(self, name: str):
        """The positive cache `name` and, with negative caching, its negative twin."""
        yield getattr(self, name)
        if self.negative is not None:
            yield getattr(self.negative, name)

    # -- IODIR ----------------------------------------------------------------------
    def invalidate_ddt(self, dv: bool, device_id: int) -> int:
        """IODIR.INVAL_DDT: DV=0 all DDT and PDT entries; DV=1 device_id's DC and PCs."""
        removed = 0
        for ddt, pdt in zip(self._both("ddt"), self._both("pdt"), strict=True):
            if not dv:
                removed += len(ddt) + len(pdt)
                ddt.clear()
                pdt.clear()
                continue
            removed += ddt.pop(device_id, None) is not None
            doomed = [k for k in pdt if k[0] == device_id]
            for key in doomed:
                del pdt[key]
            removed += len(doomed)
        return removed

    def invalidate_pdt(self, device_id: int, process_id: int) -> int:
        """IODIR.INVAL_PDT: the process context of (device_id, process_id)."""
        return sum(pdt.pop((device_id, process_id), None) is not None
                   for pdt in self._both("pdt"))

    # -- IOTINVAL -------------------------------------------------------------------
    def invalidate_vma(self, gv: bool, gscid: int, pscv: bool, pscid: int, av: bool,
                       addr: int, size: int = PAGE) -> int:
        """IOTINVAL.VMA, every GV/PSCV/AV combination of §4.1.1.

        GV=0 selects host address spaces (G-stage Bare); PSCV=1 spares global entries;
        AV=1 drops the leaf entries overlapping [addr, addr+size) — one page, or S=1's
        NAPOT range — and nothing else (a superpage goes whole).
        """
        space = (gscid if gv else None, pscid)

        def hit(e: TlbEntry) -> bool:
            return vma_covers(e, gv, gscid, pscv, pscid, av, addr, size)

        removed = 0
        for iotlb in self._both("iotlb"):
            if av and pscv and size <= PAGE:
                removed += iotlb.drop_at(space, addr, hit)
            else:
                removed += iotlb.drop(hit)
        return removed

    def invalidate_gvma(self, gv: bool, gscid: int, av: bool, addr: int,
                        size: int = PAGE) -> int:
        """IOTINVAL.GVMA: G-stage leaves, the translations built on them, MSI PTEs.

        GV=0: every entry that went through a G-stage (any VM), and every MSI PTE.
        GV=1, AV=0: all of GSCID. GV=1, AV=1: entries that used a G-stage leaf mapping
        a GPA in [addr, addr+size) (one page, or S=1's NAPOT range), and the MSI PTEs of
        the interrupt files there. MSI PTEs are tagged
        with DC.iohgatp.GSCID even when the G-stage is Bare (the spec's recipe for an MSI
        PTE change names that GSCID with GV=1).
        """
        removed = 0
        for iotlb, gtlb, msi in zip(self._both("iotlb"), self._both("gtlb"), self._both("msi"),
                                    strict=True):
            if not gv:
                removed += iotlb.drop(lambda e: e.gscid is not None)
                removed += len(gtlb) + len(msi)
                gtlb.clear()
                msi.clear()
                continue
            if not av:
                removed += iotlb.drop(lambda e: e.gscid == gscid)
                removed += gtlb.drop(lambda e: e.gscid == gscid)
                doomed = [k for k in msi if k[0] == gscid]
            else:
                removed += iotlb.drop(lambda e: e.gscid == gscid and e.uses_gpa(addr, size))
                if size <= PAGE:
                    removed += gtlb.drop_at((gscid,), addr, lambda e: True)
                else:
                    removed += gtlb.drop(lambda e: e.gscid == gscid and e.covers(addr, size))
                pages = range(addr >> 12, (addr + size) >> 12)
                doomed = [k for k, v in msi.items() if k[0] == gscid and v[2] in pages]
            for key in doomed:
                del msi[key]
            removed += len(doomed)
        return removed
