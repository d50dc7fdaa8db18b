"""Interrupt generation: ipsr, icvec and msi_cfg_tbl (spec v1.0.1 §5.18, §5.28–§5.29, §6).

Four causes (command queue, fault queue, performance monitoring, page-request queue)
set their bit in `ipsr`; `icvec` maps each cause to a vector. What a vector means
depends on how interrupts are signalled:

- **MSI, internal table** (default): `msi_cfg_tbl` lives in this register file; an
  interrupt is a 4-byte write of msi_data to msi_addr through `iommu.memory` (in the
  fctl.BE byte order). A masked vector stays pending and is sent when unmasked. After a
  successful write `raise_irq(vector)` is also called, so an embedder can watch
  interrupts without decoding memory writes. A failed write is fault 273.
- **MSI, external table** (`msi_table_external=True`): the PCI function emulates
  0x300–0x3FF as its MSI-X table (QEMU's layout), so this file only calls
  `raise_irq(vector)` and the MSI-X layer applies masking.
- **WSI** (fctl.WSI=1): each vector is a wire whose level is the OR of the ipsr bits
  mapped to it; `raise_irq(vector)` is called on each rising edge of a wire.

In every mode there is exactly one signal per 0→1 transition of an ipsr bit.
"""

from __future__ import annotations

from collections.abc import Callable

from vfiouser_iommu.iommu.regs_layouts import FCTL, ICVEC, IPSR, MSI_ADDR
from vfiouser_iommu.memory import MemoryAccessError

CIP, FIP, PMIP, PIP = (IPSR.mask(name) for name in ("cip", "fip", "pmip", "pip"))
_VECTOR_FIELD = {CIP: "civ", FIP: "fiv", PMIP: "pmiv", PIP: "piv"}
MSI_CFG_TBL_ENTRIES = 16
MSI_CAUSE_WRITE_FAULT = 273


class MsiEntry:
    """One msi_cfg_tbl entry (same layout as a PCIe MSI-X table entry)."""

    __slots__ = ("addr", "data", "masked", "pending")

    def __init__(self) -> None:
        self.addr = 0
        self.data = 0
        self.masked = False
        self.pending = False


class Interrupts:
    """ipsr/icvec/msi_cfg_tbl state and interrupt delivery for one IOMMU."""

    def __init__(self, regs, vectors: int, external_table: bool):
        if vectors not in (1, 2, 4, 8, 16):
            raise ValueError(f"interrupt vectors must be a power of two <= 16, not {vectors}")
        self.regs = regs
        self.vectors = vectors
        self.external_table = external_table
        config = regs.config
        self._icvec_mask = 0
        for field, present in (("civ", True), ("fiv", True), ("pmiv", config.hpm),
                               ("piv", config.ats)):
            if present:
                self._icvec_mask |= ICVEC.mask(field) & (
                    (vectors - 1) * (ICVEC.mask(field) & -ICVEC.mask(field)))
        #: conditions that re-set an ipsr bit right after software clears it
        self.persistent: dict[int, Callable[[], bool]] = {}
        self.reset()

    def reset(self) -> None:
        self.ipsr = 0
        self.icvec = 0
        self.msi_cfg_tbl = [MsiEntry() for _ in range(MSI_CFG_TBL_ENTRIES)]
        self._wires = 0

    # -- registers ----------------------------------------------------------------------
    def write_ipsr(self, value: int, mask: int) -> None:
        cleared = self.ipsr & value & mask & (CIP | FIP | PMIP | PIP)
        self.ipsr &= ~cleared
        self._update_wires()
        for bit, condition in self.persistent.items():
            if cleared & bit and condition():
                self.raise_cause(bit)

    def write_icvec(self, value: int, mask: int) -> None:
        self.icvec = ((self.icvec & ~mask) | (value & mask)) & self._icvec_mask
        self._update_wires()

    def vector_of(self, cause: int) -> int:
        return ICVEC.get(self.icvec, _VECTOR_FIELD[cause])

    # -- msi_cfg_tbl ----------------------------------------------------------------------
    def write_msi_addr(self, index: int, value: int, mask: int) -> None:
        entry = self.msi_cfg_tbl[index]
        entry.addr = ((entry.addr & ~mask) | (value & mask)) & MSI_ADDR.mask("ADDR")

    def write_msi_data(self, index: int, value: int, mask: int) -> None:
        entry = self.msi_cfg_tbl[index]
        entry.data = ((entry.data & ~mask) | (value & mask)) & 0xFFFF_FFFF

    def read_msi_vec_ctl(self, index: int) -> int:
        return int(self.msi_cfg_tbl[index].masked)

    def write_msi_vec_ctl(self, index: int, value: int, mask: int) -> None:
        entry = self.msi_cfg_tbl[index]
        entry.masked = bool(value & mask & 1) if mask & 1 else entry.masked
        if not entry.masked and entry.pending:
            entry.pending = False
            self._send_msi(index)

    # -- delivery -------------------------------------------------------------------------
    def raise_cause(self, cause: int) -> None:
        """A cause's condition occurred: set its ipsr bit and signal a 0→1 edge."""
        if self.ipsr & cause:
            return
        self.ipsr |= cause
        vector = self.vector_of(cause)
        if self._wsi():
            self._update_wires()
        elif self.external_table:
            self._notify(vector)
        else:
            entry = self.msi_cfg_tbl[vector]
            if entry.masked:
                entry.pending = True
            else:
                self._send_msi(vector)

    def fctl_changed(self) -> None:
        """fctl.WSI may have switched between wires and messages."""
        self._update_wires()

    def wire_level(self, vector: int) -> bool:
        """WSI: whether the wire of `vector` is asserted."""
        return bool(self._wires >> vector & 1)

    def _wsi(self) -> bool:
        return bool(FCTL.get(self.regs.iommu.fctl, "WSI"))

    def _update_wires(self) -> None:
        if not self._wsi():
            self._wires = 0
            return
        wires = 0
        for cause in (CIP, FIP, PMIP, PIP):
            if self.ipsr & cause:
                wires |= 1 << self.vector_of(cause)
        rising, self._wires = wires & ~self._wires, wires
        for vector in range(self.vectors):
            if rising >> vector & 1:
                self._notify(vector)

    def _notify(self, vector: int) -> None:
        if self.regs.iommu.raise_irq is not None:
            self.regs.iommu.raise_irq(vector)

    def _send_msi(self, vector: int) -> None:
        entry = self.msi_cfg_tbl[vector]
        big_endian = bool(FCTL.get(self.regs.iommu.fctl, "BE"))
        try:
            self.regs.iommu.memory.write_int(entry.addr, 4, entry.data, big_endian=big_endian)
        except MemoryAccessError:
            self.regs.report_internal_fault(MSI_CAUSE_WRITE_FAULT, entry.addr)
            return
        self._notify(vector)
