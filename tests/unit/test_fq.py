"""Fault queue: records, wrap, overflow, memory fault, nothing written while off (§3.1)."""

import struct

import pytest
from part2_double import RAM_BASE, FakeFault, FakeIommu, RecordingFallback

FQB, FQH, FQT, FQCSR, IPSR, FCTL = 0x28, 0x30, 0x34, 0x4C, 0x54, 0x08
FQ_BASE = RAM_BASE + 0x20000
FQMF, FQOF = 1 << 8, 1 << 9


def fault(n=0):
    return FakeFault(cause=13, ttyp=2, iotval=0x1000 * n, iotval2=0, device_id=0x10 + n,
                     process_id=None, privileged=False)


def start(iommu, log2sz=2, base=FQ_BASE):
    iommu.write(FQB, (base >> 12) << 10 | (log2sz - 1), 8)
    iommu.write(FQH, 0)
    iommu.write(FQCSR, 3)


@pytest.fixture
def iommu():
    return FakeIommu()


def test_record_written_tail_moves_and_fip(iommu):
    start(iommu)
    iommu.report_fault(fault(1))
    assert iommu.read(FQT) == 1
    assert iommu.memory.read(FQ_BASE, 32) == fault(1).to_record()
    assert iommu.read(IPSR) & 2 and iommu.irqs == [0]
    assert list(iommu.recent_faults) == [fault(1)]  # the previous hook still runs


def test_big_endian_records():
    iommu = FakeIommu(dict(END=1))
    iommu.write(FCTL, 1)
    start(iommu)
    iommu.report_fault(fault(1))
    dw0 = struct.unpack(">Q", iommu.memory.read(FQ_BASE, 8))[0]
    assert dw0 & 0xFFF == 13 and dw0 >> 40 == 0x11


def test_overflow_drops_and_sets_fqof_until_cleared(iommu):
    start(iommu, log2sz=2)  # 4 entries, 3 usable
    for n in range(5):
        iommu.report_fault(fault(n))
    assert iommu.read(FQT) == 3 and iommu.read(FQCSR) & FQOF
    iommu.write(FQH, 3)
    iommu.report_fault(fault(7))
    assert iommu.read(FQT) == 3  # still discarding while fqof=1
    iommu.write(FQCSR, 3 | FQOF)
    iommu.report_fault(fault(8))
    assert iommu.read(FQT) == 0  # wrapped
    assert iommu.memory.read(FQ_BASE + 3 * 32, 32) == fault(8).to_record()


def test_memory_fault_sets_fqmf(iommu):
    start(iommu, base=0x1000)
    iommu.report_fault(fault())
    assert iommu.read(FQCSR) & FQMF and iommu.read(FQT) == 0
    assert iommu.irqs == [0]


def test_fault_queue_outside_ram_sets_fqmf_even_with_a_fallback(iommu):
    """Served, writes outside the maps become DMA_WRITE messages; queue memory must be
    RAM, so a fault queue over MMIO or a hole is a memory fault, not a posted record."""
    iommu.memory.fallback = fallback = RecordingFallback()
    start(iommu, base=0x1000)
    iommu.report_fault(fault())
    assert iommu.read(FQCSR) & FQMF and iommu.read(FQT) == 0
    assert iommu.irqs == [0] and fallback.writes == [] and fallback.reads == []


def test_nothing_written_while_off(iommu):
    iommu.write(FQB, (FQ_BASE >> 12) << 10 | 1, 8)
    iommu.report_fault(fault())
    assert iommu.read(FQT) == 0 and iommu.memory.read(FQ_BASE, 32) == bytes(32)
    assert iommu.read(IPSR) == 0


def test_no_interrupt_without_fie(iommu):
    iommu.write(FQB, (FQ_BASE >> 12) << 10 | 1, 8)
    iommu.write(FQCSR, 1)
    iommu.report_fault(fault())
    assert iommu.read(FQT) == 1 and iommu.read(IPSR) == 0 and iommu.irqs == []


def test_enable_resets_tail_and_errors(iommu):
    start(iommu)
    for n in range(4):
        iommu.report_fault(fault(n))
    iommu.write(FQCSR, 0)
    iommu.write(FQCSR, 3)
    assert iommu.read(FQT) == 0 and iommu.read(FQCSR) == 3 | 1 << 16
