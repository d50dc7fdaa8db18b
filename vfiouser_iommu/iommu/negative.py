"""Negative caching (`--iommu ...,negative=on`): invalid results kept until invalidated.

Spec v1.0.1 §4.1 / §10 forbids caching device contexts, process contexts, first- and
second-stage PTEs and MSI PTEs whose V bit is 0, so software need not invalidate after
changing V from 0 to 1. Some VMMs want the spec to allow it (an emulated IOMMU then
saves a walk for every DMA that keeps faulting), and software written for that world
must invalidate after V=0→1 too. This mode models that world, as a deliberate deviation
(docs/introspection.md): a walk that stops on a V=0 entry leaves a negative entry, and
until the invalidation that covers it the same request faults again without a walk.

Tags are the ones of the positive caches (caches.py): DCs by device_id (IODIR.INVAL_DDT),
PCs by device_id+process_id (IODIR.INVAL_PDT), first-stage results by GSCID/PSCID and
the IOVA region of the invalid PTE (IOTINVAL.VMA), G-stage results by GSCID and the GPA
region (IOTINVAL.GVMA), MSI PTEs by the MSI cache's key (IOTINVAL.GVMA). Lookups happen
only on a miss of the positive cache, so the mode costs nothing on a hit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from vfiouser_iommu.iommu.caches import TlbEntry
from vfiouser_iommu.iommu.faults import GUEST_PAGE_FAULT, PAGE_FAULT, Cause, Stop

if TYPE_CHECKING:
    from vfiouser_iommu.iommu.core import RiscvIommu


class NegativeEntry(NamedTuple):
    """A cached "not valid" for a directory entry or an MSI PTE (shaped like an MSI
    cache value, whose invalidation looks at the interrupt file's page)."""

    dw0: int = 0
    dw1: int = 0
    file_page: int | None = None
    source: object = None  # steps.Source when the checker is on


_DIRECTORY_CAUSE = {"ddt": Cause.DDT_ENTRY_NOT_VALID, "pdt": Cause.PDT_ENTRY_NOT_VALID,
                    "msi": Cause.MSI_PTE_NOT_VALID}


def negative_hit(iommu: RiscvIommu, kind: str, key, ctx=None, g_fault=None) -> None:
    """On a miss of the positive cache `kind`: raise the cached invalid result if any.

    Keys: "ddt" device_id, "pdt" (device_id, process_id), "msi" the MSI cache key,
    "iotlb" (space, iova), "gtlb" (space, gpa) with `g_fault` = (access, iotval2) of
    the guest page fault to raise.
    """
    negative = iommu.caches.negative
    if kind in _DIRECTORY_CAUSE:
        entry = getattr(negative, kind).lookup(key)
    else:
        entry = getattr(negative, kind).lookup(*key)
    if entry is None:
        return
    iommu.caches.stats.hits["negative_" + kind] += 1
    if iommu.checker is not None:
        iommu.checker.negative_hit(kind, key, entry, ctx)
    if kind in _DIRECTORY_CAUSE:
        raise Stop(_DIRECTORY_CAUSE[kind])
    if kind == "iotlb":
        raise Stop(PAGE_FAULT[ctx.access])
    access, iotval2 = g_fault
    raise Stop(GUEST_PAGE_FAULT[access], iotval2)


def negative_fill(iommu: RiscvIommu, kind: str, key, ctx, source,
                  file_page: int | None = None) -> None:
    """Cache an invalid result. "iotlb"/"gtlb" keys are (address, mode, level) of the
    walk that met the V=0 PTE: the entry covers the region that PTE would map. An MSI
    PTE's entry keeps the page of its interrupt file (`file_page`)."""
    negative = iommu.caches.negative
    if kind in _DIRECTORY_CAUSE:
        getattr(negative, kind).insert(key, NegativeEntry(file_page=file_page, source=source))
        return
    address, mode, level = key
    size = 1 << (12 + level * mode.vpn_bits)
    base = address & ~(size - 1)
    if kind == "iotlb":
        entry = TlbEntry(ctx.gscid, ctx.pscid, base, size, 0, 0, None, 0, None, (), source)
        negative.iotlb.insert((ctx.gscid, ctx.pscid), entry)
    else:
        entry = TlbEntry(ctx.gscid, None, base, size, 0, None, 0, 0, base, (), source)
        negative.gtlb.insert((ctx.gscid,), entry)
