"""The reference-scenario table builder, checked by an independent walk over fake RAM.

`lab.scenarios` writes DDT, device context and Sv39/Sv39x4 tables through a qtest
session; here the session is a sparse bytearray, and a small walker written from the
spec (§3 DDT, §5.1 page walks, two-stage for nested) follows what was written and must
reach the address the builder promised.
"""

from __future__ import annotations

import pytest

from vfiouser_iommu.lab.scenarios import (
    SCENARIO_IOVA,
    FaultRecord,
    PageAllocator,
    ScenarioError,
    ScenarioMemory,
    Stages,
    build_translation,
    pattern,
)

PAGE = 0x1000
V, R, W, U, A, D = 1, 2, 4, 16, 64, 128
PPN44 = (1 << 44) - 1
MEMORY = ScenarioMemory()
REQUESTER_ID = 0x10  # 00:02.0, where iommu-testdev sits in the qtest machine


class FakeRam:
    """Just enough of a qtest session: little-endian RAM, no MMIO."""

    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def _page(self, addr: int) -> bytearray:
        return self.pages.setdefault(addr // PAGE, bytearray(PAGE))

    def memread(self, addr: int, length: int) -> bytes:
        return bytes(self._page(a)[a % PAGE] for a in range(addr, addr + length))

    def memwrite(self, addr: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            self._page(addr + i)[(addr + i) % PAGE] = byte

    def memset(self, addr: int, length: int, value: int = 0) -> None:
        self.memwrite(addr, bytes([value]) * length)

    def readq(self, addr: int) -> int:
        return int.from_bytes(self.memread(addr, 8), "little")

    def writeq(self, addr: int, value: int) -> None:
        self.memwrite(addr, value.to_bytes(8, "little"))


def locate_dc(ram: FakeRam, ddt_root: int, levels: int, device_id: int, extended: bool) -> int:
    widths = [6, 9, 9] if extended else [7, 9, 8]
    shifts = [0, widths[0], widths[0] + widths[1]]
    table = ddt_root
    for level in reversed(range(1, levels)):
        ddte = ram.readq(table + 8 * ((device_id >> shifts[level]) & ((1 << widths[level]) - 1)))
        assert ddte & V and ddte & 0x3FE == 0, f"DDTE {ddte:#x}"
        table = (ddte >> 10 & PPN44) * PAGE
    return table + (64 if extended else 32) * (device_id & ((1 << widths[0]) - 1))


def walk(ram: FakeRam, root: int, address: int, root_bits: int, table_address=lambda a: a):
    """Sv39 (root_bits 9) or Sv39x4 (11) walk; returns (translated address, leaf PTE)."""
    table = root
    for level in (2, 1, 0):
        width = root_bits if level == 2 else 9
        index = (address >> (12 + 9 * level)) & ((1 << width) - 1)
        entry = ram.readq(table_address(table) + 8 * index)
        assert entry & V, f"invalid PTE at level {level} for {address:#x}"
        if entry & (R | W):
            assert level == 0, "scenario tables use 4 KiB leaves only"
            return (entry >> 10 & PPN44) * PAGE + address % PAGE, entry
        assert entry & (A | D | U) == 0, f"non-leaf PTE {entry:#x} with A/D/U"
        table = (entry >> 10 & PPN44) * PAGE
    raise AssertionError("no leaf at level 0")


def translate(ram: FakeRam, dc: list[int], iova: int) -> tuple[int, list[int]]:
    """The whole process of §5 for a no-PASID request; returns (address, leaf PTEs seen)."""
    iohgatp, iosatp = dc[1], dc[3]
    leaves: list[int] = []

    def g_stage(gpa: int) -> int:
        if iohgatp >> 60 == 0:
            return gpa
        assert iohgatp >> 60 == 8 and (iohgatp & PPN44) % 4 == 0  # Sv39x4, 16 KiB root
        spa, leaf = walk(ram, (iohgatp & PPN44) * PAGE, gpa, 11)
        leaves.append(leaf)
        return spa

    gpa = iova
    if iosatp >> 60:
        assert iosatp >> 60 == 8  # Sv39
        gpa, leaf = walk(ram, (iosatp & PPN44) * PAGE, iova, 9, table_address=g_stage)
        leaves.append(leaf)
    return g_stage(gpa), leaves


def build(stages: Stages, extended: bool = True, levels: int = 1, user: bool = True):
    ram = FakeRam()
    pages = PageAllocator(ram, MEMORY.base, MEMORY.limit)
    tables = build_translation(ram, pages, REQUESTER_ID, stages, SCENARIO_IOVA, extended,
                               MEMORY, levels, user)
    return ram, tables


def read_dc(ram: FakeRam, tables, levels: int, extended: bool) -> list[int]:
    dc_address = locate_dc(ram, tables.ddt_root, levels, REQUESTER_ID, extended)
    assert dc_address == tables.dc_address
    return [ram.readq(dc_address + 8 * i) for i in range(8 if extended else 4)]


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("extended", [True, False], ids=["dc64", "dc32"])
@pytest.mark.parametrize("stages", list(Stages), ids=lambda s: s.value)
def test_walk_reaches_the_promised_address(stages, extended, levels):
    ram, tables = build(stages, extended, levels)
    dc = read_dc(ram, tables, levels, extended)
    assert dc == tables.dc and dc[0] == V  # tc: V only, everything else 0
    address, leaves = translate(ram, dc, SCENARIO_IOVA)
    assert address == tables.expected_address
    if stages is not Stages.BARE:
        assert address == tables.data_page + SCENARIO_IOVA % PAGE != SCENARIO_IOVA
    assert all(leaf & 0xFF == V | R | W | U | A | D for leaf in leaves)


def test_nested_first_stage_holds_guest_physical_addresses():
    ram, tables = build(Stages.NESTED)
    iosatp_root = (tables.dc[3] & PPN44) * PAGE
    assert iosatp_root == tables.first_stage_pages[0] - MEMORY.guest_offset
    # Without the G-stage, that root is not where the builder wrote the table.
    assert ram.readq(iosatp_root + 8 * (SCENARIO_IOVA >> 30 & 0x1FF)) == 0
    # One first-stage leaf, and a G-stage leaf for each of its 3 tables and for the data.
    _, leaves = translate(ram, tables.dc, SCENARIO_IOVA)
    assert len(leaves) == 1 + 3 + 1


def test_user_leaves_off_builds_supervisor_leaves():
    ram, tables = build(Stages.G_STAGE, user=False)
    _, leaves = translate(ram, tables.dc, SCENARIO_IOVA)
    assert [leaf & 0xFF for leaf in leaves] == [V | R | W | A | D]


def test_device_id_too_wide_for_one_level_is_refused():
    ram = FakeRam()
    pages = PageAllocator(ram, MEMORY.base, MEMORY.limit)
    with pytest.raises(ScenarioError):
        build_translation(ram, pages, 0x40, Stages.BARE, SCENARIO_IOVA, True)


def test_fault_record_decodes_spec_fields():
    dw0 = 15 | 0x12345 << 12 | 1 << 32 | 1 << 33 | 3 << 34 | 0x10 << 40
    raw = b"".join(v.to_bytes(8, "little") for v in (dw0, 0, SCENARIO_IOVA, 0x1003001))
    assert FaultRecord.decode(raw) == FaultRecord(cause=15, pid=0x12345, pv=1, priv=1, ttyp=3,
                                                  did=0x10, iotval=SCENARIO_IOVA,
                                                  iotval2=0x1003001)


def test_pattern_is_testdev_word_little_endian():
    assert pattern(6) == bytes.fromhex("785634127856")
