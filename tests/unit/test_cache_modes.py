"""Cache modes (spec, max, none), negative caching, and the needs_reference_path flag
(docs/introspection.md)."""

from __future__ import annotations

import pytest
from iommu_tables import LEAF_RW, RAM_BASE, atp, make_iommu

from vfiouser_iommu.iommu import Access, Fault, IommuConfig, Request
from vfiouser_iommu.iommu.modes import parse_modes, set_modes
from vfiouser_iommu.iommu.walk import SV39, SV39X4

DID, PSCID, GSCID = 0x30, 0x55, 0x66
DATA = RAM_BASE + (1 << 20)
MIB2 = 2 << 20


def req(iova, did=DID, pid=None, access=Access.READ):
    return Request(did, pid, iova, access)


def first_stage(config=None, tc=1):
    iommu, b, root = make_iommu(config)
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, tc=tc, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    return iommu, b, root, pt


def test_needs_reference_path_follows_the_modes():
    iommu, *_ = make_iommu()
    assert iommu.needs_reference_path is False
    for modes in ({"check": True}, {"negative": True}, {"cache": "max"}, {"cache": "none"},
                  {"trace_translations": True}):
        set_modes(iommu, **modes)
        assert iommu.needs_reference_path is True, modes
        set_modes(iommu, check=False, negative=False, cache="spec", trace_translations=False)
        assert iommu.needs_reference_path is False


def test_unknown_modes_are_refused():
    iommu, *_ = make_iommu()
    with pytest.raises(ValueError):
        set_modes(iommu, cache="most")
    assert parse_modes({"check": "on", "cache": "max", "negative": "off"}) == \
        {"check": True, "cache": "max", "negative": False}
    for bad in ({"check": "yes"}, {"cache": "all"}, {"negative": "1"}):
        with pytest.raises(ValueError):
            parse_modes(bad)


def test_cache_max_never_evicts():
    iommu, b, _, pt = first_stage(IommuConfig(iotlb_entries=8, ddt_cache_entries=1))
    set_modes(iommu, cache="max")
    for k in range(64):
        b.map(SV39, pt, 0x10_0000 + k * 4096, DATA)
        iommu.translate(req(0x10_0000 + k * 4096))
    assert len(iommu.caches.iotlb) == 64
    set_modes(iommu, cache="spec")          # back to the configured bounds, empty
    assert len(iommu.caches.iotlb) == 0 and iommu.caches.iotlb.limit == 8


def test_one_4k_invalidation_inside_a_superpage_removes_it_whole():
    """§4.1.1: AV=1 removes the entries holding the leaf PTE that maps ADDR; for a
    superpage, from any address inside it (Linux sends one command per superpage)."""
    for mode in ("spec", "max"):
        iommu, b, _, pt = first_stage()
        set_modes(iommu, cache=mode)
        slot = b.map(SV39, pt, 0x20_0000, RAM_BASE, MIB2)
        for page in (0x20_0000, 0x20_1000, 0x3F_F000):
            assert iommu.translate(req(page + 8)).address == RAM_BASE + page - 0x20_0000 + 8
        assert len(iommu.caches.iotlb) == 1
        b.write_pte(slot, ((RAM_BASE + MIB2) >> 12) << 10 | LEAF_RW, 8)
        assert iommu.invalidate_vma(False, 0, True, PSCID, True, 0x3F_F000) == 1
        assert iommu.translate(req(0x20_1000)).address == RAM_BASE + MIB2 + 0x1000


def test_cache_none_caches_nothing():
    iommu, b, _, pt = first_stage()
    set_modes(iommu, cache="none")
    slot = b.map(SV39, pt, 0x5000, DATA)
    assert iommu.translate(req(0x5000)).address == DATA
    b.write_pte(slot, ((DATA + 0x1000) >> 12) << 10 | LEAF_RW, 8)
    assert iommu.translate(req(0x5000)).address == DATA + 0x1000
    caches = iommu.caches
    assert not (len(caches.iotlb) or len(caches.ddt) or len(caches.gtlb))


def test_mode_switch_empties_the_caches():
    iommu, b, _, pt = first_stage()
    b.map(SV39, pt, 0x5000, DATA)
    iommu.translate(req(0x5000))
    assert len(iommu.caches.iotlb) == 1
    set_modes(iommu, check=True)
    assert len(iommu.caches.iotlb) == 0 and not iommu.caches.ddt


