"""Debug translation interface through the real core: hit, superpage, fault (§5.24-5.26)."""

import pytest
from test_linux_probe import RAM, Driver, program_msix

from vfiouser_iommu.iommu import IommuConfig, RiscvIommu
from vfiouser_iommu.iommu.debug import napot_ppn
from vfiouser_iommu.memory import GuestMemory

TR_REQ_IOVA, TR_REQ_CTL, TR_RESPONSE, FQT = 0x258, 0x260, 0x268, 0x34
V, R, W, U, A, D = 1, 2, 4, 16, 64, 128
DID = 0x10
PAGE_PA = RAM + 0x5000
SUPER_PA = RAM + 0x40_0000


@pytest.fixture
def driver():
    iommu = RiscvIommu(GuestMemory.ram(RAM, 8 << 20), IommuConfig())
    driver = Driver(iommu)
    program_msix(driver)
    driver.probe()
    mem = iommu.memory
    root, l1, l0 = driver.alloc(4096), driver.alloc(4096), driver.alloc(4096)
    mem.write_u64(root, (l1 >> 12) << 10 | V)                  # VA 0..1 GiB
    mem.write_u64(l1 + 8 * 0, (l0 >> 12) << 10 | V)             # VA 0..2 MiB
    mem.write_u64(l1 + 8 * 2, (SUPER_PA >> 12) << 10 | V | R | W | U | A | D)  # 4 MiB: 2 MiB
    mem.write_u64(l0 + 8 * 1, (PAGE_PA >> 12) << 10 | V | R | U | A)            # 4 KiB page
    shifts, table = (15, 6), driver.root
    for shift in shifts:
        slot = table + 8 * ((DID >> shift) & 0x1FF)
        if not mem.read_u64(slot) & 1:
            mem.write_u64(slot, (driver.alloc(4096) >> 12) << 10 | V)
        table = (mem.read_u64(slot) >> 10) << 12
    dc = table + 64 * (DID & 0x3F)
    mem.write_u64(dc + 16, 5 << 12)                              # ta.PSCID
    mem.write_u64(dc + 24, 8 << 60 | root >> 12)                 # fsc: Sv39
    mem.write_u64(dc, V)
    return driver


def debug_translate(driver, iova, nw=True, split=False):
    driver.wr(TR_REQ_IOVA, iova, 8)
    ctl = DID << 40 | (8 if nw else 0) | 1
    if split:
        driver.wr(TR_REQ_CTL + 4, ctl >> 32)
        assert driver.rd(TR_REQ_CTL + 4) == DID << 8  # high half alone does not start
        driver.wr(TR_REQ_CTL, ctl & 0xFFFF_FFFF)
    else:
        driver.wr(TR_REQ_CTL, ctl, 8)
    assert driver.rd(TR_REQ_CTL, 8) & 1 == 0  # Go/Busy already clear
    return driver.rd(TR_RESPONSE, 8)


@pytest.mark.parametrize("split", [False, True])
def test_debug_hit_4k(driver, split):
    response = debug_translate(driver, 0x1ABC, split=split)
    assert response == (PAGE_PA >> 12) << 10


def test_debug_superpage_reports_napot_size(driver):
    response = debug_translate(driver, 0x40_1000, nw=False)
    assert response & 1 == 0 and response >> 9 & 1
    assert (response >> 10) & ((1 << 44) - 1) == (SUPER_PA >> 12) | 0xFF


def test_debug_fault_sets_fault_bit_and_logs(driver):
    response = debug_translate(driver, 0x1000, nw=False)  # read-only page, write asked
    assert response & 1
    assert driver.rd(FQT) == 1
    fault = driver.iommu.recent_faults[-1]
    assert fault.cause == 15 and fault.device_id == DID


def test_napot_encoding():
    assert napot_ppn(0x1234_5000, 4096) == (0x12345, False)
    assert napot_ppn(0x1234_0000, 64 << 10) == (0x12347, True)
    assert napot_ppn(0x8020_0000, 2 << 20) == (0x802FF, True)
