"""Command queue: every command, every illegal form, IOFENCE.C, bounded processing (§4)."""

import pytest
from part2_double import RAM_BASE, FakeIommu, RecordingFallback

from vfiouser_iommu.iommu.regs_layouts import CMD_ATS, CMD_IODIR, CMD_IOFENCE, CMD_IOTINVAL

CQB, CQH, CQT, CQCSR, IPSR, FCTL, DDTP = 0x18, 0x20, 0x24, 0x48, 0x54, 0x08, 0x10
CQ_BASE = RAM_BASE + 0x10000
CQMF, CMD_TO, CMD_ILL, FENCE_W_IP = 1 << 8, 1 << 9, 1 << 10, 1 << 11


class Endpoint:
    def __init__(self, completes=True):
        self.completes = completes
        self.invals, self.responses = [], []

    def ats_invalidate(self, process_id, address, size, global_mapping):
        self.invals.append((process_id, address, size, global_mapping))
        return self.completes

    def prg_response(self, process_id, prg_index, response_code):
        self.responses.append((process_id, prg_index, response_code))


def vma(**f):
    return CMD_IOTINVAL.encode(opcode=1, func3=0, **f)


def gvma(**f):
    return CMD_IOTINVAL.encode(opcode=1, func3=1, **f)


def fence(**f):
    return CMD_IOFENCE.encode(opcode=2, func3=0, **f)


def iodir(func3, **f):
    return CMD_IODIR.encode(opcode=3, func3=func3, **f)


def ats(func3, **f):
    return CMD_ATS.encode(opcode=4, func3=func3, **f)


class Cq:
    def __init__(self, iommu, log2sz=6, cie=True):
        self.iommu, self.tail, self.entries = iommu, 0, 1 << log2sz
        iommu.write(CQB, (CQ_BASE >> 12) << 10 | (log2sz - 1), 8)
        iommu.write(CQT, 0)
        iommu.write(CQCSR, 1 | (2 if cie else 0))

    def submit(self, *commands, big_endian=False):
        for command in commands:
            addr = CQ_BASE + 16 * self.tail
            for i, dw in enumerate((command & (1 << 64) - 1, command >> 64)):
                self.iommu.memory.write_int(addr + 8 * i, 8, dw, big_endian=big_endian)
            self.tail = (self.tail + 1) % self.entries
        self.iommu.write(CQT, self.tail)

    @property
    def head(self):
        return self.iommu.read(CQH)

    @property
    def csr(self):
        return self.iommu.read(CQCSR)


@pytest.fixture
def iommu():
    return FakeIommu()


@pytest.mark.parametrize("gv,av,pscv", [(g, a, p) for g in (0, 1) for a in (0, 1)
                                        for p in (0, 1)])
def test_iotinval_vma_every_combination(iommu, gv, av, pscv):
    cq = Cq(iommu)
    cq.submit(vma(GV=gv, AV=av, PSCV=pscv, GSCID=0x1234, PSCID=0xABCDE, ADDR=0x4_5678))
    assert cq.head == 1 and cq.csr & CMD_ILL == 0
    assert iommu.calls == [("vma", bool(gv), 0x1234, bool(pscv), 0xABCDE, bool(av),
                            0x4_5678 << 12)]


