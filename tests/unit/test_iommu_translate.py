"""Translation process (spec §3.3): ddtp modes, DDT walk and DC checks, first stage,
G-stage and nested walks, with the exact fault records."""

from __future__ import annotations

from dataclasses import replace

import pytest
from iommu_tables import (
    LEAF_RW,
    LEAF_RWX,
    RAM_BASE,
    A,
    D,
    R,
    U,
    V,
    W,
    X,
    atp,
    make_iommu,
)

from vfiouser_iommu.iommu import (
    Access,
    Fault,
    HpmEvent,
    IommuConfig,
    Request,
    RequestKind,
    Translation,
)
from vfiouser_iommu.iommu.walk import SV32, SV32X4, SV39, SV39X4, SV48, SV48X4, SV57, SV57X4

DID = 0x10
DATA = RAM_BASE + (1 << 20)
MIB2 = 2 << 20
GIB = 1 << 30


def req(iova, access=Access.READ, did=DID, pid=None, priv=False, kind=RequestKind.UNTRANSLATED):
    return Request(did, pid, iova, access, priv, kind)


def fault(cause, ttyp, iotval, iotval2=0, did=DID, pid=None, priv=False):
    return Fault(cause, ttyp, iotval, iotval2, did, pid, priv)


# -- ddtp Off / Bare ----------------------------------------------------------------------
def test_off_faults_256_and_reports():
    iommu, _, _ = make_iommu()
    iommu.set_register("ddtp", 0)
    assert iommu.translate(req(0x1000, Access.WRITE)) == fault(256, 3, 0x1000)
    assert list(iommu.recent_faults) == [fault(256, 3, 0x1000)]


def test_bare_passes_untranslated_and_refuses_others():
    iommu, _, _ = make_iommu()
    iommu.set_register("ddtp", 1)
    t = iommu.translate(req(0x8000_1234))
    assert isinstance(t, Translation) and t.address == 0x8000_1234
    assert iommu.translate(req(0x1000, kind=RequestKind.TRANSLATED)) == fault(260, 6, 0x1000)
    assert iommu.translate(req(0x1000, kind=RequestKind.ATS_TRANSLATION)) == \
        fault(260, 8, 0x1000)


# -- device directory ---------------------------------------------------------------------
@pytest.mark.parametrize("msi_flat", [False, True])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ddt_walk_every_depth_and_format(levels, msi_flat):
    config = IommuConfig(msi_flat=msi_flat)
    iommu, b, root = make_iommu(config, levels)
    max_bits = {1: 6, 2: 15, 3: 24}[levels] + (0 if msi_flat else 1)
    max_bits = min(max_bits, 24)
    for did in {0, 1, (1 << max_bits) - 1, 0x5A & ((1 << max_bits) - 1)}:
        b.set_dc(root, levels, did, config.dc_size)
        t = iommu.translate(req(0x1234, did=did))
        assert isinstance(t, Translation) and t.address == 0x1234
    if max_bits < 24:
        too_wide = 1 << max_bits
        assert iommu.translate(req(0x1234, did=too_wide)) == fault(260, 2, 0x1234, did=too_wide)


def test_dc_not_valid_258_and_ddte_faults():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64, tc=0)
    assert iommu.translate(req(0x5000)) == fault(258, 2, 0x5000)
    assert iommu.translate(req(0x5000, did=1 << 20)) == fault(258, 2, 0x5000, did=1 << 20)
    b.write64(root, 1 | 1 << 1)  # root DDTE for DDI[2]=0 now has a reserved bit
    iommu.invalidate_ddt(False, 0)
    assert iommu.translate(req(0x5000)) == fault(259, 2, 0x5000)
    b.write64(root, 1 | (0x100_0000 >> 12) << 10)  # points outside RAM
    assert iommu.translate(req(0x5000)).cause == 257


def test_ddtp_outside_ram_is_257():
    iommu, _, _ = make_iommu(levels=1)
    iommu.set_register("ddtp", (0x1000 >> 12) << 10 | 2)
    assert iommu.translate(req(0, Access.EXECUTE)) == fault(257, 1, 0)


def _cfg(**kw):
    return IommuConfig(**kw)


