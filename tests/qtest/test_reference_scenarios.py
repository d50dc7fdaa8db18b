"""QEMU's four RISC-V IOMMU translation scenarios on its built-in riscv-iommu-pci.

Port of `tests/qtest/iommu-riscv-test.c`: one iommu-testdev DMA write through a device
context with both stages Bare, Sv39 first stage only, Sv39x4 G-stage only, and nested.
Each test proves the data landed at the system address the tables name and nowhere else
(in particular not at the IOVA, itself a RAM address), with no fault recorded. The same
scenarios (`vfiouser_iommu.lab.scenarios`) later run on our IOMMU over vfio-user.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vfiouser_iommu.lab.paths import Lab
from vfiouser_iommu.lab.pci import PciBus
from vfiouser_iommu.lab.qtest import QTest
from vfiouser_iommu.lab.scenarios import (
    PAGE_SIZE,
    SCENARIO_IOVA,
    ScenarioResult,
    Stages,
    run_translation_scenario,
)

pytestmark = pytest.mark.qtest

RISCV_IOMMU_PCI = (0x1B36, 0x0014)
IOMMU_TESTDEV = (0x1B36, 0x0005)
ZEROS = bytes(4)


@dataclass
class ReferenceMachine:
    qt: QTest
    iommu_base: int
    testdev_bar: int
    requester_id: int

    def run(self, stages: Stages) -> ScenarioResult:
        return run_translation_scenario(self.qt, self.iommu_base, self.testdev_bar,
                                        self.requester_id, stages)


def enable(bus: PciBus, ids: tuple[int, int]) -> tuple[int, int]:
    """Give the device its BARs and bus mastering; return (BAR0 address, requester ID)."""
    device = bus.find(*ids)
    device.assign_bars()
    device.enable()
    return device.bars[0].addr, device.rid


@pytest.fixture
def machine(lab: Lab) -> Iterator[ReferenceMachine]:
    # The `lab` fixture fails the test, never skips it, when the lab is missing.
    with QTest(["-device", "riscv-iommu-pci", "-device", "iommu-testdev"], lab=lab) as qt:
        bus = PciBus(qt)
        iommu_base, _ = enable(bus, RISCV_IOMMU_PCI)
        testdev_bar, requester_id = enable(bus, IOMMU_TESTDEV)
        yield ReferenceMachine(qt, iommu_base, testdev_bar, requester_id)


def assert_clean_dma(result: ScenarioResult) -> None:
    assert result.faults == [], f"fault records: {result.faults}"
    assert result.dma_result == 0, f"testdev DMA_RESULT {result.dma_result:#x}"
    assert result.found == result.expected_data == bytes.fromhex("78563412")


def assert_moved_by_translation(result: ScenarioResult) -> None:
    """The data is on the page the leaf names, at the IOVA's page offset, not at the IOVA."""
    assert result.expected_address == result.tables.data_page + (SCENARIO_IOVA % PAGE_SIZE)
    assert result.expected_address // PAGE_SIZE != SCENARIO_IOVA // PAGE_SIZE
    assert result.at_iova == ZEROS


def test_bare_stages_pass_the_iova_through_unchanged(machine):
    result = machine.run(Stages.BARE)
    assert_clean_dma(result)
    assert result.expected_address == SCENARIO_IOVA
    assert result.at_iova == result.expected_data
    assert result.tables.data_page != SCENARIO_IOVA & ~(PAGE_SIZE - 1)
    assert machine.qt.memread(result.tables.data_page + SCENARIO_IOVA % PAGE_SIZE, 4) == ZEROS


def test_first_stage_sv39_moves_the_dma_to_the_leaf_page(machine):
    result = machine.run(Stages.FIRST_STAGE)
    assert_clean_dma(result)
    assert_moved_by_translation(result)
    assert result.tables.dc[3] >> 60 == 8 and result.tables.dc[1] == 0  # Sv39, G-stage Bare


def test_g_stage_sv39x4_moves_the_dma_to_the_leaf_page(machine):
    result = machine.run(Stages.G_STAGE)
    assert_clean_dma(result)
    assert_moved_by_translation(result)
    assert result.tables.dc[1] >> 60 == 8 and result.tables.dc[3] == 0  # Sv39x4, first Bare


def test_nested_walks_first_stage_tables_through_the_g_stage(machine):
    result = machine.run(Stages.NESTED)
    assert_clean_dma(result)
    assert_moved_by_translation(result)
    # iosatp holds a guest-physical root: a walk that skipped the G-stage would have
    # read zeroed memory there and faulted.
    iosatp_root = (result.tables.dc[3] & ((1 << 44) - 1)) * PAGE_SIZE
    assert iosatp_root != result.tables.first_stage_pages[0]
