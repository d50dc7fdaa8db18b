"""Page-request queue: records, auto-responses, faults, PRG responses (§3.2, §4.1.4)."""

import pytest
from part2_double import RAM_BASE, FakeIommu, RecordingFallback, device_context

from vfiouser_iommu.iommu.regs_layouts import PAGE_REQUEST

PQB, PQH, PQT, PQCSR, IPSR, DDTP = 0x38, 0x40, 0x44, 0x50, 0x54, 0x10
PQ_BASE = RAM_BASE + 0x30000
PQMF, PQOF = 1 << 8, 1 << 9
FAILURE, INVALID, SUCCESS = 0xF, 0x1, 0x0


class Endpoint:
    def __init__(self):
        self.responses = []

    def prg_response(self, process_id, prg_index, response_code):
        self.responses.append((process_id, prg_index, response_code))


@pytest.fixture
def iommu():
    iommu = FakeIommu()
    iommu.write(DDTP, 4, 8)
    iommu.contexts[0x10] = device_context()
    iommu.endpoint = Endpoint()
    iommu.regs.ats_endpoints[0x10] = iommu.endpoint
    return iommu


def start(iommu, log2sz=2, base=PQ_BASE):
    iommu.write(PQB, (base >> 12) << 10 | (log2sz - 1), 8)
    iommu.write(PQH, 0)
    iommu.write(PQCSR, 3)


def request(iommu, device_id=0x10, process_id=7, last=True, read=True, write=False, **kw):
    iommu.regs.page_request(device_id, process_id, page_addr=0x4_5000, prg_index=0x12,
                            read=read, write=write, last=last, **kw)


def test_request_queued_as_record(iommu):
    start(iommu)
    request(iommu, privileged=True, execute=True)
    assert iommu.read(PQT) == 1 and iommu.read(IPSR) & 8
    raw = int.from_bytes(iommu.memory.read(PQ_BASE, 16), "little")
    assert PAGE_REQUEST.decode(raw) == dict(page_addr=0x45, prg_index=0x12, L=1, W=0, R=1,
                                            DID=0x10, EXEC=1, PRIV=1, PV=1, PID=7)
    assert iommu.endpoint.responses == []


def test_no_pasid_clears_priv_and_exec(iommu):
    start(iommu)
    request(iommu, process_id=None, privileged=True, execute=True)
    raw = int.from_bytes(iommu.memory.read(PQ_BASE, 16), "little")
    f = PAGE_REQUEST.decode(raw)
    assert (f["PV"], f["PID"], f["PRIV"], f["EXEC"]) == (0, 0, 0, 0)


def test_queue_off_auto_failure_with_pasid(iommu):
    request(iommu)
    assert iommu.endpoint.responses == [(7, 0x12, FAILURE)]
    assert not iommu.recent_faults  # queue conditions are not faults


def test_not_last_and_stop_marker_dropped_silently(iommu):
    request(iommu, last=False)
    request(iommu, read=False, write=False, last=True)
    assert iommu.endpoint.responses == [] and not iommu.recent_faults


def test_full_queue_sets_pqof_and_answers_success(iommu):
    start(iommu)
    for _ in range(3):
        request(iommu)
    assert iommu.endpoint.responses == []
    request(iommu)
    assert iommu.read(PQCSR) & PQOF
    request(iommu, process_id=None)
    assert iommu.endpoint.responses == [(None, 0x12, SUCCESS), (None, 0x12, SUCCESS)]


def test_prpr_puts_pasid_in_success_response(iommu):
    iommu.contexts[0x10] = device_context(prpr=True)
    start(iommu, log2sz=1)
    request(iommu)
    request(iommu)
    assert iommu.endpoint.responses == [(7, 0x12, SUCCESS)]


def test_memory_fault_sets_pqmf_then_failure(iommu):
    start(iommu, base=0x1000)
    request(iommu)
    assert iommu.read(PQCSR) & PQMF
    assert iommu.endpoint.responses == [(7, 0x12, FAILURE)]


def test_page_request_queue_outside_ram_sets_pqmf_even_with_a_fallback(iommu):
    iommu.memory.fallback = fallback = RecordingFallback()
    start(iommu, base=0x1000)
    request(iommu)
    assert iommu.read(PQCSR) & PQMF and iommu.read(PQT) == 0
    assert iommu.endpoint.responses == [(7, 0x12, FAILURE)]
    assert fallback.writes == [] and fallback.reads == []


def test_no_en_pri_invalid_request_and_fault(iommu):
    iommu.contexts[0x10] = device_context(en_pri=False)
    start(iommu)
    request(iommu)
    assert iommu.read(PQT) == 0
    assert iommu.endpoint.responses == [(None, 0x12, INVALID)]
    f = iommu.recent_faults[-1]
    assert (f.cause, f.ttyp, f.iotval, f.device_id) == (260, 9, 4, 0x10)


def test_ddt_failure_response_failure_and_fault(iommu):
    del iommu.contexts[0x10]
    start(iommu)
    request(iommu)
    assert iommu.endpoint.responses == [(7, 0x12, FAILURE)]
    assert iommu.recent_faults[-1].cause == 258


def test_bare_mode_invalid_request(iommu):
    iommu.write(DDTP, 1, 8)
    start(iommu)
    request(iommu)
    assert iommu.endpoint.responses == [(None, 0x12, INVALID)]
    assert iommu.recent_faults[-1].cause == 260
