"""MSI address translation (basic + MRIF with notice MSI, every MSI cause), ATS
Translation completions, PCIe messages, and the IOMMU-backed DmaView."""

from __future__ import annotations

from dataclasses import replace

import pytest
from iommu_tables import LEAF_RW, RAM_BASE, atp, make_iommu

from vfiouser_iommu.iommu import Access, Fault, IommuConfig, Request, RequestKind, Translation
from vfiouser_iommu.iommu.ats import completion_status
from vfiouser_iommu.iommu.msi import extract_bits
from vfiouser_iommu.iommu.walk import SV39, SV39X4
from vfiouser_iommu.memory import DmaAttrs, DmaError

DID = 0x21
DATA = RAM_BASE + (1 << 20)
IMSIC = RAM_BASE + (2 << 20)          # "interrupt files" (plain RAM in the test)
MRIF = RAM_BASE + (3 << 20)
NOTICE = RAM_BASE + (3 << 20) + 0x1000
FILE_GPA = 0x2800_0000                # interrupt-file pages the device sees
MASK = 0x7                            # 8 interrupt files: GPA pages 0x28000..0x28007


def _msi_setup(pte0: int, pte1: int = 0, index: int = 2, config=None, tc=1):
    iommu, b, root = make_iommu(config)
    msipt = b.alloc()
    b.write64(msipt + index * 16, pte0)
    b.write64(msipt + index * 16 + 8, pte1)
    b.set_dc(root, 3, DID, 64, tc=tc, msiptp=atp(1, msipt >> 12), msi_mask=MASK,
             msi_pattern=FILE_GPA >> 12)
    return iommu, b, msipt


def basic(ppn_addr):
    return 1 | 3 << 1 | (ppn_addr >> 12) << 10


def mrif_pte(mrif, nppn_addr, nid):
    return 1 | 1 << 1 | (mrif >> 9) << 7, (nid & 0x3FF) | (nppn_addr >> 12) << 10 | \
        (nid >> 10 & 1) << 60


def w(iova, access=Access.WRITE, **kw):
    return Request(DID, None, iova, access, **kw)


def test_extract_bits():
    assert extract_bits(0b1011_0110, 0b1111_0000) == 0b1011
    assert extract_bits(0b1010, 0b1010) == 0b11
    assert extract_bits(0xFF, 0) == 0


def test_msi_basic_translate_keeps_page_offset():
    iommu, *_ = _msi_setup(basic(IMSIC))
    t = iommu.translate(w(FILE_GPA + 0x2000 + 0x4))
    assert (t.address, t.msi, t.page_size) == (IMSIC + 4, True, 4096)
    other = iommu.translate(w(0x1000))          # not an interrupt-file page: G-stage (Bare)
    assert other.address == 0x1000 and not other.msi


def test_msi_execute_is_access_fault_1():
    iommu, *_ = _msi_setup(basic(IMSIC))
    assert iommu.translate(w(FILE_GPA + 0x2000, Access.EXECUTE)) == \
        Fault(1, 1, FILE_GPA + 0x2000, 0, DID, None, False)


@pytest.mark.parametrize("pte0,cause", [
    (basic(IMSIC) & ~1, 262),                       # V=0
    (basic(IMSIC) | 1 << 63, 263),                  # C=1
    (1 | 0 << 1, 263),                              # M=0
    (1 | 2 << 1, 263),                              # M=2
    (basic(IMSIC) | 1 << 5, 263),                   # reserved bit
])
def test_msi_pte_faults(pte0, cause):
    iommu, *_ = _msi_setup(pte0)
    assert iommu.translate(w(FILE_GPA + 0x2000)) == \
        Fault(cause, 3, FILE_GPA + 0x2000, 0, DID, None, False)


def test_msi_pte_outside_ram_261():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, 0x1000 >> 12), msi_mask=MASK,
             msi_pattern=FILE_GPA >> 12)
    assert iommu.translate(w(FILE_GPA)).cause == 261