# -- negative caching -------------------------------------------------------------------------
def test_without_negative_caching_v0_is_never_cached():
    iommu, b, root, pt = first_stage(tc=0)
    assert iommu.translate(req(0x5000)).cause == 258
    b.set_dc(root, 3, DID, 64, tc=1, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    b.map(SV39, pt, 0x5000, DATA)
    assert iommu.translate(req(0x5000)).address == DATA


def test_negative_dc_until_iodir_inval_ddt():
    iommu, b, root, pt = first_stage(tc=0)
    set_modes(iommu, negative=True)
    assert iommu.translate(req(0x5000)).cause == 258
    b.set_dc(root, 3, DID, 64, tc=1, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    b.map(SV39, pt, 0x5000, DATA)
    assert iommu.translate(req(0x5000)).cause == 258          # the cached V=0
    assert iommu.caches.stats.hits["negative_ddt"] == 1
    assert iommu.invalidate_ddt(True, DID + 1) == 0
    assert iommu.translate(req(0x5000)).cause == 258
    assert iommu.invalidate_ddt(True, DID) == 1
    assert iommu.translate(req(0x5000)).address == DATA


def test_negative_non_leaf_ddte_is_kept_by_device_id():
    iommu, b, root = make_iommu()
    set_modes(iommu, negative=True)
    assert iommu.translate(req(0x5000)).cause == 258          # empty DDT: non-leaf V=0
    b.set_dc(root, 3, DID, 64, tc=1)
    assert iommu.translate(req(0x5000)).cause == 258
    iommu.invalidate_ddt(False, 0)
    assert iommu.translate(req(0x5000)).address == 0x5000


def test_negative_first_stage_pte_until_iotinval_vma():
    iommu, b, _, pt = first_stage()
    set_modes(iommu, negative=True)
    b.map(SV39, pt, 0x6000, DATA)                  # tables exist, the 0x5000 leaf is V=0
    assert iommu.translate(req(0x5000)).cause == 13
    b.map(SV39, pt, 0x5000, DATA)
    assert iommu.translate(req(0x5000)).cause == 13
    assert iommu.translate(req(0x5000, access=Access.WRITE)).cause == 15
    assert iommu.invalidate_vma(False, 0, True, PSCID, True, 0x6000) == 0
    assert iommu.translate(req(0x5000)).cause == 13
    assert iommu.invalidate_vma(False, 0, True, PSCID, True, 0x5000) == 1
    assert iommu.translate(req(0x5000)).address == DATA


def test_negative_non_leaf_pte_covers_its_whole_region():
    iommu, b, _, pt = first_stage()
    set_modes(iommu, negative=True)
    assert iommu.translate(req(0x4000_0000)).cause == 13     # root entry V=0: 1 GiB
    b.map(SV39, pt, 0x4000_0000 + 0x1234_5000, DATA)
    assert iommu.translate(req(0x4000_0000 + 0x1234_5000)).cause == 13
    iommu.invalidate_vma(False, 0, False, 0, True, 0x4000_0000 + 0x1234_5000)
    assert iommu.translate(req(0x4000_0000 + 0x1234_5000)).address == DATA


def test_negative_g_stage_pte_until_iotinval_gvma():
    iommu, b, root = make_iommu()
    set_modes(iommu, negative=True)
    g = b.root(SV39X4)
    b.set_dc(root, 3, DID, 64, iohgatp=atp(8, g >> 12, GSCID))
    b.map(SV39X4, g, 0x6000, DATA)
    assert iommu.translate(req(0x5000)).cause == 21
    b.map(SV39X4, g, 0x5000, DATA)
    assert iommu.translate(req(0x5000)).cause == 21
    iommu.invalidate_vma(True, GSCID, False, 0, False, 0)       # VMA: not G-stage
    assert iommu.translate(req(0x5000)).cause == 21
    iommu.invalidate_gvma(True, GSCID, True, 0x5000)
    assert iommu.translate(req(0x5000)).address == DATA


def test_negative_process_context_until_iodir_inval_pdt():
    iommu, b, root = make_iommu()
    set_modes(iommu, negative=True)
    pdt = b.alloc()
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 5, fsc=atp(1, pdt >> 12))
    assert iommu.translate(req(0x5000, pid=7)).cause == 266
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA)
    b.set_pc(pdt, 1, 7, ta=PSCID << 12 | 1, fsc=atp(8, pt >> 12))
    assert iommu.translate(req(0x5000, pid=7)).cause == 266
    iommu.invalidate_pdt(DID, 8)
    assert iommu.translate(req(0x5000, pid=7)).cause == 266
    iommu.invalidate_pdt(DID, 7)
    assert iommu.translate(req(0x5000, pid=7)).address == DATA


def test_negative_msi_pte_until_iotinval_gvma():
    iommu, b, root = make_iommu()
    set_modes(iommu, negative=True)
    msipt = b.alloc()
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, msipt >> 12), msi_mask=0,
             msi_pattern=0x2800_0000 >> 12)
    assert iommu.translate(req(0x2800_0000, access=Access.WRITE)).cause == 262
    b.write64(msipt, 1 | 3 << 1 | (DATA >> 12) << 10)
    assert iommu.translate(req(0x2800_0000, access=Access.WRITE)).cause == 262
    iommu.invalidate_gvma(True, 0, True, 0x2800_0000)
    assert iommu.translate(req(0x2800_0000, access=Access.WRITE)).address == DATA


def test_negative_entries_are_never_a_positive_hit():
    """A negative IOTLB entry never answers a lookup of the positive cache."""
    iommu, b, _, pt = first_stage()
    set_modes(iommu, negative=True)
    iommu.translate(req(0x5000))
    assert len(iommu.caches.iotlb) == 0 and len(iommu.caches.negative.iotlb) == 1
    assert isinstance(iommu.translate(req(0x5000)), Fault)
