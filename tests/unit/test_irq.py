"""Interrupts: ipsr RW1C, one signal per 0→1, msi_cfg_tbl mask/pending, WSI (§5.18, §6)."""

import pytest
from part2_double import RAM_BASE, FakeFault, FakeIommu

FCTL, FQB, FQCSR, IPSR, ICVEC, CQB, CQT, CQCSR = 0x08, 0x28, 0x4C, 0x54, 0x2F8, 0x18, 0x24, 0x48
MSI_TARGET = RAM_BASE + 0x40000
FAULT = FakeFault(13, 2, 0, 0, 1, None, False)


def fault_queue(iommu):
    iommu.write(FQB, ((RAM_BASE + 0x20000) >> 12) << 10 | 3, 8)
    iommu.write(FQCSR, 3)


def program_msi(iommu, vector, addr, data, masked=False):
    base = 0x300 + 16 * vector
    iommu.write(base, addr, 8)
    iommu.write(base + 8, data)
    iommu.write(base + 12, int(masked))


@pytest.fixture
def iommu():
    iommu = FakeIommu(msi_table_external=False)
    iommu.write(ICVEC, 0x3210, 8)
    for v in range(4):
        program_msi(iommu, v, MSI_TARGET + 4 * v, 0x100 + v)
    return iommu


def test_msi_written_once_per_rising_edge(iommu):
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    iommu.report_fault(FAULT)
    assert iommu.irqs == [1]
    assert iommu.memory.read_u32(MSI_TARGET + 4) == 0x101
    iommu.memory.write_u32(MSI_TARGET + 4, 0)
    iommu.write(IPSR, 2)
    assert iommu.read(IPSR) == 0
    iommu.report_fault(FAULT)
    assert iommu.irqs == [1, 1] and iommu.memory.read_u32(MSI_TARGET + 4) == 0x101


def test_ipsr_only_cleared_by_software(iommu):
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    iommu.write(IPSR, 0xFFFF_FFFD)  # every bit but fip
    assert iommu.read(IPSR) == 2
    iommu.write(FQCSR, 0)
    assert iommu.read(IPSR) == 2


def test_ipsr_bit_resets_while_error_persists(iommu):
    iommu.write(FQB, (0x1000 >> 12) << 10 | 3, 8)  # unmapped: fqmf
    iommu.write(FQCSR, 3)
    iommu.report_fault(FAULT)
    assert iommu.read(FQCSR) & 1 << 8 and iommu.irqs == [1]
    iommu.write(IPSR, 2)
    assert iommu.read(IPSR) == 2 and iommu.irqs == [1, 1]
    iommu.write(FQCSR, 3 | 1 << 8)
    iommu.write(IPSR, 2)
    assert iommu.read(IPSR) == 0 and iommu.irqs == [1, 1]


def test_masked_vector_pending_until_unmasked(iommu):
    program_msi(iommu, 1, MSI_TARGET + 4, 0x101, masked=True)
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    assert iommu.read(IPSR) == 2 and iommu.irqs == []
    assert iommu.memory.read_u32(MSI_TARGET + 4) == 0
    iommu.write(0x31C, 0)
    assert iommu.irqs == [1] and iommu.memory.read_u32(MSI_TARGET + 4) == 0x101
    iommu.write(0x31C, 1)
    iommu.write(0x31C, 0)
    assert iommu.irqs == [1]


def test_icvec_selects_vector(iommu):
    iommu.write(ICVEC, 0x0030, 8)  # fiv = 3
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    assert iommu.irqs == [3] and iommu.memory.read_u32(MSI_TARGET + 12) == 0x103


def test_msi_write_fault_reports_273(iommu):
    program_msi(iommu, 0, 0x1000, 1)
    fault_queue(iommu)
    iommu.write(CQB, 0x1000 >> 12 << 10, 8)
    iommu.write(CQCSR, 3)
    iommu.write(CQT, 1)  # cqmf -> cip -> MSI to an unmapped address
    f = iommu.recent_faults[0]
    assert (f.cause, f.ttyp, f.iotval, f.device_id) == (273, 0, 0x1000, 0)
    assert iommu.irqs == [1]  # the fault record's own fip MSI


def test_big_endian_msi():
    iommu = FakeIommu(dict(END=1), msi_table_external=False)
    iommu.write(FCTL, 1)
    program_msi(iommu, 0, MSI_TARGET, 0x11223344)
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    assert iommu.memory.read(MSI_TARGET, 4) == bytes.fromhex("11223344")


def test_external_table_only_signals_vectors():
    iommu = FakeIommu(msi_table_external=True)
    iommu.write(ICVEC, 0x0020, 8)
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    assert iommu.irqs == [2]


def test_wsi_wire_levels():
    iommu = FakeIommu(dict(IGS=1))
    iommu.write(ICVEC, 0x0010, 8)
    fault_queue(iommu)
    iommu.report_fault(FAULT)
    assert iommu.irqs == [1] and iommu.regs.irq.wire_level(1)
    iommu.write(IPSR, 2)
    assert not iommu.regs.irq.wire_level(1)