MISCONFIGURED = [
    ("tc reserved", {}, dict(tc=1 | 1 << 12)),
    ("tc high reserved", {}, dict(tc=1 | 1 << 40)),
    ("ta reserved", {}, dict(ta=1)),
    ("ta RCID without QOSID", {}, dict(ta=1 << 40)),
    ("fsc reserved", {}, dict(fsc=1 << 44)),
    ("EN_ATS without ATS", {"ats": False}, dict(tc=1 | 2)),
    ("T2GPA without EN_ATS", {}, dict(tc=1 | 8, iohgatp=atp(8, 4))),
    ("EN_PRI without EN_ATS", {}, dict(tc=1 | 4)),
    ("PRPR without EN_PRI", {}, dict(tc=1 | 2 | 64)),
    ("T2GPA without cap", {"t2gpa": False}, dict(tc=1 | 2 | 8, iohgatp=atp(8, 4))),
    ("T2GPA with Bare G-stage", {}, dict(tc=1 | 2 | 8)),
    ("pdtp reserved mode", {}, dict(tc=1 | 32, fsc=atp(4, 0))),
    ("PD20 unsupported", {"pd20": False}, dict(tc=1 | 32, fsc=atp(3, 0))),
    ("iosatp reserved mode", {}, dict(fsc=atp(11, 0))),
    ("Sv57 unsupported", {"sv57": False}, dict(fsc=atp(10, 0))),
    ("DPE without PDTV", {}, dict(tc=1 | 1 << 9)),
    ("iohgatp reserved mode", {}, dict(iohgatp=atp(7, 0))),
    ("Sv48x4 unsupported", {"sv48x4": False}, dict(iohgatp=atp(9, 0))),
    ("iohgatp root not 16K aligned", {}, dict(iohgatp=atp(8, 0x80001))),
    ("msiptp reserved mode", {}, dict(msiptp=atp(2, 0))),
    ("msiptp reserved bits", {}, dict(msiptp=1 << 44)),
    ("msi mask reserved", {}, dict(msi_mask=1 << 60)),
    ("SADE without AMO_HWAD", {"amo_hwad": False}, dict(tc=1 | 1 << 8)),
    ("SBE != BE without END", {}, dict(tc=1 | 1 << 10)),
    ("SXL=1 with GXL fixed 0", {}, dict(tc=1 | 1 << 11)),
]


@pytest.mark.parametrize("caps,dc", [m[1:] for m in MISCONFIGURED],
                         ids=[m[0] for m in MISCONFIGURED])
def test_dc_misconfigured_259(caps, dc):
    config = _cfg(**caps)
    iommu, b, root = make_iommu(config)
    b.set_dc(root, 3, DID, config.dc_size, **dc)
    assert iommu.translate(req(0x7000, Access.WRITE)) == fault(259, 3, 0x7000)


def test_dc_reserved_dw7_of_extended_format():
    iommu, b, root = make_iommu()
    slot = b.set_dc(root, 3, DID, 64)
    b.write64(slot + 56, 1)
    assert iommu.translate(req(0)).cause == 259


def test_sxl_requires_gxl_rules():
    config = IommuConfig(sv32=True, sv32x4=True)
    iommu, b, root = make_iommu(config)
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 11)     # SXL=1 legal: GXL is writable
    assert isinstance(iommu.translate(req(0)), Translation)
    iommu.set_register("fctl", 4)                  # GXL=1 needs SXL=1
    b.set_dc(root, 3, DID + 1, 64, tc=1)
    assert iommu.translate(req(0, did=DID + 1)).cause == 259


def test_transaction_checks_260():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)
    assert iommu.translate(req(0x3000, kind=RequestKind.TRANSLATED)) == fault(260, 6, 0x3000)
    assert iommu.translate(req(0x3000, pid=5, priv=True)) == fault(260, 2, 0x3000, pid=5,
                                                                     priv=True)


def test_translated_request_without_t2gpa_is_passed_through():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64, tc=1 | 2)
    t = iommu.translate(req(0x8000_3000, Access.WRITE, kind=RequestKind.TRANSLATED))
    assert t.address == 0x8000_3000
    assert iommu.translate(req(0x3000, Access.EXECUTE, kind=RequestKind.TRANSLATED)) == \
        fault(260, 5, 0x3000)


def test_dtf_suppresses_translation_faults_but_not_ddt_faults():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, tc=1 | 16, ta=7 << 12, fsc=atp(8, pt >> 12))
    assert iommu.translate(req(0x1000)) == fault(13, 2, 0x1000)
    assert not iommu.recent_faults
    b.set_dc(root, 3, DID + 1, 64, tc=16)
    assert iommu.translate(req(0x1000, did=DID + 1)).cause == 258
    assert len(iommu.recent_faults) == 1


