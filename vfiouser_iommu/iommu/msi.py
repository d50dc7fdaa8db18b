"""MSI address translation with a flat MSI page table (spec v1.0.1 §3.3 step 18,
§3.1.3.6, "MSI address translation" §3.3.6; MSI PTE and MRIF formats from the AIA spec).

`translate_msi` decides whether a GPA is an interrupt-file page of the device
(`msi_addr_mask`/`msi_addr_pattern`), fetches and checks its MSI PTE (cached by
DC.iohgatp.GSCID + MSI page table + interrupt-file number, never when V=0 or malformed
unless negative caching is on) and returns either the
basic-translate result (page offset kept) or an MRIF target. `deliver_mrif` performs an
MSI write to an MRIF-mode page: set the pending bit in the memory-resident interrupt
file (pending doubleword of identity i at MRIF + 16*(i//64)), then always send the
notice MSI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfiouser_iommu.iommu import steps
from vfiouser_iommu.iommu.directory import (
    MSIPTP_FLAT,
    PPN_MASK,
    DeviceContext,
    read_table_word,
)
from vfiouser_iommu.iommu.faults import Cause, Stop
from vfiouser_iommu.iommu.negative import negative_fill, negative_hit
from vfiouser_iommu.iommu.request import Access, MrifTarget, Request, Translation
from vfiouser_iommu.memory import MemoryAccessError, MemoryPoisonError

if TYPE_CHECKING:
    from vfiouser_iommu.iommu.core import RiscvIommu, StageContext

MSI_PTE_BASIC, MSI_PTE_MRIF = 3, 1
_BASIC_RESERVED = (0x7F << 3) | (0x1FF << 54)
_MRIF_DW0_RESERVED = (0xF << 3) | (0x1FF << 54)
_MRIF_DW1_RESERVED = (0x3F << 54) | (0x7 << 61)
_C = 1 << 63
NOT_VALID, MISCONFIGURED = "V=0", "misconfigured (reserved bits or mode, C=1)"


def extract_bits(value: int, mask: int) -> int:
    """Gather the bits of `value` selected by `mask` into the low end (PEXT)."""
    out = 0
    k = 0
    while mask:
        low = mask & -mask
        if value & low:
            out |= 1 << k
        k += 1
        mask ^= low
    return out


def is_interrupt_file(gpa: int, mask: int, pattern: int) -> bool:
    page = gpa >> 12
    return (page & ~mask) == (pattern & ~mask)


def flat(iommu: RiscvIommu, dc: DeviceContext) -> bool:
    """Whether MSI address translation applies to `dc` (msiptp.MODE Flat)."""
    return dc.msiptp >> 60 == MSIPTP_FLAT and iommu.config.msi_flat


def holds_interrupt_file(gpa_base: int, size: int, mask: int, pattern: int) -> bool:
    """Whether the naturally aligned GPA range [gpa_base, gpa_base + size) holds an
    interrupt-file page: the page-number bits above the range's own must match the
    pattern wherever the mask does not free them."""
    span = (size >> 12) - 1
    return not ((gpa_base >> 12) ^ pattern) & ~mask & ~span


def unshadowed_size(dc: DeviceContext, gpa: int, size: int) -> int:
    """The page size to report for the non-interrupt-file `gpa` inside a naturally
    aligned translation of `size`, so that no reported page holds an interrupt file.

    An interrupt-file access must reach the MSI page table (§3.3 step 18), so a caller
    splitting a DMA at reported page boundaries, or an IOTLB entry, must never carry it
    past. Only the standard sizes (`size`, 2 MiB, 4 KiB) are tried: the IOTLB probes
    once per page size present, so odd sizes would slow every lookup.
    """
    mask, pattern = dc.msi_mask, dc.msi_pattern
    for candidate in (size, 1 << 21):
        if candidate <= size and not holds_interrupt_file(gpa & ~(candidate - 1), candidate,
                                                          mask, pattern):
            return candidate
    return 1 << 12


def msi_pte_misconfigured(dw0: int, dw1: int, msi_mrif: bool) -> bool:
    """§3.1.3.6: reserved bits, reserved modes, and C=1 (custom; we support none)."""
    mode = dw0 >> 1 & 3
    if dw0 & _C:
        return True
    if mode == MSI_PTE_BASIC:
        return bool(dw0 & _BASIC_RESERVED)
    if mode == MSI_PTE_MRIF:
        return not msi_mrif or bool(dw0 & _MRIF_DW0_RESERVED or dw1 & _MRIF_DW1_RESERVED)
    return True


def _fetch_msi_pte(iommu: RiscvIommu, ctx: StageContext, index: int,
                   file_page: int) -> tuple[int, int]:
    """The MSI PTE of interrupt file `index`, from the cache or the MSI page table.

    Its cache tag is DC.iohgatp.GSCID even when the G-stage is Bare: that is what the
    spec's recipe for an MSI PTE change invalidates (IOTINVAL.GVMA GV=AV=1 with
    GSCID=DC.iohgatp.GSCID). Cached values are (dw0, dw1, file page, checker source).
    """
    dc = ctx.dc
    caches = iommu.caches
    key = (dc.gscid, dc.msiptp_ppn, index)
    cached = caches.msi.lookup(key)
    if cached is not None:
        caches.stats.hits["msi"] += 1
        return cached[0], cached[1]
    caches.stats.misses["msi"] += 1
    if caches.negative is not None:
        negative_hit(iommu, "msi", key, ctx)
    addr = (dc.msiptp_ppn << 12) | (index * 16)
    be = iommu.big_endian
    dw0, dw1 = (read_table_word(iommu.memory, iommu.config.pas, addr + 8 * k, 8, be,
                                Cause.MSI_PTE_LOAD_ACCESS_FAULT) for k in range(2))
    why = NOT_VALID if not dw0 & 1 else None
    if why is None and msi_pte_misconfigured(dw0, dw1, iommu.config.msi_mrif):
        why = MISCONFIGURED
    rec = iommu.recorder
    source = None
    if rec is not None:
        mark = rec.mark()
        rec.step(steps.MSI_PTE, 0, addr, (dw0, dw1), why or steps.VALID, big_endian=be,
                 input=file_page << 12)
        source = rec.source(mark)
    if why is NOT_VALID:
        if caches.negative is not None:
            negative_fill(iommu, "msi", key, ctx, source, file_page)
        raise Stop(Cause.MSI_PTE_NOT_VALID)
    if why is not None:
        raise Stop(Cause.MSI_PTE_MISCONFIGURED)
    caches.msi.insert(key, (dw0, dw1, file_page, source))
    return dw0, dw1


def translate_msi(iommu: RiscvIommu, ctx: StageContext, gpa: int) -> Translation | None:
    """§3.3 step 18 on GPA `gpa`: None when it is not an interrupt-file page."""
    dc = ctx.dc
    if not flat(iommu, dc):
        return None
    mask, pattern = dc.msi_mask, dc.msi_pattern
    if not is_interrupt_file(gpa, mask, pattern):
        return None
    dw0, dw1 = _fetch_msi_pte(iommu, ctx, extract_bits(gpa >> 12, mask), gpa >> 12)
    if ctx.access is Access.EXECUTE:
        raise Stop(Cause.INSTRUCTION_ACCESS_FAULT)
    if dw0 >> 1 & 3 == MSI_PTE_BASIC:
        spa = ((dw0 >> 10 & PPN_MASK) << 12) | (gpa & 0xFFF)
        return Translation(spa, 1 << 12, gpa=gpa, msi=True)
    if ctx.request.debug:
        raise Stop(Cause.TRANSACTION_TYPE_DISALLOWED)
    target = MrifTarget((dw0 >> 7 & ((1 << 47) - 1)) << 9, dw1 >> 10 & PPN_MASK,
                        (dw1 & 0x3FF) | (dw1 >> 60 & 1) << 10)
    return Translation(target.mrif_address, 1 << 12, u=True, gpa=gpa, msi=True, mrif=target)


def deliver_mrif(iommu: RiscvIommu, request: Request, translation: Translation,
                 data: bytes) -> None:
    """An MSI write of `data` at `request.iova` to an MRIF-mode page (AIA rules).

    Writes that are not an aligned 32-bit store are the caller's to abort. A write whose
    address bits 11:3 or data bits 31:11 are set is accepted and discarded, as is a
    big-endian write (address bit 2) when the IOMMU supports only little-endian.
    """
    target = translation.mrif
    address = translation.gpa if translation.gpa is not None else request.iova
    big = bool(address & 4)
    if address & 0xFF8 or (big and not iommu.config.end):
        return
    identity = int.from_bytes(data, "big" if big else "little")
    if identity >> 11:
        return
    pending = target.mrif_address + (identity // 64) * 16
    be = iommu.big_endian
    memory = iommu.memory
    if not memory.contains(pending, 8) or pending + 8 > 1 << iommu.config.pas:
        raise Stop(Cause.MRIF_ACCESS_FAULT)
    try:
        old = memory.read_int(pending, 8, big_endian=be)
    except MemoryPoisonError:
        # The read-modify-write read corrupted data: nothing is written, no notice.
        raise Stop(Cause.MRIF_DATA_CORRUPTION) from None
    except MemoryAccessError:
        raise Stop(Cause.MRIF_ACCESS_FAULT) from None
    try:
        memory.write_int(pending, 8, old | 1 << (identity % 64), big_endian=be)
        memory.write_int(target.notice_ppn << 12, 4, target.notice_id)
    except MemoryAccessError:
        raise Stop(Cause.MRIF_ACCESS_FAULT) from None
