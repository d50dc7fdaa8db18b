"""HPM: events counted once per occurrence, every filter, inhibit, overflow (§5.19-5.23)."""

import pytest
from part2_double import FakeIommu
from test_linux_probe import RAM, Driver, attach_identity, program_msix

from vfiouser_iommu.iommu import Access, HpmEvent, IommuConfig, Request, RiscvIommu
from vfiouser_iommu.iommu.hpm import dmask_compare_mask
from vfiouser_iommu.iommu.regs_layouts import IOHPMEVT
from vfiouser_iommu.memory import GuestMemory

IOCOUNTOVF, IOCOUNTINH, IOHPMCYCLES, IPSR = 0x58, 0x5C, 0x60, 0x54


def ctr(n):
    return 0x68 + 8 * (n - 1)


def evt(n):
    return 0x160 + 8 * (n - 1)


@pytest.fixture
def fake():
    return FakeIommu()


def program(iommu, n, **fields):
    iommu.write(evt(n), IOHPMEVT.encode(**fields), 8)


def test_eventid_warl_and_counter_kept(fake):
    fake.write(ctr(1), 41, 8)
    program(fake, 1, eventID=4)
    assert fake.read(evt(1), 8) == 4
    program(fake, 1, eventID=9)
    assert fake.read(evt(1), 8) == 0 and fake.read(ctr(1), 8) == 41


def test_counter_count_configurable():
    fake = FakeIommu(hpm_counters=3)
    fake.write(ctr(4), 5, 8)
    fake.write(IOCOUNTINH, 0xFFFF_FFFF)
    assert fake.read(ctr(4), 8) == 0 and fake.read(IOCOUNTINH) == 0xF


FILTERS = [
    # (filter fields, (device_id, process_id, gscid, pscid), counts?)
    (dict(), (1, None, None, None), True),
    (dict(DV_GSCV=1, DID_GSCID=0x10), (0x10, None, None, None), True),
    (dict(DV_GSCV=1, DID_GSCID=0x10), (0x11, None, None, None), False),
    (dict(DV_GSCV=1, DMASK=1, DID_GSCID=0x13), (0x17, None, None, None), True),
    (dict(DV_GSCV=1, DMASK=1, DID_GSCID=0x13), (0x1B, None, None, None), False),
    (dict(PV_PSCV=1, PID_PSCID=7), (1, 7, None, None), True),
    (dict(PV_PSCV=1, PID_PSCID=7), (1, None, None, None), False),
    (dict(PV_PSCV=1, PID_PSCID=7), (1, 8, None, None), False),
    (dict(IDT=1, DV_GSCV=1, DID_GSCID=3), (1, None, 3, None), True),
    (dict(IDT=1, DV_GSCV=1, DID_GSCID=3), (3, None, None, None), False),
    (dict(IDT=1, PV_PSCV=1, PID_PSCID=9), (1, None, None, 9), True),
    (dict(IDT=1, PV_PSCV=1, PID_PSCID=9), (1, 9, 2, None), False),
]


@pytest.mark.parametrize("filt,ids,counts", FILTERS)
def test_filters(fake, filt, ids, counts):
    program(fake, 1, eventID=HpmEvent.IOTLB_MISS, **filt)
    fake.count_event(HpmEvent.IOTLB_MISS, *ids)
    fake.count_event(HpmEvent.DDT_WALK, *ids)
    assert fake.read(ctr(1), 8) == int(counts)
    assert fake.counters[HpmEvent.IOTLB_MISS] == 1  # the previous hook keeps counting


@pytest.mark.parametrize("event", [1, 2, 3, 5, 6])
def test_idt1_unsupported_events_never_count(fake, event):
    program(fake, 1, eventID=event, IDT=1)
    fake.count_event(event, 1, None, 0, 0)
    assert fake.read(ctr(1), 8) == 0


def test_dmask_compare_mask():
    assert dmask_compare_mask(0b1011) == ~0b111 & 0xFFFFFF
    assert dmask_compare_mask(0b1010) == ~0b1 & 0xFFFFFF


def test_inhibit(fake):
    program(fake, 2, eventID=1)
    fake.write(IOCOUNTINH, 0b100)
    fake.count_event(1, 0, None, None, None)
    assert fake.read(ctr(2), 8) == 0
    fake.write(IOCOUNTINH, 0)
    fake.count_event(1, 0, None, None, None)
    assert fake.read(ctr(2), 8) == 1


