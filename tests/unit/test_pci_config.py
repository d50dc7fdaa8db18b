"""PCI configuration space model: header, BARs, capability list, write masks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser_iommu.pci.config import (
    BarSpec,
    CapId,
    ConfigSpace,
    MsixSpec,
    PciIdentity,
    pci_header_type0,
    pci_msix_cap,
    pci_pm_cap,
    pcie_cap,
)

IDENT = PciIdentity(0x1B36, 0x0005, 0x00FF00, revision_id=2, subsystem_vendor_id=0x1AF4,
                    subsystem_id=0x1100)


def make(**kwargs) -> ConfigSpace:
    kwargs.setdefault("msix", MsixSpec(4))
    return ConfigSpace(IDENT, {0: BarSpec(0x1000), 2: BarSpec(0x10000, is_64bit=True,
                                                              prefetchable=True)}, **kwargs)


def test_header_fields_parse_back():
    header = pci_header_type0.parse(bytes(make().data[:64]))
    assert (header.vendor_id, header.device_id) == (0x1B36, 0x0005)
    assert header.class_code == bytes([0x00, 0xFF, 0x00])
    assert header.revision_id == 2
    assert (header.subsystem_vendor_id, header.subsystem_id) == (0x1AF4, 0x1100)
    assert header.header_type == 0
    assert header.bar[2] == 0b1100  # 64-bit, prefetchable
    assert header.capabilities_pointer == 0x40
    assert header.status & 0x10


def test_layouts_have_their_spec_sizes():
    assert pci_header_type0.sizeof() == 64
    assert pci_pm_cap.sizeof() == 8
    assert pci_msix_cap.sizeof() == 12
    assert pcie_cap.sizeof() == 60


def test_capability_list_is_walkable():
    cfg = make(pcie=True)
    found = []
    ptr = cfg.data[0x34]
    while ptr:
        found.append(cfg.data[ptr])
        ptr = cfg.data[ptr + 1]
    assert found == [CapId.PM, CapId.MSIX, CapId.PCIE]
    assert all(off % 4 == 0 for off in cfg.capabilities.values())


def test_msix_capability_names_table_and_pba():
    cfg = make()
    cap = pci_msix_cap.parse(bytes(cfg.data[cfg.capabilities[CapId.MSIX]:][:12]))
    assert cap.message_control == 3
    assert cap.table_offset_bir == 0x800
    assert cap.pba_offset_bir == 0xC00


def test_read_only_fields_ignore_writes():
    cfg = make()
    before = bytes(cfg.data)
    cfg.write(0, b"\xff" * 4)
    cfg.write(0x08, b"\xff" * 4)
    cfg.write(0x2C, b"\xff" * 4)
    cfg.write(0x34, b"\xff")
    cfg.write(0x3D, b"\xff")
    assert bytes(cfg.data) == before


def test_bar_sizing_keeps_type_bits_and_alignment():
    cfg = make()
    cfg.write(0x10, b"\xff" * 4)
    assert cfg.read_int(0x10, 4) == 0xFFFFF000
    cfg.write(0x18, b"\xff" * 4)
    cfg.write(0x1C, b"\xff" * 4)
    assert cfg.read_int(0x18, 4) == 0xFFFF000C
    assert cfg.read_int(0x1C, 4) == 0xFFFFFFFF
    cfg.write(0x10, (0x4000_1234).to_bytes(4, "little"))
    assert cfg.read_int(0x10, 4) == 0x4000_1000
    cfg.write(0x14, b"\xff" * 4)                      # no BAR1
    assert cfg.read_int(0x14, 4) == 0


def test_rom_bar_reads_back_zero():
    cfg = make()
    cfg.write(0x30, (0xFFFFF800).to_bytes(4, "little"))
    assert cfg.read_int(0x30, 4) == 0


def test_command_register_mask():
    cfg = make()
    cfg.write(0x04, b"\xff\xff")
    assert cfg.read_int(0x04, 2) == 0x0547
    assert cfg.bus_master


def test_status_bits_are_write_one_to_clear():
    cfg = make()
    cfg.data[0x07] |= 0xF9
    cfg.write(0x06, b"\x00\x08")                    # clear signalled target abort only
    assert cfg.data[0x07] == 0xF1
    assert cfg.data[0x06] & 0x10                    # capability list bit stays


def test_msix_control_enable_and_mask_only():
    cfg = make()
    off = cfg.capabilities[CapId.MSIX]
    cfg.write(off + 2, b"\xff\xff")
    assert cfg.read_int(off + 2, 2) == 0xC003
    assert cfg.msix_enabled and cfg.msix_function_masked


def test_pm_power_state_and_pme_status():
    cfg = make()
    off = cfg.capabilities[CapId.PM]
    cfg.write(off + 4, b"\x03\x00")
    assert cfg.read_int(off + 4, 2) & 3 == 3
    cfg.data[off + 5] |= 0x80
    cfg.write(off + 4, b"\x00\x80")
    assert cfg.read_int(off + 4, 2) == 0x0008      # D0, No_Soft_Reset, PME status cleared


def test_write_hooks_see_writes_that_touch_their_range():
    cfg = make()
    seen = []
    cfg.on_write(0x04, 2, lambda off, size: seen.append((off, size)))
    cfg.write(0x00, b"\0" * 4)
    cfg.write(0x04, b"\x02")
    cfg.write(0x02, b"\0" * 4)
    assert seen == [(0x04, 1), (0x02, 4)]


def test_reset_restores_power_on_image():
    cfg = make()
    image = bytes(cfg.data)
    cfg.write(0x04, b"\x06\x00")
    cfg.write(0x10, b"\0\0\0\x40")
    cfg.reset()
    assert bytes(cfg.data) == image


@pytest.mark.parametrize("kwargs", [
    dict(size=0x1800), dict(size=8), dict(size=1 << 32)])
def test_bar_sizes_must_be_powers_of_two(kwargs):
    with pytest.raises(ValueError):
        BarSpec(**kwargs)


def test_bad_declarations():
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, {5: BarSpec(0x1000, is_64bit=True)})
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, {0: BarSpec(0x1000, is_64bit=True), 1: BarSpec(0x1000)})
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, {0: BarSpec(0x1000)}, msix=MsixSpec(4, bir=1))
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, {0: BarSpec(0x1000)}, msix=MsixSpec(4, table_offset=0xFF8))
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, {0: BarSpec(0x1000)},
                    msix=MsixSpec(4, table_offset=0x800, pba_offset=0x830))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 255), st.binary(min_size=1, max_size=8))
def test_writes_change_only_writable_bits(offset, data):
    cfg = make(pcie=True)
    data = data[:256 - offset]
    before = bytes(cfg.data)
    cfg.write(offset, data)
    for pos in range(offset, offset + len(data)):
        changed = before[pos] ^ cfg.data[pos]
        assert changed & ~(cfg.wmask[pos] | cfg.w1cmask[pos]) == 0
