"""MSI address translation is never bypassed by a large translation (spec v1.0.1 §3.3
step 18): a G-stage or first-stage superpage, an identity (Bare) stage, or an IOTLB entry
filled by another device must not carry an access to an interrupt-file page past the
MSI page table."""

from __future__ import annotations

import pytest
from iommu_tables import RAM_BASE, atp, make_iommu

from vfiouser_iommu.iommu import Access, Request, Translation
from vfiouser_iommu.iommu.walk import SV39, SV39X4

DID = 0x21
OTHER = 0x22
GSCID = 0x9
PSCID = 0x44
IMSIC = RAM_BASE + (2 << 20)          # the "interrupt file" SPA (plain RAM in the test)
FILE_GPA = 0x2800_0000                # interrupt files: GPA pages 0x28000..0x28007
MASK = 0x7
GIB = 1 << 30
MIB2 = 2 << 20


def basic(ppn_addr: int) -> int:
    return 1 | 3 << 1 | (ppn_addr >> 12) << 10


def req(iova: int, did: int = DID, access: Access = Access.WRITE) -> Request:
    return Request(did, None, iova, access)


def _msi_table(b, index: int = 2) -> int:
    msipt = b.alloc()
    b.write64(msipt + index * 16, basic(IMSIC))
    return msipt


def _g_stage_superpage(size: int, index: int = 2):
    """DID behind a G-stage whose one leaf of `size` covers the interrupt files."""
    iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    base = FILE_GPA & ~(size - 1)
    b.map(SV39X4, groot, base, RAM_BASE, size)
    msipt = _msi_table(b, index)
    b.set_dc(root, 3, DID, 64, iohgatp=atp(8, groot >> 12, GSCID),
             msiptp=atp(1, msipt >> 12), msi_mask=MASK, msi_pattern=FILE_GPA >> 12)
    return iommu, b, root, groot, base


def _covers_file(t: Translation, gpa: int) -> bool:
    """Whether the region `t` reports as translated linearly holds GPA page `gpa`."""
    base = t.gpa & ~(t.page_size - 1)
    return base <= gpa < base + t.page_size


@pytest.mark.parametrize("size", [MIB2, GIB])
def test_ordinary_access_then_msi_access_in_a_g_stage_superpage(size):
    iommu, _, _, _, base = _g_stage_superpage(size)
    ordinary = iommu.translate(req(base + 0x1_0000))
    assert ordinary.address == RAM_BASE + 0x1_0000 and not ordinary.msi
    assert not _covers_file(ordinary, FILE_GPA + 0x2000)
    t = iommu.translate(req(FILE_GPA + 0x2004))
    assert (t.address, t.msi, t.page_size) == (IMSIC + 4, True, 4096)


def test_msi_access_after_first_stage_superpage_hit():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x4000_0000, FILE_GPA & ~(MIB2 - 1), MIB2)
    msipt = _msi_table(b)
    b.set_dc(root, 3, DID, 64, ta=PSCID << 12, fsc=atp(8, pt >> 12),
             msiptp=atp(1, msipt >> 12), msi_mask=MASK, msi_pattern=FILE_GPA >> 12)
    iova_of_file = 0x4000_0000 + (FILE_GPA & (MIB2 - 1)) + 0x2000
    ordinary = iommu.translate(req(0x4010_0000))
    assert not ordinary.msi and ordinary.page_size < MIB2
    t = iommu.translate(req(iova_of_file + 8))
    assert (t.address, t.msi) == (IMSIC + 8, True)


def test_bare_stages_report_no_page_holding_an_interrupt_file():
    iommu, b, root = make_iommu()
    msipt = _msi_table(b)
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, msipt >> 12), msi_mask=MASK,
             msi_pattern=FILE_GPA >> 12)
    ordinary = iommu.translate(req(0x1000))
    assert ordinary.address == 0x1000 and not ordinary.msi
    assert not _covers_file(Translation(0x1000, ordinary.page_size, gpa=0x1000), FILE_GPA)
    far = iommu.translate(req(0x1_0000_0000))       # a GiB without interrupt files
    assert far.page_size == GIB
    assert iommu.translate(req(FILE_GPA + 0x2000)).msi


def test_dma_straddling_an_interrupt_file_page_with_bare_stages():
    # The interrupt files sit in RAM here so that a write-through would be visible.
    file_gpa = RAM_BASE + (40 << 20)
    iommu, b, root = make_iommu()
    msipt = _msi_table(b, index=0)
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, msipt >> 12), msi_mask=MASK,
             msi_pattern=file_gpa >> 12)
    dma = iommu.dma_view(DID)
    dma.write(file_gpa - 4, b"abcdefgh")
    assert iommu.memory.read(file_gpa - 4, 4) == b"abcd"
    assert iommu.memory.read(IMSIC, 4) == b"efgh"          # through the MSI PTE
    assert iommu.memory.read(file_gpa, 4) == bytes(4)      # not written through
    assert dma.pieces(file_gpa - 4, 8, True, dma.attrs) == [(file_gpa - 4, 4, None),
                                                            (IMSIC, 4, None)]


def test_dma_straddling_an_interrupt_file_page_in_a_g_stage_superpage():
    iommu, *_ = _g_stage_superpage(GIB, index=0)
    dma = iommu.dma_view(DID)
    assert dma.pieces(FILE_GPA - 4, 8, True, dma.attrs) == [(RAM_BASE + FILE_GPA - 4, 4, None),
                                                            (IMSIC, 4, None)]


def test_devices_with_different_msi_patterns_share_gscid_and_pscid():
    iommu, b, root, groot, base = _g_stage_superpage(GIB)
    # OTHER: same G-stage and GSCID, no MSI page table: the file GPA is ordinary memory.
    b.set_dc(root, 3, OTHER, 64, iohgatp=atp(8, groot >> 12, GSCID))
    plain = iommu.translate(req(FILE_GPA + 0x2000, did=OTHER))
    assert plain.address == RAM_BASE + FILE_GPA + 0x2000 and plain.page_size == GIB
    t = iommu.translate(req(FILE_GPA + 0x2000))
    assert (t.address, t.msi) == (IMSIC, True)
    ordinary = iommu.translate(req(base + 0x1_0000))
    assert not _covers_file(ordinary, FILE_GPA + 0x2000)
    assert iommu.translate(req(FILE_GPA + 0x2000)).msi
