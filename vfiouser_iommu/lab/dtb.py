"""Device trees for lab guests: describing an IOMMU that QEMU itself does not know.

QEMU's virt machine adds a `riscv,pci-iommu` node (and an `iommu-map` on the PCIe host
bridge) only for its own `riscv-iommu-pci`. Ours is a `vfio-user-pci` function, so we
take the DTB QEMU dumps (`-M virt,dumpdtb=FILE`), add the same node and map for our
IOMMU's BDF with pylibfdt, and boot with `-dtb`. The Linux binding
(Documentation/devicetree/bindings/iommu/riscv,iommu.yaml): the node is a child of the
host bridge with `reg = <BDF<<8 0 0 0 0>` and `#iommu-cells = <1>`; the bridge's
`iommu-map = <rid-base &iommu iommu-base length>...` maps requester IDs to device IDs.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import libfdt

# QEMU gives its riscv-iommu-pci node this phandle; we do the same when it is free so
# that our tree and QEMU's can be compared as they are.
QEMU_IOMMU_PHANDLE = 0x8000


class DtbError(Exception):
    pass


def dump_dtb(qemu_argv: list[str]) -> bytes:
    """Run QEMU with `dumpdtb` added to its -M option and return the tree it writes."""
    argv = list(qemu_argv)
    try:
        i = argv.index("-M") + 1
    except ValueError:
        raise DtbError("the QEMU command line has no -M option") from None
    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-dtb-") as tmp:
        out = Path(tmp) / "virt.dtb"
        argv[i] = f"{argv[i]},dumpdtb={out}"
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
        if not out.exists():
            raise DtbError(f"QEMU wrote no DTB: {proc.stderr.strip()[-300:]}")
        return out.read_bytes()


def _cells(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in values)


def _nodes(fdt: libfdt.Fdt):
    node, depth = 0, 0
    while True:
        yield node
        step = fdt.next_node(node, depth, quiet=(libfdt.NOTFOUND,))
        if not isinstance(step, list) or step[0] < 0 or step[1] < 0:
            return
        node, depth = step


def _compatible(fdt: libfdt.Fdt, node: int) -> list[bytes]:
    value = fdt.getprop(node, "compatible", quiet=(libfdt.NOTFOUND,))
    return bytes(value).split(b"\0") if isinstance(value, libfdt.Property) else []


def find_pcie_host(fdt: libfdt.Fdt) -> int:
    for node in _nodes(fdt):
        if b"pci-host-ecam-generic" in _compatible(fdt, node):
            return node
    raise DtbError("no pci-host-ecam-generic node in the tree")


def _used_phandles(fdt: libfdt.Fdt) -> set[int]:
    used = set()
    for node in _nodes(fdt):
        value = fdt.getprop(node, "phandle", quiet=(libfdt.NOTFOUND,))
        if isinstance(value, libfdt.Property):
            used.add(value.as_uint32())
    return used


def iommu_map(iommu_bdf: int, phandle: int, endpoints: list[int] | None = None) -> list[int]:
    """The host bridge's iommu-map cells.

    With `endpoints=None`, every requester ID except the IOMMU's own maps to itself (what
    QEMU emits for riscv-iommu-pci); otherwise exactly the listed requester IDs do.
    """
    cells: list[int] = []
    if endpoints is None:
        if iommu_bdf > 0:
            cells += [0, phandle, 0, iommu_bdf]
        cells += [iommu_bdf + 1, phandle, iommu_bdf + 1, 0xFFFF - iommu_bdf]
        return cells
    for rid in sorted(set(endpoints)):
        if rid == iommu_bdf:
            raise DtbError(f"requester ID {rid:#x} is the IOMMU's own")
        cells += [rid, phandle, rid, 1]
    return cells


def add_pci_iommu(dtb: bytes, iommu_bdf: int, endpoints: list[int] | None = None,
                  compatible: str = "riscv,pci-iommu") -> bytes:
    """Return `dtb` with a riscv,pci-iommu node for `iommu_bdf` and the bridge's map."""
    fdt = libfdt.Fdt(dtb)
    fdt.resize(len(dtb) + 4096)
    host = find_pcie_host(fdt)
    if isinstance(fdt.getprop(host, "iommu-map", quiet=(libfdt.NOTFOUND,)), libfdt.Property):
        raise DtbError("the PCIe host bridge already has an iommu-map")
    used = _used_phandles(fdt)
    phandle = QEMU_IOMMU_PHANDLE if QEMU_IOMMU_PHANDLE not in used else max(used) + 1
    node = fdt.add_subnode(host, f"iommu@{iommu_bdf:x}")
    fdt.setprop(node, "reg", _cells(iommu_bdf << 8, 0, 0, 0, 0))
    fdt.setprop_u32(node, "phandle", phandle)
    fdt.setprop_u32(node, "#iommu-cells", 1)
    fdt.setprop_str(node, "compatible", compatible)
    host = find_pcie_host(fdt)
    fdt.setprop(host, "iommu-map", _cells(*iommu_map(iommu_bdf, phandle, endpoints)))
    fdt.pack()
    return bytes(fdt.as_bytearray())


def iommu_description(dtb: bytes) -> dict:
    """The riscv,pci-iommu node and the bridge's iommu-map of a tree, for comparisons."""
    fdt = libfdt.Fdt(dtb)
    host = find_pcie_host(fdt)
    found, node = None, fdt.first_subnode(host, quiet=(libfdt.NOTFOUND,))
    while node >= 0 and found is None:
        if b"riscv,pci-iommu" in _compatible(fdt, node):
            found = node
        node = fdt.next_subnode(node, quiet=(libfdt.NOTFOUND,))
    if found is None:
        raise DtbError("no riscv,pci-iommu node under the PCIe host bridge")
    props, poff = {}, fdt.first_property_offset(found, quiet=(libfdt.NOTFOUND,))
    while poff >= 0:
        prop = fdt.get_property_by_offset(poff)
        props[prop.name] = bytes(prop)
        poff = fdt.next_property_offset(poff, quiet=(libfdt.NOTFOUND,))
    imap = fdt.getprop(host, "iommu-map")
    return {"name": fdt.get_name(found), "properties": props, "iommu-map": bytes(imap)}
