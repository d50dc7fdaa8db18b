"""The Linux riscv-iommu driver's probe and first use, replayed against the real core.

Follows drivers/iommu/riscv/iommu.c (riscv_iommu_init and the command/fault paths):
capabilities and fctl reads, ddtp check, ICVEC discovery, ddtp Off with PPN 0, queue
bases probed with LOG2SZ all ones and written back for an exact readback, cqen/fqen
with the busy handshake, 3LVL (falling back to 2LVL/1LVL), then INVAL_DDT +
IOTINVAL.VMA + IOFENCE.C. No error bit may be set and no fault recorded.
"""

import pytest

from vfiouser_iommu.iommu import Access, Fault, IommuConfig, Request, RiscvIommu, Translation
from vfiouser_iommu.memory import GuestMemory

RAM = 0x8000_0000
CAPS, FCTL, DDTP, CQB, CQH, CQT, FQB, FQH, FQT = 0, 8, 0x10, 0x18, 0x20, 0x24, 0x28, 0x30, 0x34
CQCSR, FQCSR, IPSR, ICVEC = 0x48, 0x4C, 0x54, 0x2F8
EN, IE, MF, ON, BUSY = 1, 2, 1 << 8, 1 << 16, 1 << 17
CQ_ERRORS = (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11)
IMSIC = RAM + 0x3F_0000


class Driver:
    """Just enough of the Linux driver to drive probe and the first commands."""

    def __init__(self, iommu, vectors=4):
        self.iommu, self.vectors = iommu, vectors
        self.next_page = RAM + 0x10_0000
        self.cq_tail = 0

    def rd(self, off, size=4):
        return self.iommu.mmio_read(off, size)

    def wr(self, off, value, size=4):
        self.iommu.mmio_write(off, size, value)

    def alloc(self, size):
        addr, self.next_page = self.next_page, self.next_page + max(size, 4096)
        return addr

    def probe(self):
        caps = self.rd(CAPS, 8)
        assert (caps >> 28) & 3 in (0, 2), "unable to use message-signaled interrupts"
        fctl = self.rd(FCTL)
        self.wr(FCTL, fctl & ~2)
        ddtp = self.rd(DDTP, 8)
        assert not ddtp & 0x10 and ddtp & 0xF <= 1, "unexpected device state"
        assert self.rd(FCTL) & 1 == 0
        n = self.vectors
        self.wr(ICVEC, 0 | (1 % n) << 4 | (3 % n) << 8 | (2 % n) << 12, 8)
        icvec = self.rd(ICVEC, 8)
        assert all((icvec >> s) & 0xF < n for s in (0, 4, 8, 12))
        self.civ, self.fiv = icvec & 0xF, (icvec >> 4) & 0xF
        self.wr(DDTP, ddtp & 0xF, 8)
        assert self.rd(DDTP, 8) >> 10 == 0  # PPN 0: the driver allocates the root
        self.cq = self.queue_alloc(CQB, 12, 16)
        self.fq = self.queue_alloc(FQB, 11, 32)
        self.queue_enable(CQT, CQCSR, cause=1)
        self.queue_enable(FQH, FQCSR, cause=2)
        self.root = self.alloc(4096)
        for mode in (4, 3, 2):
            self.wr(DDTP, (self.root >> 12) << 10 | mode, 8)
            got = self.rd(DDTP, 8)
            assert not got & 0x10
            if got & 0xF > 1:
                break
        assert got & 0xF == mode, f"DDTP hw mode {got & 0xF}, failed to set {mode}"
        self.mode = mode
        self.send(iodir_ddt(), vma_all())
        self.sync()

    def queue_alloc(self, qb, wanted, entry):
        self.wr(qb, 0x1F, 8)
        logsz = min(wanted, (self.rd(qb, 8) & 0x1F) + 1)
        base = self.alloc(entry << logsz)
        value = (base >> 12) << 10 | (logsz - 1)
        self.wr(qb, value, 8)
        assert self.rd(qb, 8) == value, "queue allocation failed"
        return base, 1 << logsz

    def queue_enable(self, index_reg, csr, cause):
        self.wr(index_reg, 0)
        self.wr(csr, EN | IE | MF)
        for _ in range(3):
            value = self.rd(csr)
            if not value & BUSY:
                break
        assert value & (ON | BUSY | MF) == ON, "queue failed to start"
        self.wr(IPSR, cause)

    def send(self, *commands):
        base, entries = self.cq
        for command in commands:
            self.iommu.memory.write(base + 16 * self.cq_tail, command.to_bytes(16, "little"))
            self.cq_tail = (self.cq_tail + 1) % entries
        self.wr(CQT, self.cq_tail)

    def sync(self):
        self.send(2 | 1 << 12 | 1 << 13)  # IOFENCE.C PR=1 PW=1
        for _ in range(1000):
            if self.rd(CQH) == self.cq_tail:
                break
            assert not self.rd(CQCSR) & CQ_ERRORS
        assert self.rd(CQH) == self.cq_tail, "command execution timeout"


