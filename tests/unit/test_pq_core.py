"""Page requests through the real RiscvIommu (spec v1.0.1 "PCIe ATS Page Request
handling", "Page-Request-Queue", ATS.PRGR): a real DDT, the page-request queue
programmed by MMIO, and an endpoint registered in `regs.ats_endpoints`."""

from __future__ import annotations

import pytest
from iommu_tables import RAM_BASE, Builder

from vfiouser_iommu.iommu import Fault, IommuConfig, RiscvIommu
from vfiouser_iommu.iommu.regs_layouts import CMD_ATS, PAGE_REQUEST, PRGR_PAYLOAD
from vfiouser_iommu.memory import GuestMemory

FCTL, DDTP, CQB, CQH, CQT, PQB, PQH, PQT = 0x08, 0x10, 0x18, 0x20, 0x24, 0x38, 0x40, 0x44
FQB, FQT, CQCSR, FQCSR, PQCSR, IPSR, ICVEC, MSI_CFG = 0x28, 0x34, 0x48, 0x4C, 0x50, 0x54, \
    0x2F8, 0x300
PQMF, PQOF, PIP = 1 << 8, 1 << 9, 1 << 3
SUCCESS, INVALID, FAILURE = 0x0, 0x1, 0xF
V, EN_ATS, EN_PRI, DTF, PDTV, PRPR = 1, 2, 4, 16, 32, 64
DID, PID, PRG = 0x2A, 0x1234, 0x1C5
PAGE = 0x7_6543_2000
MSI_ADDR, MSI_DATA = RAM_BASE + 0x9_0000, 0x5A


class Endpoint:
    """An endpoint with an ATC and PRI (the `commands.AtsEndpoint` protocol)."""

    def __init__(self):
        self.invalidations: list[tuple] = []
        self.responses: list[tuple] = []

    def ats_invalidate(self, process_id, address, size, global_mapping) -> bool:
        self.invalidations.append((process_id, address, size, global_mapping))
        return True

    def prg_response(self, process_id, prg_index, response_code) -> None:
        self.responses.append((process_id, prg_index, response_code))


class Rig:
    """RiscvIommu over RAM with a 3-level DDT, a fault queue and an MSI for vector 1."""

    def __init__(self, tc: int = V | EN_ATS | EN_PRI, config: IommuConfig | None = None,
                 big_endian: bool = False):
        self.mem = GuestMemory.ram(RAM_BASE, 16 << 20)
        self.irqs: list[int] = []
        self.iommu = RiscvIommu(self.mem, config or IommuConfig(), raise_irq=self.irqs.append)
        self.b = Builder(self.mem, big_endian)
        self.root = self.b.alloc()
        self.fq = self.b.alloc()
        self.pq = self.b.alloc()
        self.cq = self.b.alloc()
        if big_endian:
            self.write(FCTL, 1)
        self.set_dc(tc)
        self.write(DDTP, (self.root >> 12) << 10 | 4, 8)                 # 3LVL
        self.write(FQB, (self.fq >> 12) << 10 | 3, 8)                    # 16 records
        self.write(FQCSR, 1)
        self.write(ICVEC, 1 << 12)                                       # piv = 1
        self.write(MSI_CFG + 16, MSI_ADDR, 8)
        self.write(MSI_CFG + 24, MSI_DATA)
        self.endpoint = Endpoint()
        self.iommu.regs.ats_endpoints[DID] = self.endpoint

    def set_dc(self, tc: int, did: int = DID) -> None:
        self.b.set_dc(self.root, 3, did, 64, tc=tc, fsc=(1 << 60) if tc & PDTV else 0)
        self.iommu.invalidate_ddt(True, did)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.iommu.mmio_write(offset, size, value)

    def read(self, offset: int, size: int = 4) -> int:
        return self.iommu.mmio_read(offset, size)

    def start_pq(self, log2sz: int = 2, base: int | None = None, pie: bool = True) -> None:
        base = self.pq if base is None else base
        self.write(PQB, (base >> 12) << 10 | (log2sz - 1), 8)
        self.write(PQH, 0)
        self.write(PQCSR, 1 | (2 if pie else 0))

    def request(self, process_id=PID, *, read=True, write=False, last=True, did=DID,
                privileged=False, execute=False) -> None:
        self.iommu.regs.page_request(did, process_id, page_addr=PAGE, prg_index=PRG,
                                     read=read, write=write, last=last,
                                     privileged=privileged, execute=execute)

    def pq_record(self, index: int) -> dict:
        be = self.b.big_endian
        dw0 = self.mem.read_int(self.pq + 16 * index, 8, big_endian=be)
        dw1 = self.mem.read_int(self.pq + 16 * index + 8, 8, big_endian=be)
        return PAGE_REQUEST.decode(dw0 | dw1 << 64)

    def faults(self) -> list[Fault]:
        return [Fault.from_record(self.mem.read(self.fq + 32 * i, 32))
                for i in range(self.read(FQT))]

    def msis(self) -> int:
        return self.mem.read_int(MSI_ADDR, 4, big_endian=self.b.big_endian)


