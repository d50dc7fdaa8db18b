"""`DmaView.map_sg`: zero-copy scatter-gather views of guest RAM for a device's buffers,
with the same translation, permission, fault and poison rules as `read`/`write`, on the
identity view and through the IOMMU (paging domain, MRIF pages)."""

from __future__ import annotations

import pytest
from iommu_tables import RAM_BASE, atp, make_iommu

from vfiouser_iommu.iommu.walk import SV39
from vfiouser_iommu.memory import DmaError, DmaView, GuestMemory

RAM = 0x8000_0000
DID = 0x21
DATA = RAM_BASE + (1 << 20)


class RecordingFallback:
    def __init__(self):
        self.writes = []

    def read(self, gpa, length):
        return bytes(length)

    def write(self, gpa, data):
        self.writes.append((gpa, data))


def test_views_cover_the_buffers_in_order_and_write_through():
    mem = GuestMemory.ram(RAM, 0x10000)
    mem.write(RAM + 0x100, b"abcdef")
    mem.write(RAM + 0x800, b"XYZ")
    views = DmaView(mem).map_sg([(RAM + 0x100, 6), (RAM + 0x800, 3)], write=True)
    assert [bytes(v) for v in views] == [b"abcdef", b"XYZ"]
    views[1][:] = b"123"
    assert mem.read(RAM + 0x800, 3) == b"123"


def test_adjacent_buffers_merge_into_one_view():
    mem = GuestMemory.ram(RAM, 0x10000)
    views = DmaView(mem).map_sg([(RAM, 0x1000), (RAM + 0x1000, 0x1000), (RAM + 0x3000, 8),
                                 (RAM + 0x3008, 0)], write=False)
    assert [len(v) for v in views] == [0x2000, 8]


def test_read_views_are_read_only():
    mem = GuestMemory.ram(RAM, 0x1000)
    (view,) = DmaView(mem).map_sg([(RAM, 16)], write=False)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1


def test_unmapped_buffer_raises_before_anything_moves():
    mem = GuestMemory.ram(RAM, 0x1000)
    with pytest.raises(DmaError):
        DmaView(mem).map_sg([(RAM, 16), (RAM + 0x2000, 16)], write=True)
    with pytest.raises(DmaError):  # crosses the end of the region
        DmaView(mem).map_sg([(RAM + 0xFF0, 32)], write=False)


def test_memory_only_the_fallback_reaches_gives_none():
    mem = GuestMemory.ram(RAM, 0x1000)
    mem.fallback = RecordingFallback()
    assert DmaView(mem).map_sg([(RAM, 16), (0x1000, 4)], write=True) is None
    assert mem.fallback.writes == []


def test_read_only_region_refuses_device_writes():
    mem = GuestMemory()
    mem.add_region(RAM, memoryview(bytes(0x1000)))
    assert DmaView(mem).map_sg([(RAM, 16)], write=False)
    with pytest.raises(DmaError):
        DmaView(mem).map_sg([(RAM, 16)], write=True)


def test_poison_fails_reads_only():
    mem = GuestMemory.ram(RAM, 0x2000)
    mem.poison(RAM + 0x1004, 1)
    with pytest.raises(DmaError):
        DmaView(mem).map_sg([(RAM + 0x1000, 8)], write=False)
    assert DmaView(mem).map_sg([(RAM + 0x1000, 8)], write=True)
    assert DmaView(mem).map_sg([(RAM, 0x1000)], write=False)


def test_paging_domain_translates_each_page_and_faults():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA + 0x3000)
    b.map(SV39, pt, 0x6000, DATA)
    b.set_dc(root, 3, DID, 64, fsc=atp(8, pt >> 12))
    dma = iommu.dma_view(DID)
    views = dma.map_sg([(0x5FF0, 0x20)], write=True)
    assert [len(v) for v in views] == [0x10, 0x10]
    views[0][:] = b"a" * 16
    views[1][:] = b"b" * 16
    assert iommu.memory.read(DATA + 0x3FF0, 16) == b"a" * 16
    assert iommu.memory.read(DATA, 16) == b"b" * 16
    assert dma.read(0x5FF0, 0x20) == b"a" * 16 + b"b" * 16
    with pytest.raises(DmaError) as e:
        dma.map_sg([(0x5000, 8), (0x6FF0, 0x20)], write=False)
    assert e.value.fault.cause == 13


def test_mrif_page_gives_none():
    from test_iommu_msi_ats_dma import FILE_GPA, MRIF, NOTICE, _msi_setup, mrif_pte

    pte0, pte1 = mrif_pte(MRIF, NOTICE, 0x456)
    iommu, *_ = _msi_setup(pte0, pte1)
    assert iommu.dma_view(0x21).map_sg([(FILE_GPA + 0x2000, 4)], write=True) is None
