"""The side-effect-free walk (`probe_walk`) and the walk explainer: every step, the
spec's cause names, and no side effect at all (no A/D write, no cache fill, no fault
record, no HPM count)."""

from __future__ import annotations

import logging

from iommu_tables import LEAF_RW, RAM_BASE, A, D, atp, make_iommu

from vfiouser_iommu.iommu import Access, HpmEvent, Request
from vfiouser_iommu.iommu import steps as S
from vfiouser_iommu.iommu.probe import CAUSE_NAMES, explain_fault, probe_walk
from vfiouser_iommu.iommu.walk import LEAF, NEXT, SV39, SV39X4

DID, PSCID, GSCID = 0x30, 0x55, 0x66
DATA = RAM_BASE + (1 << 20)


def setup(tc=1):
    iommu, b, root = make_iommu()
    pt = b.root(SV39)
    b.set_dc(root, 3, DID, 64, tc=tc, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    return iommu, b, root, pt


def test_mapped_iova_every_step_and_the_translation():
    iommu, b, _, pt = setup()
    slot = b.map(SV39, pt, 0x5000, DATA)
    report = probe_walk(iommu, Request(DID, None, 0x5123, Access.READ))
    assert [s.structure for s in report.steps] == [S.DDTE, S.DDTE, S.DC, S.FS_PTE,
                                                   S.FS_PTE, S.FS_PTE]
    assert [s.decision for s in report.steps[3:]] == [NEXT, NEXT, LEAF]
    leaf = report.steps[-1]
    assert (leaf.address, leaf.value, leaf.level) == (slot, (DATA >> 12) << 10 | LEAF_RW, 0)
    assert report.translation.address == DATA + 0x123 and report.cause is None
    d = report.as_dict()
    assert d["result"]["address"] == DATA + 0x123
    assert d["steps"][-1]["fields"]["address"] == DATA and d["steps"][-1]["fields"]["V"] == 1
    assert d["steps"][2]["fields"]["ta"]["PSCID"] == PSCID


def test_unmapped_iova_names_the_cause_and_the_failing_pte():
    iommu, b, _, pt = setup()
    b.map(SV39, pt, 0x6000, DATA)
    report = probe_walk(iommu, Request(DID, None, 0x5000, Access.WRITE))
    assert report.cause == 15 and report.fault_name == "Write/AMO page fault"
    assert report.steps[-1].decision == "V=0" and report.steps[-1].level == 0
    lines = report.explain()
    assert len(lines) == 2
    assert "S.L0[" in lines[0] and "(V=0)" in lines[0]
    assert "cause 15 (Write/AMO page fault)" in lines[1] and "level 0): V=0" in lines[1]
    assert report.as_dict()["fault"] == {"cause": 15, "name": "Write/AMO page fault",
                                         "check": report.failing_check()}


def test_invalid_dc_and_a_table_outside_ram():
    iommu, b, root, _ = setup(tc=0)
    report = probe_walk(iommu, Request(DID, None, 0, Access.READ))
    assert (report.cause, report.steps[-1].structure) == (258, S.DC)
    b.set_dc(root, 3, DID, 64, tc=1, ta=PSCID << 12, fsc=atp(8, 0x10_0000))  # no RAM there
    iommu.invalidate_ddt(True, DID)
    report = probe_walk(iommu, Request(DID, None, 0, Access.READ))
    assert report.cause == 5 and report.failed_read == 0x1_0000_0000
    assert "reading 0x100000000 failed" in report.explain()[1]


def test_no_side_effects():
    iommu, b, _, pt = setup(tc=1 | 1 << 8)       # SADE: a real walk would set A and D
    slot = b.map(SV39, pt, 0x5000, DATA, flags=LEAF_RW & ~(A | D))
    before = bytes(iommu.memory.read(RAM_BASE, 16 << 20))
    counters = dict(iommu.counters)
    stats = (dict(iommu.caches.stats.hits), dict(iommu.caches.stats.misses))
    report = probe_walk(iommu, Request(DID, None, 0x5000, Access.WRITE))
    assert report.ad_updates == [(slot, (DATA >> 12) << 10 | (LEAF_RW & ~(A | D)),
                                  (DATA >> 12) << 10 | LEAF_RW)]
    probe_walk(iommu, Request(DID, None, 0x9000, Access.WRITE))            # a fault
    assert bytes(iommu.memory.read(RAM_BASE, 16 << 20)) == before
    assert len(iommu.caches.iotlb) == 0 and not iommu.caches.ddt
    assert list(iommu.recent_faults) == []
    assert dict(iommu.counters) == counters and HpmEvent.IOTLB_MISS not in iommu.counters
    assert (dict(iommu.caches.stats.hits), dict(iommu.caches.stats.misses)) == stats


def test_nested_walk_shows_both_stages_with_guest_and_system_addresses():
    iommu, b, root = make_iommu()
    g = b.root(SV39X4)
    b.map(SV39X4, g, 0, RAM_BASE, 1 << 30, flags=LEAF_RW)          # GPA 0 -> RAM_BASE
    guest = type(b)(b.mem, offset=RAM_BASE, heap=b.heap)
    pt = guest.root(SV39)
    guest.map(SV39, pt, 0x5000, DATA - RAM_BASE)
    b.set_dc(root, 3, DID, 64, iohgatp=atp(8, g >> 12, GSCID), ta=PSCID << 12,
             fsc=atp(8, pt >> 12))
    report = probe_walk(iommu, Request(DID, None, 0x5000, Access.READ))
    assert report.translation.address == DATA
    first = [s for s in report.steps if s.structure == S.FS_PTE]
    assert len(first) == 3
    assert all(s.gpa is not None and s.address == s.gpa + RAM_BASE for s in first)
    # One G-stage walk (a 1 GiB leaf: one step) per first-stage table and for the data.
    assert sum(s.structure == S.GS_PTE for s in report.steps) == 4


def test_cause_names_cover_every_cause_the_model_raises():
    from vfiouser_iommu.iommu.faults import Cause
    assert {int(c) for c in Cause} <= set(CAUSE_NAMES)
    assert CAUSE_NAMES[258] == "DDT entry not valid"


def test_explain_fault_for_a_fault_record(caplog):
    iommu, b, _, pt = setup()
    fault = iommu.translate(Request(DID, None, 0x7000, Access.READ))
    lines = explain_fault(iommu, fault)
    assert lines[1].startswith("walk: cause 13 (Read page fault)")
    assert len(lines) == 2


def test_walk_explainer_follows_fault_records_in_the_log(caplog):
    from vfiouser_iommu.iommu.observe import Observer
    iommu, b, _, pt = setup()
    Observer(iommu)
    with caplog.at_level(logging.INFO):
        iommu.translate(Request(DID, None, 0x7000, Access.READ))
    text = caplog.text
    fault_line = text.index("fault cause=13")
    assert text.index("walk: DDT.L2[", fault_line) > fault_line
    assert "walk: cause 13 (Read page fault): first-stage PTE at" in text