# -- first stage ----------------------------------------------------------------------------
FIRST_STAGE = [(8, SV39), (9, SV48), (10, SV57)]


@pytest.mark.parametrize("mode_id,mode", FIRST_STAGE, ids=lambda m: getattr(m, "name", m))
def test_first_stage_every_level(mode_id, mode):
    iommu, b, root = make_iommu()
    pt = b.root(mode)
    b.set_dc(root, 3, DID, 64, ta=0x42 << 12, fsc=atp(mode_id, pt >> 12))
    top = 1 << (mode.va_bits - 1)
    cases = [(0x4000_1000, DATA, 4096), (0x60_0000, RAM_BASE + (4 << 20), MIB2)]
    cases.append((2 * GIB, RAM_BASE, GIB) if mode is not SV57 else (2 * GIB, RAM_BASE, GIB))
    if mode.levels >= 4:
        cases.append((1 << 39, RAM_BASE & ~((1 << 39) - 1), 1 << 39))
    for va, pa, size in cases:
        b.map(mode, pt, va, pa, size)
        t = iommu.translate(req(va + 0x123, Access.WRITE))
        assert (t.address, t.page_size, t.r, t.w) == (pa + 0x123, size, True, True), hex(va)
    # an upper-half (sign-extended) IOVA
    hi = (-top) & ((1 << 64) - 1)
    b.map(mode, pt, hi, DATA, 4096)
    assert iommu.translate(req(hi + 8)).address == DATA + 8
    bad = top  # bit va_bits-1 set but not sign-extended
    assert iommu.translate(req(bad)) == fault(13, 2, bad)


def test_first_stage_sv32_with_sxl():
    config = IommuConfig(sv32=True, sv32x4=True)
    iommu, b, root = make_iommu(config)
    pt = b.root(SV32)
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 11, fsc=atp(8, pt >> 12))
    b.map(SV32, pt, 0x1234_5000, DATA, 4096)
    b.map(SV32, pt, 0x8040_0000, RAM_BASE + (4 << 20), 4 << 20)
    assert iommu.translate(req(0x1234_5678)).address == DATA + 0x678
    t = iommu.translate(req(0x8040_0010))
    assert (t.address, t.page_size) == (RAM_BASE + (4 << 20) + 0x10, 4 << 20)
    assert iommu.translate(req(1 << 32)) == fault(13, 2, 1 << 32)


def test_napot_64k():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12))
    b.map(SV39, pt, 0x1_0000, RAM_BASE + 0x30_0000, napot=True)
    t = iommu.translate(req(0x1_5678))
    assert (t.address, t.page_size) == (RAM_BASE + 0x30_5678, 1 << 16)
    slot = b.map(SV39, pt, 0x2_0000, RAM_BASE, 4096)
    b.write_pte(slot, 1 << 63 | ((RAM_BASE >> 12) | 0b0100) << 10 | LEAF_RW, 8)  # bad napot
    assert iommu.translate(req(0x2_0000)) == fault(13, 2, 0x2_0000)


def _one_pte_case(pte_bits: int, access=Access.READ, priv=False, pc_ta=None):
    """Map 0x5000 with a leaf of `pte_bits` and translate it."""
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12))
    slot = b.map(SV39, pt, 0x5000, DATA)
    b.write_pte(slot, pte_bits, 8)
    return iommu.translate(req(0x5000, access, priv=priv)), iommu, b, slot


PPN = (DATA >> 12) << 10


@pytest.mark.parametrize("name,bits,access,cause", [
    ("V=0", PPN | R | W | A | D | U, Access.READ, 13),
    ("W without R", PPN | V | W | A | D | U, Access.WRITE, 15),
    ("no X", PPN | V | R | W | A | D | U, Access.EXECUTE, 12),
    ("read-only write", PPN | V | R | A | D | U, Access.WRITE, 15),
    ("U=0 for user", PPN | V | R | W | A | D, Access.READ, 13),
    ("reserved 60:54", PPN | LEAF_RW | 1 << 54, Access.READ, 13),
    ("PBMT=3", PPN | LEAF_RW | 3 << 61, Access.READ, 13),
    ("N on 4K non-napot", PPN | LEAF_RW | 1 << 63, Access.READ, 13),
    ("A=0, no SADE", PPN | V | R | W | D | U, Access.READ, 13),
    ("D=0 write, no SADE", PPN | V | R | W | A | U, Access.WRITE, 15),
])
def test_leaf_pte_faults(name, bits, access, cause):
    result, *_ = _one_pte_case(bits, access)
    ttyp = {Access.READ: 2, Access.WRITE: 3, Access.EXECUTE: 1}[access]
    assert result == fault(cause, ttyp, 0x5000)


