"""The IOMMU as a PCI function: identity, BAR0 = register file, MSI-X over msi_cfg_tbl,
capability options, deferred command processing."""

import pytest

from vfiouser_iommu.iommu_pci import IommuFunction, build_iommu_function
from vfiouser_iommu.pci.function import IRQ_MSIX


class Host:
    def __init__(self):
        self.soon, self.irqs = [], []

    def trigger(self, index, vector):
        self.irqs.append((index, vector))
        return True

    def call_soon(self, callback):
        self.soon.append(callback)


def test_identity_bar_and_msix_match_qemus_riscv_iommu_pci():
    f = IommuFunction()
    cfg = f.config
    assert cfg.read_int(0, 2) == 0x1B36 and cfg.read_int(2, 2) == 0x0014
    assert cfg.read_int(0x09, 3) == 0x080600
    assert f.region_size(0) == 0x1000
    assert cfg.read_int(0x10, 4) & 0x6 == 0x4          # 64-bit memory BAR
    assert (cfg.msix.table_offset, cfg.msix.pba_offset, cfg.msix.bir) == (0x300, 0x400, 0)
    assert f.irq_count(IRQ_MSIX) == 16


def test_capabilities_register_is_bar0_offset_0():
    f = IommuFunction()
    caps = int.from_bytes(f.region_read(0, 0, 8), "little")
    assert caps == f.iommu.config.capabilities and caps & 0xFF == 0x10


def test_default_advertises_qemus_v1_0_1_capabilities_and_more():
    qemu = 0x0000_0078_C2CF_4F10 & ~(1 << 14)          # less Svrsw60t59b (not in v1.0.1)
    caps = IommuFunction().iommu.config.capabilities
    assert caps & qemu == qemu
    assert caps & (1 << 24) and caps & (1 << 15)        # and AMO_HWAD, Svpbmt, ...


def test_capability_options():
    assert not build_iommu_function({"ats": "off"}).iommu.config.ats
    f = build_iommu_function({"caps": "0x78C2CF4F10", "sv57": "off", "pas": "48"})
    assert f.iommu.config.sv39 and not f.iommu.config.sv57 and f.iommu.config.pas == 48
    for bad in ({"caps": "lots"}, {"ats": "maybe"}, {"nonsense": "on"}, {"igs": "on"},
                {"pas": "x"}):
        with pytest.raises(ValueError):
            build_iommu_function(bad)


def _enable_msix(f):
    ptr = f.config.read_int(0x34, 1)
    while f.config.read_int(ptr, 1) != 0x11:
        ptr = f.config.read_int(ptr + 1, 1)
    control = f.config.read_int(ptr + 2, 2)
    f.config.write(ptr + 2, (control | 0x8000).to_bytes(2, "little"))


def _ring(f, host, commands):
    """Put `commands` (16 bytes each) in a 2048-entry queue at RAM and move cqt."""
    from vfiouser_iommu.iommu.regs_layouts import CQCSR

    f.region_write(0, 0x18, (0x8000_0000 >> 2 | 10).to_bytes(8, "little"))  # cqb: 2^11
    f.region_write(0, 0x48, (CQCSR.mask("cqen") | CQCSR.mask("cie")).to_bytes(4, "little"))
    f.memory.write(0x8000_0000, b"".join(commands))
    f.region_write(0, 0x24, len(commands).to_bytes(4, "little"))


def _fence():
    return (2).to_bytes(8, "little") + bytes(8)          # IOFENCE.C, no fields


def test_a_long_command_queue_runs_in_bounded_steps_from_the_loop():
    f, host = IommuFunction(), Host()
    f.attach(host)
    f.memory.add_region(0x8000_0000, bytearray(1 << 20))
    _ring(f, host, [_fence()] * 2000)
    steps = 0
    while host.soon:
        host.soon.pop(0)()
        steps += 1
    assert int.from_bytes(f.region_read(0, 0x20, 4), "little") == 2000
    assert steps >= (2000 - 64) // 256            # the doorbell ran at most its budget


def test_an_illegal_command_raises_the_cq_vector_through_msix():
    from vfiouser_iommu.iommu.regs_layouts import CQCSR

    f, host = IommuFunction(), Host()
    f.attach(host)
    f.memory.add_region(0x8000_0000, bytearray(1 << 20))
    _enable_msix(f)
    _ring(f, host, [bytes(16)])                           # opcode 0: illegal
    while host.soon:
        host.soon.pop(0)()
    assert int.from_bytes(f.region_read(0, 0x48, 4), "little") & CQCSR.mask("cmd_ill")
    assert int.from_bytes(f.region_read(0, 0x20, 4), "little") == 0   # cqh stays on it
    assert host.irqs == [(IRQ_MSIX, 0)]                   # icvec.civ resets to vector 0