def test_mrif_without_capability_is_263():
    pte0, pte1 = mrif_pte(MRIF, NOTICE, 5)
    iommu, *_ = _msi_setup(pte0, pte1, config=IommuConfig(msi_mrif=False))
    assert iommu.translate(w(FILE_GPA + 0x2000)).cause == 263


def test_mrif_sets_pending_bit_and_sends_notice():
    pte0, pte1 = mrif_pte(MRIF, NOTICE, 0x456)
    iommu, b, _ = _msi_setup(pte0, pte1)
    dma = iommu.dma_view(DID)
    dma.write(FILE_GPA + 0x2000, (70).to_bytes(4, "little"))   # identity 70: pair 1, bit 6
    assert iommu.memory.read_int(MRIF + 16, 8) == 1 << 6
    assert iommu.memory.read_int(MRIF + 24, 8) == 0             # enable DW untouched
    assert iommu.memory.read_int(NOTICE, 4) == 0x456
    iommu.memory.write_int(NOTICE, 4, 0)
    dma.write(FILE_GPA + 0x2000, (3000).to_bytes(4, "little"))  # data > 2047: discarded
    assert iommu.memory.read_int(NOTICE, 4) == 0
    assert dma.read(FILE_GPA + 0x2000, 4) == bytes(4)
    with pytest.raises(DmaError):
        dma.write(FILE_GPA + 0x2002, b"\1\0\0\0")
    t = iommu.translate(w(FILE_GPA + 0x2000))
    assert t.mrif is not None and t.u


def test_mrif_outside_ram_is_264():
    pte0, pte1 = mrif_pte(0x1000, NOTICE, 1)
    iommu, *_ = _msi_setup(pte0, pte1)
    with pytest.raises(DmaError) as e:
        iommu.dma_view(DID).write(FILE_GPA + 0x2000, (1).to_bytes(4, "little"))
    assert e.value.fault.cause == 264


def test_debug_request_to_mrif_is_260():
    pte0, pte1 = mrif_pte(MRIF, NOTICE, 1)
    iommu, *_ = _msi_setup(pte0, pte1)
    assert iommu.translate(w(FILE_GPA + 0x2000, debug=True)).cause == 260


def test_msi_with_first_stage_uses_the_gpa():
    iommu, b, root = make_iommu()
    msipt = b.alloc()
    b.write64(msipt + 16, basic(IMSIC))
    pt = b.root(SV39)
    b.map(SV39, pt, 0x4000_0000, FILE_GPA + 0x1000)      # IOVA -> interrupt file 1
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12), msiptp=atp(1, msipt >> 12),
             msi_mask=MASK, msi_pattern=FILE_GPA >> 12)
    assert iommu.translate(w(0x4000_0010)).address == IMSIC + 0x10


# -- ATS ---------------------------------------------------------------------------------------
def _ats_setup(flags=LEAF_RW):
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA, flags=flags)
    b.set_dc(root, 3, DID, 64, tc=1 | 2, fsc=atp(8, pt >> 12))
    return iommu


def ats(iova, access=Access.READ, pid=None):
    return Request(DID, pid, iova, access, kind=RequestKind.ATS_TRANSLATION)


def test_ats_success_with_permissions():
    iommu = _ats_setup()
    t = iommu.translate(ats(0x5123, Access.WRITE))
    assert (t.address, t.page_size, t.r, t.w, t.x, t.u) == (DATA, 4096, True, True, False,
                                                            False)


def test_ats_read_only_page_grants_read_only():
    iommu = _ats_setup(LEAF_RW & ~4)
    t = iommu.translate(ats(0x5000, Access.WRITE))
    assert (t.r, t.w) == (True, False)
    assert not iommu.recent_faults


def test_ats_page_fault_is_success_without_permission_and_no_record():
    iommu = _ats_setup()
    t = iommu.translate(ats(0x9000))
    assert isinstance(t, Translation) and (t.r, t.w) == (False, False)
    assert not iommu.recent_faults