def test_pbmt_reported_with_svpbmt():
    result, *_ = _one_pte_case(PPN | LEAF_RW | 1 << 61)
    assert result.pbmt == 1


def test_non_leaf_with_a_d_u_faults():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12))
    b.map(SV39, pt, 0x5000, DATA)
    entry = b.read64(pt)
    for bit in (A, D, U):
        b.write64(pt, entry | bit)
        iommu.invalidate_vma(False, 0, False, 0, False, 0)
        assert iommu.translate(req(0x5000)) == fault(13, 2, 0x5000)


def test_misaligned_superpage_and_leafless_walk():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12))
    slot = b.map(SV39, pt, 0x20_0000, RAM_BASE, MIB2)
    b.write_pte(slot, ((RAM_BASE + 0x1000) >> 12) << 10 | LEAF_RW, 8)
    assert iommu.translate(req(0x20_0000)) == fault(13, 2, 0x20_0000)
    slot = b.map(SV39, pt, 0x40_0000, DATA)
    b.write_pte(slot, PPN | V, 8)  # a "non-leaf" at level 0
    assert iommu.translate(req(0x40_0000)) == fault(13, 2, 0x40_0000)


def test_hardware_ad_update():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 8, fsc=atp(8, pt >> 12))
    slot = b.map(SV39, pt, 0x5000, DATA, flags=V | R | W | U)
    assert iommu.translate(req(0x5000)).address == DATA
    assert b.read64(slot) & (A | D) == A
    assert iommu.translate(req(0x5000, Access.WRITE)).address == DATA
    assert b.read64(slot) & (A | D) == A | D


# -- privilege, PASID, process contexts ---------------------------------------------------------
def _pasid_setup(pc_ta_bits: int, leaf_flags: int, pd_mode=1, pid=5, dpe=False):
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA, flags=leaf_flags)
    levels = {1: 1, 2: 2, 3: 3}[pd_mode]
    pdt = b.alloc()
    b.set_dc(root, 3, DID, 64, tc=1 | 32 | (1 << 9 if dpe else 0), fsc=atp(pd_mode, pdt >> 12))
    b.set_pc(pdt, levels, pid, pc_ta_bits | 9 << 12, atp(8, pt >> 12))
    return iommu, b, pdt


@pytest.mark.parametrize("pd_mode,pid", [(1, 0xAB), (2, 0x1_2345), (3, 0xF_ABCD)])
def test_pdt_walk_every_depth(pd_mode, pid):
    iommu, b, _ = _pasid_setup(1, LEAF_RW, pd_mode, pid)
    assert iommu.translate(req(0x5010, pid=pid)).address == DATA + 0x10
    too_wide = {1: 0x100, 2: 0x2_0000, 3: None}[pd_mode]
    if too_wide is not None:
        assert iommu.translate(req(0x5010, pid=too_wide)) == fault(260, 2, 0x5010, pid=too_wide)


def test_privileged_requests_ens_and_sum():
    user_page = LEAF_RW
    kernel_page = LEAF_RW & ~U
    iommu, *_ = _pasid_setup(1, kernel_page)
    assert iommu.translate(req(0x5000, pid=5, priv=True)) == fault(260, 2, 0x5000, pid=5,
                                                                     priv=True)
    iommu, *_ = _pasid_setup(1 | 2, kernel_page)           # ENS
    assert iommu.translate(req(0x5000, pid=5, priv=True)).address == DATA
    assert iommu.translate(req(0x5000, pid=5)) == fault(13, 2, 0x5000, pid=5)
    iommu, *_ = _pasid_setup(1 | 2, user_page)             # S-mode on U page, SUM=0
    assert iommu.translate(req(0x5000, pid=5, priv=True)) == fault(13, 2, 0x5000, pid=5,
                                                                     priv=True)
    iommu, *_ = _pasid_setup(1 | 2 | 4, user_page | X)     # SUM=1: R/W ok, never execute
    assert iommu.translate(req(0x5000, pid=5, priv=True)).address == DATA
    assert iommu.translate(req(0x5000, Access.EXECUTE, pid=5, priv=True)) == \
        fault(12, 1, 0x5000, pid=5, priv=True)