def record(**fields) -> dict:
    base = dict(page_addr=PAGE >> 12, prg_index=PRG, L=1, W=0, R=1, DID=DID, EXEC=0, PRIV=0,
                PV=1, PID=PID)
    return {**base, **fields}


# -- queued ------------------------------------------------------------------------------------
@pytest.mark.parametrize("big_endian", [False, True])
def test_request_queued_with_exact_record_and_pip_msi(big_endian):
    rig = Rig(config=IommuConfig(end=True), big_endian=big_endian)
    rig.start_pq()
    rig.request(privileged=True, execute=True, write=True)
    assert rig.read(PQT) == 1
    assert rig.pq_record(0) == record(W=1, PRIV=1, EXEC=1)
    assert rig.read(IPSR) & PIP and rig.irqs == [1] and rig.msis() == MSI_DATA
    assert rig.endpoint.responses == [] and rig.faults() == []


def test_no_pasid_and_not_last_are_queued_with_priv_exec_zero():
    rig = Rig()
    rig.start_pq()
    rig.request(None, privileged=True, execute=True, last=False)
    assert rig.pq_record(0) == record(PV=0, PID=0, L=0)
    assert rig.endpoint.responses == []


def test_stop_marker_is_queued_when_pri_is_enabled():
    rig = Rig()
    rig.start_pq()
    rig.request(read=False)
    assert rig.pq_record(0) == record(R=0)
    assert rig.endpoint.responses == []


def test_pip_needs_pie_and_fires_once_per_w1c():
    rig = Rig()
    rig.start_pq(pie=False)
    rig.request()
    assert not rig.read(IPSR) & PIP and rig.irqs == []
    rig.write(PQCSR, 3)
    rig.request()
    rig.request()
    assert rig.read(PQT) == 3 and rig.irqs == [1]            # ipsr.pip stayed set
    rig.write(IPSR, PIP)
    rig.request(last=False)
    assert rig.irqs == [1, 1]


# -- the queue cannot take it ---------------------------------------------------------------------
def test_queue_off_response_failure_with_pasid_and_no_fault():
    rig = Rig()
    rig.request()
    rig.request(None)
    assert rig.endpoint.responses == [(PID, PRG, FAILURE), (None, PRG, FAILURE)]
    assert rig.faults() == []


def test_queue_memory_fault_sets_pqmf_then_response_failure():
    rig = Rig()
    rig.start_pq(base=0x1000)                                # no RAM there
    rig.request()
    assert rig.read(PQCSR) & PQMF and rig.read(IPSR) & PIP
    rig.request(None)                                        # pqmf stays: still Failure
    assert rig.endpoint.responses == [(PID, PRG, FAILURE), (None, PRG, FAILURE)]
    assert rig.faults() == []


@pytest.mark.parametrize("prpr,pasid_in_response", [(False, None), (True, PID)])
def test_full_queue_sets_pqof_and_answers_success(prpr, pasid_in_response):
    rig = Rig(tc=V | EN_ATS | EN_PRI | (PRPR if prpr else 0))
    rig.start_pq(log2sz=1)                                   # 2 entries: room for one
    rig.request()
    assert rig.read(PQT) == 1 and rig.endpoint.responses == []
    rig.request()                                            # full: pqof
    assert rig.read(PQCSR) & PQOF
    rig.request(last=False)                                  # discarded silently
    rig.write(PQH, 1)                                        # room again, pqof still set
    rig.request(None)
    assert rig.read(PQT) == 1
    assert rig.endpoint.responses == [(pasid_in_response, PRG, SUCCESS), (None, PRG, SUCCESS)]
    assert rig.faults() == []
    rig.write(PQCSR, PQOF | 3)                               # W1C pqof: queueing resumes
    rig.request()
    assert rig.read(PQT) == 0 and rig.pq_record(1) == record()


# -- the device context refuses it ----------------------------------------------------------------
def test_en_pri_zero_invalid_request_and_fault():
    # PRPR needs EN_PRI (else the DC is misconfigured), so Invalid Request has no PASID.
    rig = Rig(tc=V | EN_ATS)
    rig.start_pq()
    rig.request()
    rig.request(last=False)
    rig.request(read=False)                                  # Stop Marker: dropped
    assert rig.read(PQT) == 0
    assert rig.endpoint.responses == [(None, PRG, INVALID)]
    page_request = Fault(260, 9, 0x04, 0, DID, PID, False)
    assert rig.faults() == [page_request] * 3


