"""DTB editing: our riscv,pci-iommu node and iommu-map equal what QEMU emits."""

import pytest

from vfiouser_iommu.lab.boot import machine_args
from vfiouser_iommu.lab.dtb import DtbError, add_pci_iommu, dump_dtb, iommu_description, iommu_map


def test_iommu_map_skips_the_iommu_itself():
    assert iommu_map(0x08, 0x8000) == [0, 0x8000, 0, 8, 9, 0x8000, 9, 0xFFF7]
    assert iommu_map(0, 7) == [1, 7, 1, 0xFFFF]


def test_iommu_map_for_listed_endpoints_only():
    assert iommu_map(0x08, 5, [0x18, 0x10]) == [0x10, 5, 0x10, 1, 0x18, 5, 0x18, 1]
    with pytest.raises(DtbError):
        iommu_map(0x08, 5, [0x08])


@pytest.mark.parametrize("slot", [1, 5])
def test_generated_node_equals_qemus_own(lab, slot):
    base = machine_args(lab, memory="1G")
    without = dump_dtb(base)
    with_builtin = dump_dtb(base + ["-device", f"riscv-iommu-pci,addr={slot:02x}.0"])
    ours = add_pci_iommu(without, slot << 3)
    assert iommu_description(ours) == iommu_description(with_builtin)


def test_refuses_a_tree_that_already_has_a_map(lab):
    dtb = dump_dtb(machine_args(lab) + ["-device", "riscv-iommu-pci"])
    with pytest.raises(DtbError):
        add_pci_iommu(dtb, 0x10)