def test_pc_faults_266_267_265():
    iommu, b, pdt = _pasid_setup(0, LEAF_RW)                 # PC V=0
    assert iommu.translate(req(0x5000, pid=5)) == fault(266, 2, 0x5000, pid=5)
    iommu, b, pdt = _pasid_setup(1 | 1 << 3, LEAF_RW)        # reserved ta bit
    assert iommu.translate(req(0x5000, pid=5)) == fault(267, 2, 0x5000, pid=5)
    iommu, b, pdt = _pasid_setup(1, LEAF_RW, pd_mode=2)
    b.write64(pdt, 1 | 1 << 2)                               # non-leaf PDTE reserved bit
    assert iommu.translate(req(0x5000, pid=5)) == fault(267, 2, 0x5000, pid=5)
    b.write64(pdt, 0)
    iommu.invalidate_ddt(False, 0)
    assert iommu.translate(req(0x5000, pid=5)) == fault(266, 2, 0x5000, pid=5)
    b.write64(pdt, 1 | (0x10_0000 >> 12) << 10)             # outside RAM
    assert iommu.translate(req(0x5000, pid=5)) == fault(265, 2, 0x5000, pid=5)


def test_dpe_uses_process_id_zero():
    iommu, *_ = _pasid_setup(1, LEAF_RW, pid=0, dpe=True)
    assert iommu.translate(req(0x5000)).address == DATA
    iommu, *_ = _pasid_setup(1, LEAF_RW, pid=0, dpe=False)
    assert iommu.translate(req(0x5000)).address == 0x5000  # first stage Bare


# -- G-stage and nested ---------------------------------------------------------------------------
G_STAGE = [(8, SV39X4), (9, SV48X4), (10, SV57X4)]
GSCID = 0x77
GPA_OFF = RAM_BASE  # the nested tests' G-stage maps GPA x -> SPA x + RAM_BASE


def _identity_gstage(b, mode, root, gpa_size=64 << 20):
    for gpa in range(0, gpa_size, MIB2):
        b.map(mode, root, gpa, gpa + GPA_OFF, MIB2, flags=LEAF_RWX)


@pytest.mark.parametrize("mode_id,mode", G_STAGE, ids=lambda m: getattr(m, "name", m))
def test_g_stage_only_widened_root(mode_id, mode):
    iommu, b, root = make_iommu()
    groot = b.root(mode)
    b.set_dc(root, 3, DID, 64, iohgatp=atp(mode_id, groot >> 12, GSCID))
    widest = 1 << (mode.va_bits - 1)             # uses the 2 extra root index bits
    b.map(mode, groot, widest + 0x3000, DATA, flags=LEAF_RW)
    t = iommu.translate(req(widest + 0x3004, Access.WRITE))
    assert (t.address, t.gpa) == (DATA + 4, widest + 0x3004)
    too_wide = 1 << mode.va_bits
    assert iommu.translate(req(too_wide)) == fault(21, 2, too_wide, too_wide)
    b.map(mode, groot, 0x9000, DATA, flags=LEAF_RW & ~U)  # G-stage leaf needs U
    assert iommu.translate(req(0x9008, Access.WRITE)) == fault(23, 3, 0x9008, 0x9008)


def test_g_stage_sv32x4_with_gxl():
    config = IommuConfig(sv32=True, sv32x4=True)
    iommu, b, root = make_iommu(config)
    iommu.set_register("fctl", 4)
    groot = b.root(SV32X4)
    b.set_dc(root, 3, DID, 64, tc=1 | 1 << 11, iohgatp=atp(8, groot >> 12, GSCID))
    b.map(SV32X4, groot, 0x3_0000_0000, DATA, flags=LEAF_RW)
    assert iommu.translate(req(0x3_0000_0010)).address == DATA + 0x10
    assert iommu.translate(req(1 << 34)) == fault(21, 2, 1 << 34, 1 << 34)


def _nested(fs_mode_id=8, fs_mode=SV39, gs_mode_id=8, gs_mode=SV39X4, tc=1):
    iommu, b, root = make_iommu()
    groot = b.root(gs_mode)
    _identity_gstage(b, gs_mode, groot)
    gb = replace(b, offset=GPA_OFF)   # first-stage tables are addressed by GPA
    fs_root = gb.root(fs_mode)
    b.set_dc(root, 3, DID, 64, tc=tc, ta=3 << 12, fsc=atp(fs_mode_id, fs_root >> 12),
             iohgatp=atp(gs_mode_id, groot >> 12, GSCID))
    return iommu, b, gb, fs_root, groot


