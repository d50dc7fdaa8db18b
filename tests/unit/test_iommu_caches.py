"""Caches (spec §10): what is cached, how each invalidation primitive scopes, that V=0
entries and faulting walks are never cached, bounds, and (hypothesis) that a cached
IOMMU agrees with an uncached one whenever the proper invalidations are issued."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from iommu_tables import LEAF_RW, RAM_BASE, G, R, U, V, atp, make_iommu

from vfiouser_iommu.iommu import Access, Fault, IommuConfig, Request, RiscvIommu, Translation
from vfiouser_iommu.iommu.walk import SV39, SV39X4

DID = 0x30
DATA = RAM_BASE + (1 << 20)
MIB2 = 2 << 20
PSCID = 0x55
GSCID = 0x66
NO_CACHE = IommuConfig(ddt_cache_entries=0, pdt_cache_entries=0, iotlb_entries=0,
                       gtlb_entries=0, msi_cache_entries=0)


def req(iova, access=Access.READ, did=DID, pid=None):
    return Request(did, pid, iova, access)


def _fs_setup(config=None, tc=1):
    iommu, b, root = make_iommu(config)
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, tc=tc, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    return iommu, b, root, pt


def test_leaf_cached_until_vma_invalidation():
    iommu, b, _, pt = _fs_setup()
    slot = b.map(SV39, pt, 0x5000, DATA)
    assert iommu.translate(req(0x5000)).address == DATA
    b.write_pte(slot, ((DATA + 0x1000) >> 12) << 10 | LEAF_RW, 8)
    assert iommu.translate(req(0x5000)).address == DATA            # stale, as allowed
    iommu.invalidate_vma(False, 0, True, PSCID + 1, True, 0x5000)  # other PSCID: no effect
    assert iommu.translate(req(0x5000)).address == DATA
    iommu.invalidate_vma(False, 0, True, PSCID, True, 0x5000)
    assert iommu.translate(req(0x5000)).address == DATA + 0x1000
    assert iommu.caches.stats.hits["iotlb"] == 2


def test_napot_range_invalidation_drops_exactly_the_range():
    """IOTINVAL.VMA S=1 (a 2 MiB NAPOT range at 0x200000): every leaf inside goes,
    the ones on either side stay cached (stale), as an exact range invalidation."""
    iommu, b, _, pt = _fs_setup()
    pages = (0x1FF000, 0x200000, 0x3FF000, 0x400000)
    slots = {va: b.map(SV39, pt, va, DATA + i * 0x1000) for i, va in enumerate(pages)}
    for va in pages:
        iommu.translate(req(va))
    for slot in slots.values():
        b.write_pte(slot, ((DATA + 0x10000) >> 12) << 10 | LEAF_RW, 8)
    iommu.invalidate_vma(False, 0, True, PSCID, True, 0x200000, size=0x200000)
    got = {va: iommu.translate(req(va)).address for va in pages}
    assert got == {0x1FF000: DATA, 0x200000: DATA + 0x10000, 0x3FF000: DATA + 0x10000,
                   0x400000: DATA + 0x3000}


def test_superpage_dropped_by_any_address_inside():
    iommu, b, _, pt = _fs_setup()
    slot = b.map(SV39, pt, 0x20_0000, RAM_BASE, MIB2)
    iommu.translate(req(0x20_0000))
    b.write_pte(slot, ((RAM_BASE + MIB2) >> 12) << 10 | LEAF_RW, 8)
    iommu.invalidate_vma(False, 0, True, PSCID, True, 0x3F_F000)
    assert iommu.translate(req(0x20_0010)).address == RAM_BASE + MIB2 + 0x10


def test_global_entries_survive_pscid_invalidation():
    iommu, b, _, pt = _fs_setup()
    slot = b.map(SV39, pt, 0x5000, DATA, flags=LEAF_RW | G)
    iommu.translate(req(0x5000))
    b.write_pte(slot, 0, 8)
    iommu.invalidate_vma(False, 0, True, PSCID, False, 0)
    assert isinstance(iommu.translate(req(0x5000)), Translation)
    iommu.invalidate_vma(False, 0, False, 0, True, 0x5000)     # PSCV=0: globals too
    assert iommu.translate(req(0x5000)).cause == 13


def test_gv_scopes_vma_invalidation():
    iommu, b, _, pt = _fs_setup()
    slot = b.map(SV39, pt, 0x5000, DATA)
    iommu.translate(req(0x5000))
    b.write_pte(slot, 0, 8)
    iommu.invalidate_vma(True, 0, False, 0, False, 0)       # GV=1: guests only
    assert isinstance(iommu.translate(req(0x5000)), Translation)
    iommu.invalidate_vma(False, 0, False, 0, False, 0)      # host spaces
    assert isinstance(iommu.translate(req(0x5000)), Fault)


def test_invalid_and_faulting_results_are_never_cached():
    iommu, b, _, pt = _fs_setup()
    assert iommu.translate(req(0x5000)).cause == 13          # V=0
    slot = b.map(SV39, pt, 0x5000, DATA, flags=V | R | U | (1 << 6) | (1 << 7))
    assert iommu.translate(req(0x5000)).address == DATA      # no invalidation needed
    assert iommu.translate(req(0x5000, Access.WRITE)).cause == 15
    b.write_pte(slot, (DATA >> 12) << 10 | LEAF_RW, 8)       # V=1 entry made writable
    assert iommu.translate(req(0x5000, Access.WRITE)).address == DATA


def test_device_context_cache_and_iodir():
    iommu, b, root = make_iommu()
    assert iommu.translate(req(0)).cause == 258              # V=0 DC: not cached
    b.set_dc(root, 3, DID, 64)
    assert iommu.translate(req(0)).address == 0
    b.set_dc(root, 3, DID, 64, tc=0)
    assert iommu.translate(req(0)).address == 0              # cached DC
    iommu.invalidate_ddt(True, DID + 1)
    assert iommu.translate(req(0)).address == 0
    iommu.invalidate_ddt(True, DID)
    assert iommu.translate(req(0)).cause == 258
    assert isinstance(iommu.device_context(DID), Fault)


def test_process_context_cache_and_inval_pdt():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA)
    pdt = b.alloc()
    b.set_dc(root, 3, DID, 64, tc=1 | 32, fsc=atp(1, pdt >> 12))
    slot = b.set_pc(pdt, 1, 3, 1 | 1 << 12, atp(8, pt >> 12))
    assert iommu.translate(req(0x5000, pid=3)).address == DATA
    b.write64(slot, 0)
    assert iommu.translate(req(0x5000, pid=3)).address == DATA
    iommu.invalidate_pdt(DID, 3)
    assert iommu.translate(req(0x5000, pid=3)).cause == 266


def test_gvma_with_address_drops_nested_entries_built_on_that_gpa():
    iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    for gpa in range(0, 16 << 20, MIB2):
        b.map(SV39X4, groot, gpa, gpa + RAM_BASE, MIB2)
    gb = replace(b, offset=RAM_BASE)
    fs_root = gb.root(SV39)
    gb.map(SV39, fs_root, 0x5000, 0x10_0000)
    b.set_dc(root, 3, DID, 64, ta=PSCID << 12, fsc=atp(8, fs_root >> 12),
             iohgatp=atp(8, groot >> 12, GSCID))
    assert iommu.translate(req(0x5000)).address == RAM_BASE + 0x10_0000
    # Remap the 2 MiB G-stage page holding the first-stage root elsewhere (to a copy).
    page = fs_root & ~(MIB2 - 1)
    copy = RAM_BASE + (32 << 20)
    iommu.memory.write(copy, iommu.memory.read(page + RAM_BASE, MIB2))
    gb2 = replace(b, offset=copy - page)
    gb2.map(SV39, fs_root, 0x5000, 0x20_0000)
    b.map(SV39X4, groot, page, copy, MIB2)
    assert iommu.translate(req(0x5000)).address == RAM_BASE + 0x10_0000     # stale
    iommu.invalidate_gvma(True, GSCID + 1, True, fs_root)
    assert iommu.translate(req(0x5000)).address == RAM_BASE + 0x10_0000
    iommu.invalidate_gvma(True, GSCID, True, fs_root)
    assert iommu.translate(req(0x5000)).address == RAM_BASE + 0x20_0000


def test_msi_pte_cached_until_gvma():
    iommu, b, root = make_iommu()
    msipt = b.alloc()
    b.write64(msipt, 1 | 3 << 1 | (DATA >> 12) << 10)
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, msipt >> 12), msi_mask=0,
             msi_pattern=0x2800_0000 >> 12)
    assert iommu.translate(req(0x2800_0000, Access.WRITE)).address == DATA
    b.write64(msipt, 0)
    assert iommu.translate(req(0x2800_0000, Access.WRITE)).address == DATA
    iommu.invalidate_gvma(False, 0, False, 0)
    assert iommu.translate(req(0x2800_0000, Access.WRITE)).cause == 262


def test_host_msi_pte_invalidated_by_gvma_with_the_dcs_gscid():
    """The spec's recipe for an MSI PTE change is IOTINVAL.GVMA GV=AV=1 with
    GSCID=DC.iohgatp.GSCID, also when the G-stage is Bare (the host's MSI page table)."""
    iommu, b, root = make_iommu()
    msipt = b.alloc()
    b.write64(msipt, 1 | 3 << 1 | (DATA >> 12) << 10)
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, msipt >> 12), msi_mask=0,
             msi_pattern=0x2800_0000 >> 12)
    assert iommu.translate(req(0x2800_0000, Access.WRITE)).address == DATA
    b.write64(msipt, 1 | 3 << 1 | ((DATA + 0x1000) >> 12) << 10)
    iommu.invalidate_gvma(True, GSCID, True, 0x2800_0000)      # another GSCID: no effect
    assert iommu.translate(req(0x2800_0000, Access.WRITE)).address == DATA
    iommu.invalidate_gvma(True, 0, True, 0x2800_0000)          # DC.iohgatp.GSCID is 0
    assert iommu.translate(req(0x2800_0000, Access.WRITE)).address == DATA + 0x1000


