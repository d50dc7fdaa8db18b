"""Test helper: builds RISC-V IOMMU tables (DDT, PDT, page tables, MSI PT) in a
GuestMemory, the way a driver would, so translation tests read like the spec.

Addresses handed to the builder are "table addresses": SPAs normally, GPAs for tables
that a nested first stage or a PDT behind a G-stage reaches (then `offset` is the
SPA - GPA distance of the identity-plus-offset G-stage the test sets up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vfiouser_iommu.iommu import IommuConfig, RiscvIommu
from vfiouser_iommu.iommu.walk import PagingMode
from vfiouser_iommu.memory import GuestMemory

RAM_BASE = 0x8000_0000
RAM_SIZE = 64 << 20

V, R, W, X, U, G, A, D = (1 << n for n in range(8))
LEAF_RW = V | R | W | A | D | U
LEAF_RWX = LEAF_RW | X


def atp(mode: int, ppn: int, tag: int = 0) -> int:
    """iosatp/iohgatp/pdtp/msiptp value: MODE 63:60, tag (GSCID) 59:44, PPN 43:0."""
    return mode << 60 | tag << 44 | ppn


@dataclass
class Builder:
    mem: GuestMemory
    big_endian: bool = False
    offset: int = 0  # SPA = table address + offset
    # One allocator shared by every copy made with dataclasses.replace().
    heap: list = field(default_factory=lambda: [RAM_BASE + (8 << 20)])

    def alloc(self, size: int = 4096, align: int = 4096) -> int:
        """Zeroed SPA block; returns its table address."""
        addr = (self.heap[0] + align - 1) & ~(align - 1)
        self.heap[0] = addr + size
        self.mem.write(addr, bytes(size))
        return addr - self.offset

    def write64(self, table_addr: int, value: int, big_endian: bool | None = None) -> None:
        be = self.big_endian if big_endian is None else big_endian
        self.mem.write_int(table_addr + self.offset, 8, value, big_endian=be)

    def read64(self, table_addr: int) -> int:
        return self.mem.read_int(table_addr + self.offset, 8, big_endian=self.big_endian)

    def write_pte(self, table_addr: int, value: int, size: int) -> None:
        self.mem.write_int(table_addr + self.offset, size, value, big_endian=self.big_endian)

    # -- device directory ---------------------------------------------------------------
    def ddt_slot(self, root: int, levels: int, device_id: int, dc_size: int) -> int:
        """Address of device_id's DC, creating non-leaf DDT pages as needed."""
        b0 = 6 if dc_size == 64 else 7
        shifts = [0, b0, b0 + 9]
        a = root
        for i in range(levels - 1, 0, -1):
            slot = a + (device_id >> shifts[i] & 0x1FF) * 8
            entry = self.read64(slot)
            if not entry & 1:
                page = self.alloc()
                entry = (page >> 12) << 10 | 1
                self.write64(slot, entry)
            a = (entry >> 10 & ((1 << 44) - 1)) << 12
        return a + (device_id & ((1 << b0) - 1)) * dc_size

    def set_dc(self, root: int, levels: int, device_id: int, dc_size: int, *, tc: int = 1,
               iohgatp: int = 0, ta: int = 0, fsc: int = 0, msiptp: int = 0,
               msi_mask: int = 0, msi_pattern: int = 0) -> int:
        slot = self.ddt_slot(root, levels, device_id, dc_size)
        words = [tc, iohgatp, ta, fsc, msiptp, msi_mask, msi_pattern, 0][:dc_size // 8]
        for k, w in enumerate(words):
            self.write64(slot + 8 * k, w)
        return slot

    # -- process directory ---------------------------------------------------------------
    def set_pc(self, root: int, levels: int, process_id: int, ta: int, fsc: int,
               big_endian: bool | None = None) -> int:
        a = root
        shifts = {2: 17, 1: 8}
        widths = {2: 0x7, 1: 0x1FF}
        for i in range(levels - 1, 0, -1):
            slot = a + (process_id >> shifts[i] & widths[i]) * 8
            entry = self.read64(slot)
            if not entry & 1:
                entry = (self.alloc() >> 12) << 10 | 1
                self.write64(slot, entry, big_endian)
            a = (entry >> 10 & ((1 << 44) - 1)) << 12
        slot = a + (process_id & 0xFF) * 16
        self.write64(slot, ta, big_endian)
        self.write64(slot + 8, fsc, big_endian)
        return slot

    # -- page tables -----------------------------------------------------------------------
    def root(self, mode: PagingMode) -> int:
        size = 4096 << mode.widen
        return self.alloc(size, size)

    def map(self, mode: PagingMode, root: int, va: int, pa: int, size: int = 4096,
            flags: int = LEAF_RW, napot: bool = False) -> int:
        """Install a leaf mapping va -> pa of `size` (4K, superpage, or 64K napot)."""
        leaf_level = 0 if napot else (size.bit_length() - 13) // mode.vpn_bits
        a = root
        for i in range(mode.levels - 1, -1, -1):
            width = mode.vpn_bits + (mode.widen if i == mode.levels - 1 else 0)
            slot = a + (va >> (12 + i * mode.vpn_bits) & ((1 << width) - 1)) * mode.pte_size
            if i == leaf_level:
                if napot:
                    for k in range(16):
                        ppn = ((pa >> 12) & ~0xF) | 0b1000
                        self.write_pte(slot + k * mode.pte_size, 1 << 63 | ppn << 10 | flags,
                                       mode.pte_size)
                else:
                    self.write_pte(slot, (pa >> 12) << 10 | flags, mode.pte_size)
                return slot
            entry = self.mem.read_int(slot + self.offset, mode.pte_size,
                                      big_endian=self.big_endian)
            if not entry & 1:
                entry = (self.alloc() >> 12) << 10 | V
                self.write_pte(slot, entry, mode.pte_size)
            a = (entry >> 10 & ((1 << 44) - 1)) << 12
        raise AssertionError("unreachable")


def make_iommu(config: IommuConfig | None = None, levels: int = 3,
               big_endian: bool = False) -> tuple[RiscvIommu, Builder, int]:
    """A RiscvIommu over fresh RAM with an empty DDT of `levels` levels in ddtp."""
    mem = GuestMemory.ram(RAM_BASE, RAM_SIZE)
    iommu = RiscvIommu(mem, config or IommuConfig())
    builder = Builder(mem, big_endian)
    root = builder.alloc()
    iommu.set_register("fctl", 1 if big_endian else 0)
    iommu.set_register("ddtp", (root >> 12) << 10 | (levels + 1))
    return iommu, builder, root