@pytest.mark.parametrize("fs", FIRST_STAGE, ids=lambda m: getattr(m, "name", m))
@pytest.mark.parametrize("gs", G_STAGE, ids=lambda m: getattr(m, "name", m))
def test_nested_translation(fs, gs):
    iommu, b, gb, fs_root, _ = _nested(fs[0], fs[1], gs[0], gs[1])
    gb.map(fs[1], fs_root, 0x7000_0000, 0x10_0000)      # IOVA -> GPA 1 MiB
    t = iommu.translate(req(0x7000_0abc, Access.WRITE))
    assert (t.address, t.gpa) == (RAM_BASE + 0x10_0abc, 0x10_0abc)


def test_nested_implicit_access_guest_page_fault():
    iommu, b, gb, fs_root, groot = _nested()
    gb.map(SV39, fs_root, 0x7000_0000, 0x10_0000)
    # Remove the G-stage mapping of the first-stage root's 2 MiB page.
    slot = b.map(SV39X4, groot, fs_root & ~(MIB2 - 1), 0, MIB2, flags=0)
    b.write_pte(slot, 0, 8)
    iommu.invalidate_gvma(True, GSCID, False, 0)
    pte_gpa = fs_root + (0x7000_0000 >> 30) * 8
    assert iommu.translate(req(0x7000_0000, Access.WRITE)) == \
        fault(23, 3, 0x7000_0000, pte_gpa | 1)


def test_nested_ad_update_needs_g_stage_write():
    iommu, b, gb, fs_root, groot = _nested(tc=1 | 1 << 8)   # SADE
    leaf = gb.map(SV39, fs_root, 0x7000_0000, 0x10_0000, flags=V | R | W | U)
    table_page = leaf & ~(MIB2 - 1)
    b.map(SV39X4, groot, table_page, table_page + GPA_OFF, MIB2, flags=V | R | U | A | D)
    iommu.invalidate_gvma(True, GSCID, False, 0)
    assert iommu.translate(req(0x7000_0000)) == fault(21, 2, 0x7000_0000, leaf | 3)
    b.map(SV39X4, groot, table_page, table_page + GPA_OFF, MIB2, flags=LEAF_RW)
    iommu.invalidate_gvma(True, GSCID, True, table_page)
    assert iommu.translate(req(0x7000_0000)).address == RAM_BASE + 0x10_0000
    assert gb.read64(leaf) & A


def test_nested_pdt_through_g_stage():
    iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    _identity_gstage(b, SV39X4, groot)
    gb = replace(b, offset=GPA_OFF)
    pdt = gb.alloc()
    fs_root = gb.root(SV39)
    gb.map(SV39, fs_root, 0x5000, 0x20_0000)
    gb.set_pc(pdt, 1, 7, 1 | 4 << 12, atp(8, fs_root >> 12))
    b.set_dc(root, 3, DID, 64, tc=1 | 32, fsc=atp(1, pdt >> 12),
             iohgatp=atp(8, groot >> 12, GSCID))
    assert iommu.translate(req(0x5000, pid=7)).address == RAM_BASE + 0x20_0000
    # The PDT's G-stage mapping goes away: guest page fault on an implicit access.
    slot = b.map(SV39X4, groot, pdt & ~(MIB2 - 1), 0, MIB2, flags=0)
    b.write_pte(slot, 0, 8)
    iommu.invalidate_gvma(False, 0, False, 0)
    iommu.invalidate_ddt(False, 0)
    assert iommu.translate(req(0x5000, pid=7)) == fault(21, 2, 0x5000, (pdt + 7 * 16) | 1,
                                                         pid=7)


def test_hpm_events_counted():
    iommu, b, gb, fs_root, _ = _nested()
    gb.map(SV39, fs_root, 0x7000_0000, 0x10_0000)
    iommu.translate(req(0x7000_0000))
    iommu.translate(req(0x7000_0008))
    c = iommu.counters
    assert c[HpmEvent.UNTRANSLATED_REQ] == 2
    assert c[HpmEvent.DDT_WALK] == 1 and c[HpmEvent.IOTLB_MISS] == 1
    assert c[HpmEvent.S_STAGE_WALK] == 1 and c[HpmEvent.G_STAGE_WALK] >= 1