def iodir_ddt(device_id=None):
    return 3 if device_id is None else 3 | 1 << 33 | device_id << 40


def vma_all():
    return 1


@pytest.fixture
def iommu():
    mem = GuestMemory.ram(RAM, 8 << 20)
    irqs = []
    iommu = RiscvIommu(mem, IommuConfig(), raise_irq=irqs.append)
    iommu.irqs = irqs
    return iommu


def program_msix(driver):
    for v in range(4):
        driver.wr(0x300 + 16 * v, IMSIC + 4 * v, 8)
        driver.wr(0x308 + 16 * v, 0x40 + v)
        driver.wr(0x30C + 16 * v, 0)


def attach_identity(driver, device_id):
    """Install a DC for `device_id` (identity domain) the way the driver does."""
    mem, table = driver.iommu.memory, driver.root
    shifts = {4: (15, 6), 3: (6,), 2: ()}[driver.mode]
    for shift in shifts:
        slot = table + 8 * ((device_id >> shift) & 0x1FF)
        entry = mem.read_u64(slot)
        if not entry & 1:
            page = driver.alloc(4096)
            mem.write_u64(slot, (page >> 12) << 10 | 1)
            entry = mem.read_u64(slot)
        table = (entry >> 10) << 12
    mem.write_u64(table + 64 * (device_id & 0x3F), 1)  # tc.V, fsc/iohgatp Bare
    driver.send(iodir_ddt(device_id), vma_all())
    driver.sync()


def assert_clean(driver):
    assert driver.rd(CQCSR) & CQ_ERRORS == 0
    assert driver.rd(FQCSR) & (MF | 1 << 9) == 0
    assert driver.rd(FQT) == driver.rd(FQH)
    assert driver.rd(IPSR) == 0


def test_probe_sequence_sets_no_error(iommu):
    driver = Driver(iommu)
    driver.probe()
    assert driver.mode == 4
    assert_clean(driver)
    assert not iommu.recent_faults and iommu.irqs == []


def test_probe_with_one_vector(iommu):
    driver = Driver(iommu, vectors=1)
    driver.probe()
    assert_clean(driver)


def test_identity_attach_then_dma_passes(iommu):
    driver = Driver(iommu)
    driver.probe()
    attach_identity(driver, 0x10)
    result = iommu.translate(Request(device_id=0x10, process_id=None, iova=RAM + 0x1234,
                                     access=Access.WRITE))
    assert isinstance(result, Translation) and result.address == RAM + 0x1234
    assert_clean(driver)


def test_unattached_device_fault_reaches_fault_queue_and_msi(iommu):
    driver = Driver(iommu)
    program_msix(driver)
    driver.probe()
    result = iommu.translate(Request(device_id=0x18, process_id=None, iova=0x5000,
                                     access=Access.READ))
    assert isinstance(result, Fault) and result.cause == 258
    assert driver.rd(FQT) == 1 and driver.rd(IPSR) == 2
    base, _ = driver.fq
    assert Fault.from_record(iommu.memory.read(base, 32)) == result
    assert iommu.irqs == [driver.fiv]
    assert iommu.memory.read_u32(IMSIC + 4 * driver.fiv) == 0x40 + driver.fiv
    driver.wr(IPSR, 2)  # the handler: clear fip, consume, move fqh
    driver.wr(FQH, driver.rd(FQT))
    assert_clean(driver)


def test_iofence_with_data_write_through_real_core(iommu):
    driver = Driver(iommu)
    driver.probe()
    target = driver.alloc(4096)
    driver.send(2 | 1 << 10 | 0x5A5A_0001 << 32 | (target >> 2) << 64)
    driver.sync()
    assert iommu.memory.read_u32(target) == 0x5A5A_0001


def test_shutdown_writes_bare_and_zeroes_csrs(iommu):
    driver = Driver(iommu)
    driver.probe()
    driver.wr(DDTP, 1, 8)
    for csr in (CQCSR, FQCSR, 0x50):
        driver.wr(csr, 0)
    assert driver.rd(DDTP, 8) == 1
    assert driver.rd(CQCSR) == driver.rd(FQCSR) == 0
    iommu.reset()
    assert driver.rd(DDTP, 8) == 0