def test_caches_are_bounded():
    iommu, b, _, pt = _fs_setup(IommuConfig(iotlb_entries=8))
    for k in range(32):
        b.map(SV39, pt, 0x10_0000 + k * 4096, DATA)
        iommu.translate(req(0x10_0000 + k * 4096))
    assert len(iommu.caches.iotlb) == 8
    assert iommu.translate(req(0x10_0000)).address == DATA   # evicted, walked again
    iommu.reset_translation_state()
    assert len(iommu.caches.iotlb) == 0 and not iommu.caches.ddt


# -- property: cached == uncached with proper invalidation -------------------------------------
N_PAGES = 8
FLAG_CHOICES = [LEAF_RW, LEAF_RW & ~4, LEAF_RW | G, V | R | U | (1 << 6), 0]

op = st.one_of(
    st.tuples(st.just("fs"), st.integers(0, N_PAGES - 1), st.integers(0, 31),
              st.sampled_from(FLAG_CHOICES)),
    st.tuples(st.just("gs"), st.integers(0, N_PAGES - 1), st.integers(0, 31),
              st.sampled_from(FLAG_CHOICES)),
    st.tuples(st.just("dc"), st.integers(0, 1), st.just(0), st.just(0)),
)


SUPERPAGE_VA = 0x4020_0000    # a 2 MiB first-stage leaf onto target pages 512..1023
FILE_TARGET = 5               # with msi, targets 4, 5, 516, 517 are interrupt files
MSI_MASK = 1 | 1 << 9
IMSIC = RAM_BASE + (2 << 20)