def test_refused_privileged_request_fault_has_priv():
    # PRIV of the record is the request's Privilege Mode Requested (with a PASID only).
    rig = Rig(tc=V | EN_ATS)
    rig.request(privileged=True)
    rig.request(None, privileged=True)
    assert rig.faults() == [Fault(260, 9, 0x04, 0, DID, PID, True),
                            Fault(260, 9, 0x04, 0, DID, None, False)]


def test_en_pri_zero_with_dtf_answers_without_a_fault():
    rig = Rig(tc=V | EN_ATS | DTF)
    rig.request()
    assert rig.endpoint.responses == [(None, PRG, INVALID)] and rig.faults() == []


def test_prpr_without_en_pri_is_misconfigured_response_failure():
    rig = Rig(tc=V | EN_ATS | PRPR)
    rig.start_pq()
    rig.request()
    assert rig.endpoint.responses == [(PID, PRG, FAILURE)]
    assert rig.faults() == [Fault(259, 9, 0x04, 0, DID, PID, False)]


def test_en_pri_without_en_ats_is_misconfigured_response_failure():
    rig = Rig(tc=V | EN_PRI)
    rig.start_pq()
    rig.request(None)
    assert rig.endpoint.responses == [(None, PRG, FAILURE)]
    assert rig.faults() == [Fault(259, 9, 0x04, 0, DID, None, False)]


def test_pasid_without_pdtv_is_still_queued():
    # Page Requests are not translated: PDTV/process-id checks (§3.3 step 7) don't apply.
    rig = Rig(tc=V | EN_ATS | EN_PRI)
    rig.start_pq()
    rig.request(0xF_FFFF)
    assert rig.pq_record(0) == record(PID=0xF_FFFF)


@pytest.mark.parametrize("mode,code,cause", [(0, FAILURE, 256), (1, INVALID, 260)])
def test_off_and_bare_modes(mode, code, cause):
    rig = Rig(tc=V | EN_ATS | EN_PRI | PRPR)
    rig.start_pq()
    rig.write(DDTP, mode, 8)
    rig.request()
    # Without a DC, PRPR is taken as 0: Invalid Request carries no PASID.
    assert rig.endpoint.responses == [(PID if code == FAILURE else None, PRG, code)]
    assert rig.faults() == [Fault(cause, 9, 0x04, 0, DID, PID, False)]


def test_dc_not_valid_and_device_id_too_wide():
    rig = Rig()
    rig.start_pq()
    too_wide = 1 << 24                                       # wider than 3LVL can index
    rig.iommu.regs.ats_endpoints[too_wide] = rig.endpoint
    rig.request(did=DID + 1)                                 # V=0 DC: 258
    rig.iommu.regs.ats_endpoints[DID + 1] = rig.endpoint
    rig.request(did=DID + 1)
    rig.request(did=too_wide)
    assert rig.endpoint.responses == [(PID, PRG, FAILURE), (None, PRG, INVALID)]
    assert [f.cause for f in rig.faults()] == [258, 258, 260]


# -- PRG responses from software: ATS.PRGR ---------------------------------------------------------
def _prgr(rig: Rig, **fields) -> None:
    payload = PRGR_PAYLOAD.encode(prg_index=PRG, response_code=fields.pop("code", SUCCESS))
    cmd = CMD_ATS.encode(opcode=4, func3=1, PAYLOAD=payload, **fields)
    tail = rig.read(CQT)
    rig.mem.write_int(rig.cq + 16 * tail, 8, cmd & (1 << 64) - 1)
    rig.mem.write_int(rig.cq + 16 * tail + 8, 8, cmd >> 64)
    rig.write(CQT, tail + 1)


def test_ats_prgr_routes_the_response_to_the_endpoint():
    rig = Rig(tc=V | EN_ATS | EN_PRI | PRPR)
    other = Endpoint()
    rig.iommu.regs.ats_endpoints[0x3 << 16 | DID] = other
    rig.write(CQB, (rig.cq >> 12) << 10 | 3, 8)
    rig.write(CQCSR, 1)
    rig.start_pq()
    rig.request()
    assert rig.pq_record(0) == record()
    _prgr(rig, RID=DID, PV=1, PID=PID, code=SUCCESS)
    _prgr(rig, RID=DID, code=INVALID)                       # PV=0: no PASID, PRPR or not
    _prgr(rig, RID=DID, DSV=1, DSEG=3, PV=1, PID=5, code=FAILURE)
    _prgr(rig, RID=DID + 1)                                  # nobody there: completes
    assert rig.read(CQH) == 4 and rig.read(CQCSR) == 1 << 16 | 1
    assert rig.endpoint.responses == [(PID, PRG, SUCCESS), (None, PRG, INVALID)]
    assert other.responses == [(5, PRG, FAILURE)]