def test_programmed_counter_index_follows_evt_inh_and_reset(fake):
    hpm = fake.regs.hpm
    assert hpm.programmed(HpmEvent.IOTLB_MISS) == ()        # nothing programmed
    program(fake, 2, eventID=HpmEvent.IOTLB_MISS)
    program(fake, 5, eventID=HpmEvent.IOTLB_MISS, DV_GSCV=1, DID_GSCID=3)
    program(fake, 7, eventID=HpmEvent.DDT_WALK)
    assert hpm.programmed(HpmEvent.IOTLB_MISS) == (1, 4)    # 0-based counter indexes
    fake.write(IOCOUNTINH, 0b100)                           # inhibit iohpmctr2
    assert hpm.programmed(HpmEvent.IOTLB_MISS) == (4,)
    program(fake, 5, eventID=9)                             # WARL: reads back 0, no event
    assert hpm.programmed(HpmEvent.IOTLB_MISS) == () and hpm.programmed(0) == ()
    fake.write(IOCOUNTINH, 0)
    fake.count_event(HpmEvent.IOTLB_MISS, 3, None, None, None)
    assert fake.read(ctr(2), 8) == 1 and fake.read(ctr(5), 8) == 0
    fake.write(evt(7) + 4, 0)                               # high half only: event kept
    assert hpm.programmed(HpmEvent.DDT_WALK) == (6,)
    hpm.reset()
    assert hpm.programmed(HpmEvent.IOTLB_MISS) == () and hpm.programmed(HpmEvent.DDT_WALK) == ()


def test_overflow_sets_of_and_one_pmip_interrupt(fake):
    fake.write(0x2F8, 0x0200, 8)  # pmiv = 2
    program(fake, 3, eventID=1)
    fake.write(ctr(3), (1 << 64) - 1, 8)
    fake.count_event(1, 0, None, None, None)
    assert fake.read(ctr(3), 8) == 0
    assert fake.read(evt(3), 8) >> 63 == 1 and fake.read(IOCOUNTOVF) == 1 << 3
    assert fake.read(IPSR) == 4 and fake.irqs == [2]
    fake.write(IPSR, 4)
    fake.write(ctr(3), (1 << 64) - 1, 8)
    fake.count_event(1, 0, None, None, None)  # OF still 1: no interrupt
    assert fake.read(IPSR) == 0 and fake.irqs == [2]
    fake.write(evt(3) + 4, 0)  # clear OF (high half)
    fake.write(ctr(3), (1 << 64) - 1, 8)
    fake.count_event(1, 0, None, None, None)
    assert fake.irqs == [2, 2]


def test_cycles_count_inhibit_and_overflow():
    now = [1000]
    fake = FakeIommu()
    fake.regs.hpm.clock = lambda: now[0]
    fake.regs.hpm.reset()
    now[0] += 50
    assert fake.read(IOHPMCYCLES, 8) == 50
    fake.write(IOCOUNTINH, 1)
    now[0] += 50
    assert fake.read(IOHPMCYCLES, 8) == 50
    fake.write(IOCOUNTINH, 0)
    fake.write(IOHPMCYCLES, (1 << 63) - 10, 8)
    now[0] += 20
    assert fake.read(IOHPMCYCLES, 8) == (1 << 63) | 10
    assert fake.read(IOCOUNTOVF) & 1 and fake.read(IPSR) == 4


def test_each_standard_event_counted_once_by_real_translation():
    iommu = RiscvIommu(GuestMemory.ram(RAM, 8 << 20), IommuConfig())
    driver = Driver(iommu)
    program_msix(driver)
    driver.probe()
    attach_identity(driver, 0x10)
    for n, event in enumerate((1, 4, 5), start=1):
        iommu.mmio_write(evt(n), 8, event)
    request = Request(device_id=0x10, process_id=None, iova=RAM, access=Access.READ)
    iommu.translate(request)
    first = [iommu.mmio_read(ctr(n), 8) for n in (1, 2, 3)]
    iommu.translate(request)
    second = [iommu.mmio_read(ctr(n), 8) for n in (1, 2, 3)]
    assert first[0] == 1 and second[0] == 2  # every untranslated request
    expected = {e: iommu.counters[e] for e in (HpmEvent.IOTLB_MISS, HpmEvent.DDT_WALK)}
    assert second[1:] == [expected[HpmEvent.IOTLB_MISS], expected[HpmEvent.DDT_WALK]]
    assert first[2] >= 1 and second[2] == first[2]  # the DC is cached: no second walk
