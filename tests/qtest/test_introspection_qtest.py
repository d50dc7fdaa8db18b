"""Real QEMU (qtest) drives our IOMMU and an iommu-testdev like a driver would, with the
invalidation checker on, caches at their largest and negative caching on
(`check=on,cache=max,negative=on`); the control socket is asked what it saw.

- the injected driver bugs that need no guest kernel: a leaf PTE changed without
  IOTINVAL.VMA, a device context changed without IODIR.INVAL_DDT, and a device context
  made valid without IODIR.INVAL_DDT under negative caching. Each is a wrong DMA (the
  testdev's data lands where the stale entry says) and one stale-use warning naming the
  structure and the missing command; the driver's invalidation then fixes the DMA.
- `walk` of a mapped and an unmapped IOVA of a paging domain (Sv39) and `query-caches`
  showing the IOTLB entry the DMA made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from vfiouser_iommu import topology
from vfiouser_iommu.control.client import ControlConnection
from vfiouser_iommu.lab.pci import PciBus
from vfiouser_iommu.lab.qtest import QTest
from vfiouser_iommu.lab.scenarios import (
    DMA_ERR_TX_FAIL,
    SCENARIO_IOVA,
    Stages,
    run_context_change_scenario,
    run_retarget_scenario,
    run_translation_scenario,
)
from vfiouser_iommu.lab.stack import OurStack, Topology

pytestmark = pytest.mark.qtest
STRICTEST = "check=on,cache=max,negative=on"
# As in conftest.py (not imported from it: several test folders have a conftest module).
IOMMU_ADDR, TESTDEV_ADDR = "01.0", "02.0"
RAM_SIZE = "256M"
SHARED_RAM = "memory-backend-memfd,share=on"


@dataclass
class Machine:
    qt: QTest
    iommu_base: int
    testdev_bar: int
    requester_id: int


def attach(qt: QTest) -> Machine:
    """BARs and bus mastering for both functions, as firmware would."""
    bus = PciBus(qt)
    found = {}
    for addr in (IOMMU_ADDR, TESTDEV_ADDR):
        device = bus.at(*topology.parse_address(addr))
        device.assign_bars()
        device.enable()
        found[addr] = device
    return Machine(qt, found[IOMMU_ADDR].bars[0].addr, found[TESTDEV_ADDR].bars[0].addr,
                   found[TESTDEV_ADDR].rid)


@pytest.fixture
def checked(lab, tmp_path: Path):
    """(machine, control connection) on our stack in the strictest modes."""
    layout = Topology(iommu=IOMMU_ADDR, iommu_options=STRICTEST,
                      endpoints=[f"iommu-testdev@{TESTDEV_ADDR}"])
    with OurStack(lab, tmp_path, layout, memory=RAM_SIZE, verbose=2) as stack:
        args = topology.vfio_user_device_args(stack.socket_dir, stack.functions)
        with QTest(args, memory=RAM_SIZE, memory_backend=SHARED_RAM, lab=lab) as qt:
            machine = attach(qt)
            with ControlConnection(stack.control_path) as control:
                assert control.execute("query-mode")["check"] is True
                yield machine, control


def the_stale_use(control) -> dict:
    checker = control.execute("query-checker")
    assert checker["distinct"] == 1, checker
    return checker["stale_uses"][0]


def test_pte_changed_without_iotinval(checked):
    machine, control = checked
    result = run_retarget_scenario(machine.qt, machine.iommu_base, machine.testdev_bar,
                                   machine.requester_id)
    assert result.first.target == "A"
    # Memory says page B; the cached leaf still sends the DMA to page A.
    assert result.without_inval.target == "A"
    stale = the_stale_use(control)
    assert (stale["cache"], stale["structure"], stale["level"]) == \
        ("iotlb", "first-stage PTE", "level 0 leaf")
    assert stale["address"] == result.tables.leaf_pte
    assert stale["required"] == (f"IOTINVAL.VMA GV=0 PSCV=1 PSCID=0x0 AV=1 "
                                 f"ADDR={SCENARIO_IOVA & ~0xFFF:#x}")
    # The driver's IOTINVAL.VMA (AV=1, all host spaces) + IOFENCE.C fixes it.
    assert result.after_inval.target == "B" and result.after_inval.dma_result == 0
    assert control.execute("query-checker")["uses"] == 1


def test_dc_changed_without_iodir_inval_ddt(checked):
    machine, control = checked
    result = run_context_change_scenario(machine.qt, machine.iommu_base,
                                         machine.testdev_bar, machine.requester_id)
    assert result.first.target == "A"
    assert result.without_inval.target == "A"        # the cached context's old tables
    stale = the_stale_use(control)
    assert (stale["cache"], stale["structure"]) == ("ddt", "device context")
    assert stale["address"] == result.tables.dc_address
    assert stale["required"] == (f"IODIR.INVAL_DDT DV=1 DID={machine.requester_id:#x}, "
                                 "then IOTINVAL.VMA GV=0 PSCV=1 PSCID=0x0 AV=0")
    assert result.after_inval.target == "B" and result.after_inval.dma_result == 0


def test_dc_made_valid_without_iodir_inval_ddt_under_negative_caching(checked):
    machine, control = checked
    result = run_context_change_scenario(machine.qt, machine.iommu_base,
                                         machine.testdev_bar, machine.requester_id,
                                         made_valid=True)
    assert result.first.dma_result == DMA_ERR_TX_FAIL
    # Memory has a valid context now; the cached V=0 still faults the DMA.
    assert result.without_inval.dma_result == DMA_ERR_TX_FAIL
    assert [f.cause for f in result.faults] == [258, 258]
    stale = the_stale_use(control)
    assert (stale["cache"], stale["structure"], stale["negative"]) == \
        ("ddt", "device context", True)
    assert stale["required"] == f"IODIR.INVAL_DDT DV=1 DID={machine.requester_id:#x}"
    assert result.after_inval.target == "B" and result.after_inval.dma_result == 0


def test_walk_of_a_paging_domain_and_the_iotlb_entry_of_its_dma(checked):
    machine, control = checked
    result = run_translation_scenario(machine.qt, machine.iommu_base, machine.testdev_bar,
                                      machine.requester_id, Stages.FIRST_STAGE)
    assert result.dma_result == 0
    rid = machine.requester_id
    mapped = control.execute("walk", did=rid, iova=SCENARIO_IOVA, access="write")
    assert mapped["result"]["address"] == result.expected_address
    assert [s["structure"] for s in mapped["steps"]][-4:] == \
        ["device context", "first-stage PTE", "first-stage PTE", "first-stage PTE"]
    leaf = mapped["steps"][-1]
    assert (leaf["address"], leaf["decision"], leaf["level"]) == \
        (result.tables.leaf_pte, "leaf", 0)
    assert mapped["iotlb"]["cached"] and mapped["iotlb"]["matches_memory"]
    unmapped = control.execute("walk", did=rid, iova=SCENARIO_IOVA + 0x20_0000,
                               access="write")
    assert (unmapped["fault"]["cause"], unmapped["fault"]["name"]) == \
        (15, "Write/AMO page fault")
    assert unmapped["steps"][-1]["decision"] == "V=0"
    caches = control.execute("query-caches")
    [entry] = caches["iotlb"]["entries"]
    assert entry["iova"] == SCENARIO_IOVA & ~0xFFF
    assert entry["spa"] == result.tables.data_page and entry["size"] == 4096
    assert control.execute("query-checker")["distinct"] == 0