class World:
    """One guest memory with a cached and an uncached IOMMU over it.

    Probe pages 0..N_PAGES-1 are 4 KiB first-stage pages the ops remap onto targets
    0..31; pages N_PAGES.. lie in a 2 MiB first-stage superpage onto targets 512..1023
    (nested: over a 2 MiB G-stage leaf). With `msi`, the DC has a flat MSI page table
    whose interrupt files are targets 4 and 516 (MSI PTE V=0) and 5 and 517 (basic):
    the superpage holds interrupt-file pages and ordinary ones.
    """

    def __init__(self, nested: bool, msi: bool = False):
        self.cached, self.b, self.root = make_iommu()
        self.plain = RiscvIommu(self.cached.memory, NO_CACHE)
        self.plain.ddtp, self.plain.fctl = self.cached.ddtp, self.cached.fctl
        self.nested = nested
        b = self.b
        self.groot = b.root(SV39X4) if nested else None
        if nested:
            for gpa in range(0, 16 << 20, MIB2):
                b.map(SV39X4, self.groot, gpa, gpa + RAM_BASE, MIB2)
            self.fb = replace(b, offset=RAM_BASE)
        else:
            self.fb = b
        self.fs_root = self.fb.root(SV39)
        if nested:
            b.map(SV39X4, self.groot, self.target(512), RAM_BASE + self.target(512), MIB2)
        self.fb.map(SV39, self.fs_root, SUPERPAGE_VA, self.target(512), MIB2)
        self.pscid = [PSCID, PSCID + 1]
        self.msiptp = 0
        if msi:
            msipt = b.alloc()
            for index in (1, 3):
                b.write64(msipt + 16 * index, 1 | 3 << 1 | (IMSIC >> 12) << 10)
            self.msiptp = atp(1, msipt >> 12)
        self.write_dc(0)

    def target(self, t: int) -> int:
        """First-stage output (GPA) of target page t."""
        return 0x100_0000 + t * 4096 + (0 if self.nested else RAM_BASE)

    def write_dc(self, which: int) -> None:
        self.b.set_dc(self.root, 3, DID, 64, ta=self.pscid[which] << 12,
                      fsc=atp(8, self.fs_root >> 12),
                      iohgatp=atp(8, self.groot >> 12, GSCID) if self.nested else 0,
                      msiptp=self.msiptp, msi_mask=MSI_MASK,
                      msi_pattern=self.target(FILE_TARGET) >> 12)

    def apply(self, kind, page, target, flags) -> None:
        va = 0x4000_0000 + page * 4096
        if kind == "fs":
            gpa = self.target(target)
            slot = self.fb.map(SV39, self.fs_root, va, gpa)
            self.fb.write_pte(slot, (gpa >> 12) << 10 | flags, 8)
        elif kind == "gs" and self.nested:
            gpa = 0x100_0000 + page * 4096
            slot = self.b.map(SV39X4, self.groot, gpa, DATA + target * 4096)
            self.b.write_pte(slot, ((DATA + target * 4096) >> 12) << 10 | flags, 8)
        elif kind == "dc":
            self.write_dc(target)

    def invalidate(self, kind, page, target, flags) -> None:
        iommu = self.cached
        gv = self.nested
        if kind == "fs":
            iommu.invalidate_vma(gv, GSCID if gv else 0, False, 0, True,
                                 0x4000_0000 + page * 4096)
        elif kind == "gs" and self.nested:
            iommu.invalidate_gvma(True, GSCID, True, 0x100_0000 + page * 4096)
        elif kind == "dc":
            iommu.invalidate_ddt(True, DID)
            iommu.invalidate_vma(gv, GSCID if gv else 0, False, 0, False, 0)
            if gv:
                iommu.invalidate_gvma(True, GSCID, False, 0)

    def both(self, page: int, access: Access):
        va = 0x4000_0000 + page * 4096 if page < N_PAGES else \
            SUPERPAGE_VA + (page - N_PAGES) * 4096
        r = req(va + 8, access)
        return self.cached.translate(r), self.plain.translate(r)


@settings(max_examples=60, deadline=None)
@given(nested=st.booleans(), msi=st.booleans(), ops=st.lists(op, max_size=12),
       probes=st.lists(st.tuples(st.integers(0, 2 * N_PAGES - 1),
                                 st.sampled_from([Access.READ, Access.WRITE])), min_size=1,
                       max_size=6))
def test_cached_equals_uncached_with_invalidation(nested, msi, ops, probes):
    world = World(nested, msi)
    for o in [None, *ops]:
        if o is not None:
            world.apply(*o)
            world.invalidate(*o)
        for page, access in probes:
            cached, plain = world.both(page, access)
            assert cached == plain


@settings(max_examples=40, deadline=None)
@given(nested=st.booleans(), msi=st.booleans(), ops=st.lists(op, min_size=1, max_size=8),
       page=st.integers(0, 2 * N_PAGES - 1),
       access=st.sampled_from([Access.READ, Access.WRITE]))
def test_without_invalidation_old_or_new_never_anything_else(nested, msi, ops, page, access):
    world = World(nested, msi)
    for o in ops:
        before = world.both(page, access)[1]
        world.apply(*o)
        cached, after = world.both(page, access)
        assert cached in (before, after)
        world.cached.reset_translation_state()
