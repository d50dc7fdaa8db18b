"""Poisoned guest memory (GuestMemory.poison) and the data-corruption fault causes:
268 DDT, 269 PDT, 270 MSI PT, 271 MRIF, 274 first/second-stage PT (spec v1.0.1 §4.2,
"poisoned data" in the §3.3 steps), DTF, ATS, caches, and the queues."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iommu_tables import LEAF_RW, LEAF_RWX, RAM_BASE, atp, make_iommu
from test_iommu_garbage import BASE, SIZE, NoReads, _pointer_word, requests

from vfiouser_iommu.iommu import (
    Access,
    Fault,
    IommuConfig,
    Request,
    RequestKind,
    RiscvIommu,
    Translation,
)
from vfiouser_iommu.iommu.ats import completion_status
from vfiouser_iommu.iommu.walk import SV39, SV39X4
from vfiouser_iommu.memory import DmaError, GuestMemory, MemoryAccessError, MemoryPoisonError

DID = 0x10
PID = 7
DATA = RAM_BASE + (1 << 20)
GSCID = 0x33
GPA_OFF = RAM_BASE
MIB2 = 2 << 20


def req(iova, access=Access.READ, pid=None, kind=RequestKind.UNTRANSLATED):
    return Request(DID, pid, iova, access, False, kind)


def fault(cause, ttyp, iotval, iotval2=0, pid=None):
    return Fault(cause, ttyp, iotval, iotval2, DID, pid, False)


# -- GuestMemory ------------------------------------------------------------------------------
def test_poisoned_reads_fail_writes_pass_and_poison_stays():
    mem = GuestMemory.ram(0x1000, 0x4000)
    mem.write(0x2000, b"abcdefgh")
    assert mem.poisoned_ranges == ()
    mem.poison(0x2004, 2)
    assert mem.poisoned(0x2005) and not mem.poisoned(0x2006) and not mem.poisoned(0x2003)
    assert mem.read(0x2000, 4) == b"abcd"                 # bytes next to the poison read
    for read in (lambda: mem.read(0x2000, 8), lambda: mem.read_int(0x2004, 2),
                 lambda: mem.read_u64(0x2000), lambda: mem.slice(0x2005, 1)):
        with pytest.raises(MemoryPoisonError) as e:
            read()
        assert isinstance(e.value, MemoryAccessError)
    mem.write(0x2004, b"XY")                              # poison affects reads only
    mem.slice(0x2004, 2, writable=True)[:] = b"ZW"
    assert mem.poisoned(0x2004, 2)
    with pytest.raises(MemoryPoisonError):
        mem.compare_exchange(0x2000, 8, 0, 1)
    mem.unpoison(0x2004, 2)
    assert mem.read(0x2000, 8) == b"abcdZWgh"


def test_poison_ranges_merge_and_split():
    mem = GuestMemory.ram(0, 0x10000)
    mem.poison(0x100, 0x100)
    mem.poison(0x300, 0x100)
    mem.poison(0x180, 0x200)                              # bridges both
    assert mem.poisoned_ranges == ((0x100, 0x300),)
    mem.unpoison(0x200, 0x10)
    assert mem.poisoned_ranges == ((0x100, 0x100), (0x210, 0x1F0))
    assert not mem.poisoned(0x200, 0x10) and mem.poisoned(0x1FF, 0x12)
    mem.unpoison(0, 0x10000)
    assert mem.poisoned_ranges == () and mem.read(0x100, 0x300) == bytes(0x300)
    with pytest.raises(ValueError):
        mem.poison(0x100, 0)


# -- DDT: 268, reported whatever DTF says --------------------------------------------------------
def test_poisoned_non_leaf_ddte_is_268():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64, tc=1 | 16)                 # DTF=1 does not hide 268
    iommu.memory.poison(root, 8)                          # DDI[2] = 0
    assert iommu.translate(req(0x1000, Access.WRITE)) == fault(268, 3, 0x1000)
    assert list(iommu.recent_faults) == [fault(268, 3, 0x1000)]


def test_poisoned_device_context_is_268_until_unpoisoned():
    iommu, b, root = make_iommu()
    slot = b.set_dc(root, 3, DID, 64)
    iommu.memory.poison(slot + 24, 1)                     # one byte of fsc
    assert iommu.translate(req(0x1000)) == fault(268, 2, 0x1000)
    iommu.memory.unpoison(slot, 64)
    assert iommu.translate(req(0x1000)).address == 0x1000   # a fault is never cached


def test_cached_device_context_survives_poison_until_iodir():
    iommu, b, root = make_iommu()
    slot = b.set_dc(root, 3, DID, 64)
    assert isinstance(iommu.translate(req(0x1000)), Translation)
    iommu.memory.poison(slot, 64)
    assert iommu.translate(req(0x1000)).address == 0x1000
    iommu.invalidate_ddt(True, DID)
    assert iommu.translate(req(0x1000)) == fault(268, 2, 0x1000)


def test_ddt_corruption_goes_to_the_fault_queue():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)
    fq = b.alloc()
    iommu.mmio_write(0x28, 8, (fq >> 12) << 10 | 1)       # fqb: 4 entries
    iommu.mmio_write(0x4C, 4, 1)                          # fqen
    iommu.memory.poison(root, 8)
    iommu.translate(req(0x3000))
    assert iommu.mmio_read(0x34, 4) == 1                  # fqt
    assert Fault.from_record(iommu.memory.read(fq, 32)) == fault(268, 2, 0x3000)


# -- PDT: 269 (DTF suppresses it) ----------------------------------------------------------------
def _pasid(tc=1 | 32):
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.map(SV39, pt, 0x5000, DATA)
    pdt = b.alloc()
    b.set_dc(root, 3, DID, 64, tc=tc, fsc=atp(2, pdt >> 12))           # PD17: 2 levels
    pc = b.set_pc(pdt, 2, PID, 1 | 9 << 12, atp(8, pt >> 12))
    return iommu, pdt, pc


def test_poisoned_process_context_is_269():
    iommu, _, pc = _pasid()
    iommu.memory.poison(pc + 8, 8)                        # PC.fsc
    assert iommu.translate(req(0x5000, pid=PID)) == fault(269, 2, 0x5000, pid=PID)


def test_poisoned_non_leaf_pdte_is_269_and_dtf_suppresses_it():
    iommu, pdt, _ = _pasid(tc=1 | 32 | 16)
    iommu.memory.poison(pdt, 8)                           # PDI[1] = 0
    assert iommu.translate(req(0x5000, Access.EXECUTE, pid=PID)) == \
        fault(269, 1, 0x5000, pid=PID)
    assert not iommu.recent_faults


# -- first / second stage: 274 -------------------------------------------------------------------
def test_poisoned_first_stage_pte_is_274():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    leaf = b.map(SV39, pt, 0x5000, DATA)
    b.set_dc(root, 3, DID, 64, tc=1 | 2, fsc=atp(8, pt >> 12))      # EN_ATS
    iommu.memory.poison(leaf, 8)
    assert iommu.translate(req(0x5008, Access.WRITE)) == fault(274, 3, 0x5008)
    # An ATS Translation request sees the same fault, answered Completer Abort.
    result = iommu.translate(req(0x5008, kind=RequestKind.ATS_TRANSLATION))
    assert result == fault(274, 8, 0x5008) and completion_status(result) == "CA"


def test_cached_translation_survives_poisoned_pte_until_invalidated():
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    leaf = b.map(SV39, pt, 0x5000, DATA)
    b.set_dc(root, 3, DID, 64, ta=5 << 12, fsc=atp(8, pt >> 12))
    assert iommu.translate(req(0x5000)).address == DATA
    iommu.memory.poison(leaf, 8)
    # The IOTLB does not snoop memory: until IOTINVAL the old translation is used.
    assert iommu.translate(req(0x5010)).address == DATA + 0x10
    assert not iommu.recent_faults
    iommu.invalidate_vma(False, 0, True, 5, True, 0x5000)
    assert iommu.translate(req(0x5010)) == fault(274, 2, 0x5010)


def test_poisoned_data_page_aborts_dma_without_a_record():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64)
    iommu.memory.poison(DATA + 0x40, 1)
    view = iommu.dma_view(DID)
    with pytest.raises(DmaError) as e:
        view.read(DATA, 0x100)
    assert e.value.fault is None and not iommu.recent_faults
    view.write(DATA, b"\1" * 0x100)                       # writes are not affected


def _nested(tc=1):
    """Sv39 over Sv39x4; the G-stage maps GPA x -> SPA x + RAM_BASE in 2 MiB pages."""
    iommu, b, root = make_iommu()
    groot = b.root(SV39X4)
    g_leaves = {gpa: b.map(SV39X4, groot, gpa, gpa + GPA_OFF, MIB2, flags=LEAF_RWX)
                for gpa in range(0, 64 << 20, MIB2)}
    gb = replace(b, offset=GPA_OFF)
    fs_root = gb.root(SV39)
    b.set_dc(root, 3, DID, 64, tc=tc, ta=3 << 12, fsc=atp(8, fs_root >> 12),
             iohgatp=atp(8, groot >> 12, GSCID))
    return iommu, b, gb, fs_root, g_leaves, root, groot


def test_poisoned_g_stage_leaf_of_the_data_is_274():
    iommu, _, gb, fs_root, g_leaves, *_ = _nested()
    gb.map(SV39, fs_root, 0x7000_0000, 0x20_0000, flags=LEAF_RW)
    iommu.memory.poison(g_leaves[0x20_0000], 8)
    assert iommu.translate(req(0x7000_0000)) == fault(274, 2, 0x7000_0000)


def test_poisoned_g_stage_pte_of_an_implicit_access_is_274_without_iotval2():
    iommu, _, gb, fs_root, g_leaves, *_ = _nested()
    gb.map(SV39, fs_root, 0x7000_0000, 0x20_0000, flags=LEAF_RW)
    iommu.memory.poison(g_leaves[fs_root & ~(MIB2 - 1)], 8)
    assert iommu.translate(req(0x7000_0000, Access.WRITE)) == fault(274, 3, 0x7000_0000)


def test_poisoned_nested_first_stage_pte_is_274_and_dtf_suppresses_it():
    iommu, _, gb, fs_root, *_ = _nested(tc=1 | 16)
    leaf = gb.map(SV39, fs_root, 0x7000_0000, 0x20_0000, flags=LEAF_RW)
    iommu.memory.poison(leaf + GPA_OFF, 8)
    assert iommu.translate(req(0x7000_0000)) == fault(274, 2, 0x7000_0000)
    assert not iommu.recent_faults


def test_pdt_access_whose_g_stage_pte_is_poisoned_is_269():
    # §3.3.2: data corruption in the second-stage accesses of a PDT walk is "PDT data
    # corruption", as a second-stage access fault there is "PDT entry load access fault".
    iommu, b, gb, fs_root, g_leaves, root, groot = _nested()
    pdt = gb.alloc()
    gb.map(SV39, fs_root, 0x5000, 0x20_0000)
    gb.set_pc(pdt, 1, PID, 1 | 4 << 12, atp(8, fs_root >> 12))
    b.set_dc(root, 3, DID, 64, tc=1 | 32, fsc=atp(1, pdt >> 12),
             iohgatp=atp(8, groot >> 12, GSCID))
    assert iommu.translate(req(0x5000, pid=PID)).address == GPA_OFF + 0x20_0000
    iommu.memory.poison(g_leaves[pdt & ~(MIB2 - 1)], 8)
    iommu.invalidate_gvma(False, 0, False, 0)
    iommu.invalidate_ddt(False, 0)
    assert iommu.translate(req(0x5000, pid=PID)) == fault(269, 2, 0x5000, pid=PID)
    iommu.memory.unpoison(0, 1 << 40)
    iommu.memory.poison(pdt + GPA_OFF + PID * 16, 16)     # the PC itself: 269
    assert iommu.translate(req(0x5000, pid=PID)) == fault(269, 2, 0x5000, pid=PID)


# -- MSI: 270 and 271 ------------------------------------------------------------------------------
FILE_GPA = 0x2800_0000
MRIF = RAM_BASE + (3 << 20)
NOTICE = MRIF + 0x1000


def _msi(pte0, pte1=0, index=2):
    iommu, b, root = make_iommu()
    msipt = b.alloc()
    b.write64(msipt + index * 16, pte0)
    b.write64(msipt + index * 16 + 8, pte1)
    b.set_dc(root, 3, DID, 64, msiptp=atp(1, msipt >> 12), msi_mask=0x7,
             msi_pattern=FILE_GPA >> 12)
    return iommu, msipt


def test_poisoned_msi_pte_is_270():
    iommu, msipt = _msi(1 | 3 << 1 | (DATA >> 12) << 10)
    iommu.memory.poison(msipt + 2 * 16 + 8, 8)            # DW1 of the PTE
    assert iommu.translate(req(FILE_GPA + 0x2004, Access.WRITE)) == \
        fault(270, 3, FILE_GPA + 0x2004)


def test_poisoned_mrif_pending_doubleword_is_271_and_sends_no_notice():
    pte0 = 1 | 1 << 1 | (MRIF >> 9) << 7
    pte1 = 0x45 | (NOTICE >> 12) << 10
    iommu, _ = _msi(pte0, pte1)
    iommu.memory.poison(MRIF + 16, 8)                     # identities 64..127
    with pytest.raises(DmaError) as e:
        iommu.dma_view(DID).write(FILE_GPA + 0x2000, (70).to_bytes(4, "little"))
    assert e.value.fault == fault(271, 3, FILE_GPA + 0x2000)
    assert list(iommu.recent_faults) == [e.value.fault]
    assert iommu.memory.read_int(NOTICE, 4) == 0
    iommu.dma_view(DID).write(FILE_GPA + 0x2000, (3).to_bytes(4, "little"))  # pair 0 fine
    assert iommu.memory.read_int(MRIF, 8) == 1 << 3 and iommu.memory.read_int(NOTICE, 4) == 0x45


# -- queues --------------------------------------------------------------------------------------
def test_poisoned_command_is_cqmf_and_fault_records_are_writes():
    mem = GuestMemory.ram(RAM_BASE, 1 << 20)
    iommu = RiscvIommu(mem)
    cq, fq = RAM_BASE + 0x1000, RAM_BASE + 0x2000
    iommu.mmio_write(0x18, 8, (cq >> 12) << 10 | 1)       # cqb
    iommu.mmio_write(0x48, 4, 1)                          # cqen
    iommu.mmio_write(0x28, 8, (fq >> 12) << 10 | 1)       # fqb
    iommu.mmio_write(0x4C, 4, 1)                          # fqen
    mem.write_int(cq, 8, 2)                               # IOFENCE.C
    mem.poison(cq + 16, 16)                               # the second command
    iommu.mmio_write(0x24, 4, 2)                          # cqt
    assert iommu.mmio_read(0x20, 4) == 1                  # cqh stays on the bad command
    assert iommu.mmio_read(0x48, 4) & 1 << 8              # cqmf
    mem.poison(fq, 32)                                    # poison does not stop a write
    iommu.translate(Request(3, None, 0x1000))             # ddtp Off: 256
    assert iommu.mmio_read(0x34, 4) == 1 and not iommu.mmio_read(0x4C, 4) & 1 << 8
    mem.unpoison(fq, 32)
    assert Fault.from_record(mem.read(fq, 32)).cause == 256


def test_page_request_with_poisoned_ddt_gets_response_failure():
    iommu, b, root = make_iommu()
    b.set_dc(root, 3, DID, 64, tc=1 | 2 | 4)

    class Endpoint:
        responses: list = []

        def prg_response(self, process_id, prg_index, code):
            self.responses.append((process_id, prg_index, code))

    endpoint = Endpoint()
    iommu.regs.ats_endpoints[DID] = endpoint
    iommu.memory.poison(root, 8)
    iommu.regs.page_request(DID, PID, page_addr=0x5000, prg_index=3, read=True, write=False,
                            last=True)
    assert endpoint.responses == [(PID, 3, 0xF)]
    assert list(iommu.recent_faults) == [Fault(268, 9, 4, 0, DID, PID, False)]


# -- garbage tables with poison: nothing escapes ---------------------------------------------
CORRUPTION = {268, 269, 270, 271, 274}


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.tuples(st.integers(0, 20 * 512 - 1), st.integers(0, (1 << 64) - 1),
                                st.sampled_from([0, 1, 3, 0xCF, 0x1F])), max_size=200),
       poison=st.lists(st.tuples(st.integers(0, 24 * 4096), st.integers(1, 8192)),
                       max_size=6),
       ddtp_mode=st.sampled_from([2, 3, 4]), reqs=st.lists(requests, min_size=1, max_size=8))
def test_poisoned_garbage_tables_never_raise(words, poison, ddtp_mode, reqs):
    mem = GuestMemory.ram(BASE, SIZE)
    mem.fallback = NoReads()
    for slot, value, kind in words:
        mem.write_int(BASE + slot * 8, 8, _pointer_word(value, kind) if kind else value)
    for offset, length in poison:
        mem.poison(BASE + offset, length)
    iommu = RiscvIommu(mem, IommuConfig(iotlb_entries=16))
    iommu.set_register("ddtp", (BASE >> 12) << 10 | ddtp_mode)
    for request in reqs:
        result = iommu.translate(request)
        assert isinstance(result, Translation | Fault)
        if isinstance(result, Fault):
            assert result.cause not in CORRUPTION or poison
        try:
            iommu.dma_view(request.device_id & 0xFFFFFF).write(request.iova & (1 << 63) - 8,
                                                               b"\x01\x00\x00\x00")
        except DmaError:
            pass