@pytest.mark.parametrize("gv,av", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_iotinval_gvma(iommu, gv, av):
    cq = Cq(iommu)
    cq.submit(gvma(GV=gv, AV=av, GSCID=7, ADDR=0x123))
    assert cq.head == 1
    assert iommu.calls == [("gvma", bool(gv), 7, bool(av), 0x123 << 12)]


def test_iodir_inval_ddt_and_pdt(iommu):
    iommu.write(DDTP, 4, 8)
    cq = Cq(iommu)
    cq.submit(iodir(0, DV=0), iodir(0, DV=1, DID=0xABCDEF), iodir(1, DV=1, DID=5, PID=0xFFFFF))
    assert cq.head == 3
    assert iommu.calls == [("ddt", False, 0), ("ddt", True, 0xABCDEF), ("pdt", 5, 0xFFFFF)]


ILLEGAL = {
    "reserved opcode": 5 | 0 << 7,
    "custom opcode": 64,
    "zero command": 0,
    "IOTINVAL func3 2": CMD_IOTINVAL.encode(opcode=1, func3=2),
    "IOTINVAL reserved bit 11": vma() | 1 << 11,
    "IOTINVAL reserved bits 43:35": vma() | 1 << 35,
    "IOTINVAL reserved bits 63:60": vma() | 1 << 60,
    "IOTINVAL dw1 reserved 8:0": vma() | 1 << 64,
    "IOTINVAL dw1 reserved 63:62": vma() | 1 << 127,
    "IOTINVAL NL without capability": vma(NL=1, AV=1),
    "IOTINVAL S without capability": vma(S=1, AV=1),
    "GVMA with PSCV": gvma(PSCV=1),
    "IOFENCE func3 1": CMD_IOFENCE.encode(opcode=2, func3=1),
    "IOFENCE reserved 31:14": fence() | 1 << 14,
    "IOFENCE dw1 reserved": fence() | 1 << 126,
    "IOFENCE WSI with fctl.WSI=0": fence(WSI=1),
    "IODIR func3 2": iodir(2),
    "INVAL_DDT with PID": iodir(0, PID=1),
    "INVAL_DDT reserved 11:10": iodir(0) | 1 << 10,
    "INVAL_DDT reserved dw1": iodir(0) | 1 << 64,
    "INVAL_PDT with DV=0": iodir(1, DV=0, DID=1),
    "ATS func3 2": CMD_ATS.encode(opcode=4, func3=2),
    "ATS reserved 39:34": ats(0) | 1 << 34,
}


@pytest.mark.parametrize("name", ILLEGAL)
def test_illegal_command_sets_cmd_ill_and_stops_on_it(iommu, name):
    cq = Cq(iommu)
    cq.submit(vma(), ILLEGAL[name], vma())
    assert cq.csr & CMD_ILL
    assert cq.head == 1
    assert iommu.read(IPSR) & 1
    assert iommu.irqs == [0]
    assert len(iommu.calls) == 1
    cq.submit()  # a cqt write does not restart a halted queue
    assert cq.head == 1


def test_clearing_cmd_ill_after_fixing_the_command_resumes(iommu):
    cq = Cq(iommu)
    cq.submit(ILLEGAL["reserved opcode"], vma())
    iommu.memory.write(CQ_BASE, vma().to_bytes(16, "little"))
    iommu.write(CQCSR, 3 | CMD_ILL)
    assert cq.head == 2 and cq.csr & CMD_ILL == 0
    assert len(iommu.calls) == 2


def test_ats_commands_illegal_without_ats_capability():
    iommu = FakeIommu(dict(ATS=0))
    cq = Cq(iommu)
    cq.submit(ats(0, RID=1))
    assert cq.csr & CMD_ILL and cq.head == 0


def test_iodir_device_id_wider_than_mode_is_illegal(iommu):
    iommu.write(DDTP, 2, 8)  # 1LVL with extended contexts: 6-bit device_id
    cq = Cq(iommu)
    cq.submit(iodir(0, DV=1, DID=63), iodir(0, DV=1, DID=64))
    assert cq.head == 1 and cq.csr & CMD_ILL


def test_inval_pdt_process_id_wider_than_pdx_is_illegal():
    iommu = FakeIommu(dict(PD20=0, PD17=0))
    cq = Cq(iommu)
    cq.submit(iodir(1, DV=1, PID=0xFF), iodir(1, DV=1, PID=0x100))
    assert cq.head == 1 and cq.csr & CMD_ILL


def test_nl_and_s_forms_when_capable():
    iommu = FakeIommu(dict(NL=1, S=1))
    cq = Cq(iommu)
    cq.submit(vma(NL=1, AV=1, ADDR=5), vma(S=1, AV=1, ADDR=7), vma(S=1, AV=1, ADDR=0x10),
              gvma(S=1, AV=1, GV=1, ADDR=0x2FF))
    assert cq.head == 4
    # NL: the page itself (the model caches no non-leaf entries).
    assert iommu.calls[0][5:] == (True, 0x5000)
    # S: ADDR 0b111 has three trailing ones -> 16 pages at 0; 0x10 (X=0) -> 8 KiB.
    assert iommu.calls[1][5:] == (True, 0, 0x10000)
    assert iommu.calls[2][5:] == (True, 0x10000, 0x2000)
    assert iommu.calls[3][3:] == (True, 0x200000, 0x200000)


def test_napot_range_decoding():
    from vfiouser_iommu.iommu.commands import napot_range

    assert napot_range(0x10) == (0x10000, 0x2000)
    assert napot_range(0xFF) == (0, 0x200000)              # 2 MiB at 0
    assert napot_range(0x2FF) == (0x200000, 0x200000)
    assert napot_range(0x7FFFF_FFFFFFFF) == (0, 1 << 64)   # MSB 0 only: the whole space
    assert napot_range((1 << 52) - 1) == (0, 1 << 64)      # all ones: UNSPECIFIED, whole


def test_iofence_data_write(iommu):
    cq = Cq(iommu)
    target = RAM_BASE + 0x2000
    cq.submit(fence(AV=1, PR=1, PW=1, DATA=0xCAFEF00D, ADDR=target >> 2))
    assert cq.head == 1 and cq.csr & (CQMF | CMD_ILL) == 0
    assert iommu.memory.read_u32(target) == 0xCAFEF00D
    assert iommu.memory.read_u32(target + 4) == 0


def test_iofence_data_write_fault_sets_cqmf_and_stays(iommu):
    cq = Cq(iommu)
    cq.submit(fence(AV=1, DATA=1, ADDR=0x1000 >> 2), vma())
    assert cq.csr & CQMF and cq.head == 0
    assert iommu.irqs == [0] and not iommu.calls


def test_iofence_big_endian_data_write_and_commands():
    iommu = FakeIommu(dict(END=1))
    iommu.write(FCTL, 1)
    cq = Cq(iommu)
    target = RAM_BASE + 0x2000
    cq.submit(fence(AV=1, DATA=0x11223344, ADDR=target >> 2), big_endian=True)
    assert cq.head == 1
    assert iommu.memory.read(target, 4) == bytes.fromhex("11223344")


def test_iofence_wsi_sets_fence_w_ip_and_wire():
    iommu = FakeIommu(dict(IGS=2))
    iommu.write(FCTL, 2)
    cq = Cq(iommu)
    cq.submit(fence(WSI=1))
    assert cq.head == 1 and cq.csr & FENCE_W_IP
    assert iommu.read(IPSR) & 1 and iommu.irqs == [0]
    assert iommu.regs.irq.wire_level(0)
    iommu.write(CQCSR, 3 | FENCE_W_IP)
    iommu.write(IPSR, 1)
    assert not iommu.regs.irq.wire_level(0) and iommu.read(IPSR) == 0


def test_memory_fault_on_fetch_sets_cqmf(iommu):
    iommu.write(CQB, (0x1000 >> 12) << 10 | 3, 8)
    iommu.write(CQCSR, 3)
    iommu.write(CQT, 1)
    assert iommu.read(CQCSR) & CQMF and iommu.read(CQH) == 0
    assert iommu.irqs == [0]


def test_command_queue_outside_ram_sets_cqmf_even_with_a_fallback(iommu):
    iommu.memory.fallback = fallback = RecordingFallback()
    iommu.write(CQB, (0x1000 >> 12) << 10 | 3, 8)
    iommu.write(CQCSR, 3)
    iommu.write(CQT, 1)
    assert iommu.read(CQCSR) & (CQMF | CMD_ILL) == CQMF and iommu.read(CQH) == 0
    assert fallback.reads == [] and fallback.writes == []


def test_iofence_data_write_outside_ram_goes_to_the_fallback(iommu):
    """IOFENCE.C's data write may target MMIO (an IMSIC): it stays a fallback write."""
    iommu.memory.fallback = fallback = RecordingFallback()
    cq = Cq(iommu)
    cq.submit(fence(AV=1, DATA=0x5, ADDR=0x2800_0000 >> 2))
    assert cq.head == 1 and cq.csr & CQMF == 0
    assert fallback.writes == [(0x2800_0000, (5).to_bytes(4, "little"))]


def test_enable_clears_errors_and_head(iommu):
    cq = Cq(iommu)
    cq.submit(0, 0)
    assert cq.csr & CMD_ILL
    iommu.write(CQCSR, 0)
    iommu.write(CQT, 0)
    iommu.write(CQCSR, 3)
    assert cq.csr == 3 | 1 << 16 and cq.head == 0


def test_no_processing_while_off(iommu):
    iommu.write(CQB, (CQ_BASE >> 12) << 10 | 3, 8)
    iommu.memory.write(CQ_BASE, vma().to_bytes(16, "little"))
    iommu.write(CQT, 1)
    assert iommu.read(CQH) == 0 and not iommu.calls


def test_ats_inval_to_endpoint_and_timeout_at_next_fence(iommu):
    good, slow = Endpoint(), Endpoint(completes=False)
    iommu.regs.ats_endpoints.update({0x0010: good, 0x02_0020: slow})
    cq = Cq(iommu)
    cq.submit(ats(0, RID=0x10, PV=1, PID=9, PAYLOAD=(0x12345 << 12)),
              ats(0, RID=0x20, DSV=1, DSEG=2, PAYLOAD=(0b0111 << 12) | 1 << 11 | 1),
              vma(), fence(PR=1, PW=1), vma())
    assert good.invals == [(9, 0x12345 << 12, 4096, False)]
    assert slow.invals == [(None, 0, 64 << 10, True)]
    assert cq.head == 3 and cq.csr & CMD_TO
    iommu.write(CQCSR, 3 | CMD_TO)
    assert cq.head == 5 and cq.csr & CMD_TO == 0


def test_ats_prgr_routes_response_to_endpoint(iommu):
    ep = Endpoint()
    iommu.regs.ats_endpoints[0x18] = ep
    cq = Cq(iommu)
    cq.submit(ats(1, RID=0x18, PV=1, PID=3, PAYLOAD=(0xF << 44) | (0x1AB << 32)),
              ats(1, RID=0x99, PAYLOAD=0))
    assert cq.head == 2
    assert ep.responses == [(3, 0x1AB, 0xF)]


def test_thousands_of_commands_processed_in_bounded_steps(iommu):
    cq = Cq(iommu, log2sz=13)
    cq.submit(*[vma()] * 5000)
    assert cq.tail == 5000
    assert 0 < len(iommu.calls) <= 64 * 2
    assert iommu.regs.work_pending()
    steps = 0
    while iommu.regs.work_pending():
        assert iommu.regs.run_pending(500) <= 500
        steps += 1
    assert len(iommu.calls) == 5000 and steps >= 9
    assert iommu.read(CQH) == 5000


def test_polling_cqh_makes_progress(iommu):
    cq = Cq(iommu, log2sz=10)
    cq.submit(*[vma()] * 1000)
    reads = 0
    while cq.head != 1000:
        reads += 1
    assert reads > 1 and len(iommu.calls) == 1000


def test_queue_wraps(iommu):
    cq = Cq(iommu, log2sz=2)
    for _ in range(5):
        cq.submit(vma(), vma(), vma())
    assert cq.head == 15 % 4 and len(iommu.calls) == 15


@pytest.mark.parametrize("base,index", [(0x18, 0x24),    # cqb and cqt
                                        (0x28, 0x30),    # fqb and fqh
                                        (0x38, 0x40)])   # pqb and pqh
def test_writing_a_base_clears_the_software_index_above_log2sz(iommu, base, index):
    """§5.7/§5.10/§5.13: after a write to cqb (fqb, pqb), bits 31:LOG2SZ of cqt (fqh,
    pqh) read 0. Found by the IOMMU fuzzer (tests/fuzz/regressions/iommu/
    cqt-beyond-a-shrunk-queue): a 16-entry queue shrunk to 2 kept cqt = 2."""
    iommu.write(base, (CQ_BASE >> 12) << 10 | 3, 8)         # 16 entries
    iommu.write(index, 13)
    assert iommu.read(index) == 13
    iommu.write(base, (CQ_BASE >> 12) << 10 | 0, 8)         # 2 entries
    assert iommu.read(index) == 13 & 1
    iommu.write(base, 0, 4)                                  # the low half alone
    assert iommu.read(index) < 2
