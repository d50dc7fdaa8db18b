"""The side-by-side scenarios' command encodings and table damage, checked independently.

`lab.scenarios` writes IOTINVAL.VMA and IOFENCE.C from the spec by hand (it must not
share our IOMMU's layouts); here each is decoded with the IOMMU's construct layouts
(§4.1), so a wrong bit on either side disagrees. `Breakage` must damage exactly the
entry it names.
"""

from __future__ import annotations

import pytest
from test_scenarios_tables import FakeRam

from vfiouser_iommu.iommu.regs_layouts import CMD_IOFENCE, CMD_IOTINVAL
from vfiouser_iommu.lab.scenarios import (
    SCENARIO_IOVA,
    Breakage,
    PageAllocator,
    ScenarioError,
    ScenarioMemory,
    Stages,
    build_translation,
    iofence_c,
    iotinval_vma,
)

MEMORY = ScenarioMemory()


def decoded(layout, command: tuple[int, int]) -> dict[str, int]:
    dw0, dw1 = command
    return layout.decode(dw1 << 64 | dw0)


def test_iotinval_vma_by_address_only():
    fields = decoded(CMD_IOTINVAL, iotinval_vma(address=0x8060_4567))
    assert fields["opcode"] == 1 and fields["func3"] == 0
    assert (fields["AV"], fields["PSCV"], fields["GV"]) == (1, 0, 0)
    assert fields["ADDR"] == 0x80604
    assert fields["PSCID"] == fields["GSCID"] == fields["NL"] == fields["S"] == 0


def test_iotinval_vma_with_every_filter():
    fields = decoded(CMD_IOTINVAL, iotinval_vma(address=0x1_2345_6000, pscid=0xABCDE,
                                                gscid=0xBEEF))
    assert (fields["AV"], fields["PSCV"], fields["GV"]) == (1, 1, 1)
    assert (fields["ADDR"], fields["PSCID"], fields["GSCID"]) == (0x123456, 0xABCDE, 0xBEEF)


def test_iotinval_vma_without_filters_is_a_global_flush():
    assert iotinval_vma() == (1, 0)


def test_iofence_c_writes_data_at_address():
    fields = decoded(CMD_IOFENCE, iofence_c(address=0x8100_2004, data=0x600DF00D))
    assert (fields["opcode"], fields["func3"], fields["AV"]) == (2, 0, 1)
    assert fields["ADDR"] << 2 == 0x8100_2004 and fields["DATA"] == 0x600DF00D
    assert fields["WSI"] == fields["PR"] == fields["PW"] == 0
    assert decoded(CMD_IOFENCE, iofence_c())["AV"] == 0


def test_iofence_c_refuses_an_unaligned_address():
    with pytest.raises(ScenarioError):
        iofence_c(address=0x8100_2002)


@pytest.mark.parametrize("stages", [Stages.FIRST_STAGE, Stages.G_STAGE, Stages.NESTED])
def test_leaf_not_valid_zeroes_only_the_iova_leaf(stages):
    ram = FakeRam()
    tables = build_translation(ram, PageAllocator(ram, MEMORY.base, MEMORY.limit), 0x10,
                               stages, SCENARIO_IOVA, True, MEMORY)
    before = {page: bytes(data) for page, data in ram.pages.items()}
    assert ram.readq(tables.leaf_pte) & 1
    Breakage.LEAF_NOT_VALID.apply(ram, tables)
    assert ram.readq(tables.leaf_pte) == 0
    changed = [page for page, data in ram.pages.items() if bytes(data) != before[page]]
    assert changed == [tables.leaf_pte // 0x1000]


def test_dc_not_valid_clears_only_tc_v():
    ram = FakeRam()
    tables = build_translation(ram, PageAllocator(ram, MEMORY.base, MEMORY.limit), 0x10,
                               Stages.FIRST_STAGE, SCENARIO_IOVA, True, MEMORY)
    iosatp = ram.readq(tables.dc_address + 24)
    Breakage.DC_NOT_VALID.apply(ram, tables)
    assert ram.readq(tables.dc_address) == 0
    assert ram.readq(tables.dc_address + 24) == iosatp != 0


def test_bare_has_no_leaf_to_break():
    ram = FakeRam()
    tables = build_translation(ram, PageAllocator(ram, MEMORY.base, MEMORY.limit), 0x10,
                               Stages.BARE, SCENARIO_IOVA, True, MEMORY)
    with pytest.raises(ScenarioError):
        Breakage.LEAF_NOT_VALID.apply(ram, tables)