def test_ats_unsupported_request_and_completer_abort():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)                 # EN_ATS=0
    f = iommu.translate(ats(0x5000))
    assert (f.cause, f.ttyp, completion_status(f)) == (260, 8, "UR")
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64, tc=1 | 2, fsc=atp(8, 0x1000 >> 12))   # PT outside RAM
    f = iommu.translate(ats(0x5000))
    assert (f.cause, completion_status(f)) == (5, "CA")


def test_translated_request_with_t2gpa_goes_through_g_stage():
    iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    b.map(SV39X4, groot, 0x1_0000, DATA)
    b.set_dc(root, 3, DID, 64, tc=1 | 2 | 8, iohgatp=atp(8, groot >> 12, 9))
    t = iommu.translate(Request(DID, None, 0x1_0010, Access.WRITE,
                                kind=RequestKind.TRANSLATED))
    assert t.address == DATA + 0x10
    t = iommu.translate(ats(0x1_0010, Access.WRITE))
    assert (t.address, t.page_size, t.w) == (0x1_0000, 4096, True)   # the GPA (T2GPA=1)


@pytest.mark.parametrize("iova,gpa,size", [(0x4000_5000, 0x20_3000, 4096),
                                            (0x4020_0000, 0x20_0000, 2 << 20)])
def test_ats_with_t2gpa_completes_with_the_gpa_that_translated_requests_use(iova, gpa, size):
    iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    for g in range(0, 16 << 20, 2 << 20):                 # GPA g -> SPA RAM_BASE + g
        b.map(SV39X4, groot, g, RAM_BASE + g, 2 << 20)
    gb = replace(b, offset=RAM_BASE)
    fs_root = gb.root(SV39)
    gb.map(SV39, fs_root, iova, gpa, size)                # IOVA -> GPA (first stage)
    b.set_dc(root, 3, DID, 64, tc=1 | 2 | 8, iohgatp=atp(8, groot >> 12, 9),
             fsc=atp(8, fs_root >> 12))
    completion = iommu.translate(ats(iova + 0x123, Access.WRITE))
    assert (completion.address, completion.page_size, completion.r, completion.w) == \
        (gpa, size, True, True)
    # The device's ATC now issues a Translated request at the completion's address.
    t = iommu.translate(Request(DID, None, completion.address + 0x123, Access.WRITE,
                                kind=RequestKind.TRANSLATED))
    assert t.address == RAM_BASE + gpa + 0x123


def test_pcie_messages():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)
    msg = Request(DID, None, 0, kind=RequestKind.PCIE_MESSAGE, message_code=0x04)
    f = iommu.message_context(msg)
    assert (f.cause, f.ttyp, f.iotval) == (260, 9, 0x04)
    b.set_dc(root, 3, DID, 64, tc=1 | 2 | 4)
    iommu.invalidate_ddt(True, DID)
    assert iommu.message_context(msg).en_pri
    iommu.set_register("ddtp", 1)
    assert iommu.message_context(msg).cause == 260


# -- DMA view -------------------------------------------------------------------------------
def test_dma_view_splits_at_page_boundaries_and_faults():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA + 0x3000)
    b.map(SV39, pt, 0x6000, DATA)
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12))
    dma = iommu.dma_view(DID)
    dma.write(0x5FFE, b"abcd")
    assert iommu.memory.read(DATA + 0x3FFE, 2) == b"ab"
    assert iommu.memory.read(DATA, 2) == b"cd"
    assert dma.read(0x5FFE, 4) == b"abcd"
    assert dma.pieces(0x5FFE, 4, False, dma.attrs) == [(DATA + 0x3FFE, 2, None), (DATA, 2, None)]
    with pytest.raises(DmaError) as e:
        dma.read(0x6FFE, 4)
    assert e.value.fault.cause == 13 and e.value.fault.iotval == 0x7000
    with pytest.raises(DmaError):
        dma.read_as(0x5000, 4, DmaAttrs(execute=True))
