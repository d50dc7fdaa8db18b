"""Endpoint DMA through the IOMMU: the translating `DmaView` (DESIGN.md "Layers").

Every access is split at translated-page boundaries and each piece is translated as an
Untranslated request of the view's requester; a fault becomes a `DmaError` carrying the
fault record. MSI writes are handled as MSI: a basic-translate page is written at the
translated address, an MRIF-mode page gets the pending bit plus the notice MSI
(`RiscvIommu.mrif_write`), and reads of an MRIF page return zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfiouser_iommu.iommu.faults import Fault
from vfiouser_iommu.iommu.request import Access, Request, Translation
from vfiouser_iommu.memory import DmaAttrs, DmaError, DmaView, SpecialPiece

if TYPE_CHECKING:
    from vfiouser_iommu.iommu.core import RiscvIommu


class RequesterStats:
    """What one requester's DMA did: requests and bytes each way, translations (one per
    translated page piece), for `query-stats`, `inspect watch` and the trace."""

    __slots__ = ("reads", "writes", "bytes_read", "bytes_written", "translations")

    def __init__(self) -> None:
        self.reads = self.writes = self.bytes_read = self.bytes_written = 0
        self.translations = 0

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class IommuDmaView(DmaView):
    """DMA of one requester (device_id, default PASID/privilege), translated by `iommu`.

    Plain `read`/`write` use the view's own PASID and privilege (`attrs`); the `*_as`
    forms take them (and read-for-execute) from the request's `DmaAttrs`.
    """

    def __init__(self, iommu: RiscvIommu, device_id: int, process_id: int | None = None,
                 privileged: bool = False):
        super().__init__(iommu.memory)
        self.iommu = iommu
        self.device_id = device_id
        self.attrs = DmaAttrs(process_id, privileged)
        self.stats = iommu.requester_stats.setdefault(device_id, RequesterStats())

    def _request(self, addr: int, write: bool, attrs: DmaAttrs) -> Request:
        access = Access.WRITE if write else Access.EXECUTE if attrs.execute else Access.READ
        return Request(self.device_id, attrs.pasid, addr, access, attrs.privileged)

    def pieces(self, addr: int, length: int, write: bool,
               attrs: DmaAttrs) -> list[tuple[int, int, SpecialPiece | None]]:
        """One piece per translated page; an MRIF-mode page is a `_MrifPiece`."""
        stats = self.stats
        if write:
            stats.writes += 1
            stats.bytes_written += length
        else:
            stats.reads += 1
            stats.bytes_read += length
        pieces = self.more_pieces(addr, length, write, attrs, addr, [])
        stats.translations += len(pieces)
        return pieces

    def more_pieces(self, addr: int, length: int, write: bool, attrs: DmaAttrs, start: int,
                    pieces: list) -> list[tuple[int, int, SpecialPiece | None]]:
        """`pieces` of [addr, addr+length) continued from `start` (where the C fast path
        stopped, having translated `pieces` so far)."""
        end = addr + length
        addr = start
        while addr < end:
            request = self._request(addr, write, attrs)
            result = self.iommu.translate(request)
            if isinstance(result, Fault):
                raise DmaError(addr, length, write, f"IOMMU fault cause {result.cause}",
                               fault=result)
            n = min(end - addr, result.page_size - (addr & (result.page_size - 1)))
            mrif = None if result.mrif is None else _MrifPiece(self.iommu, request, result)
            pieces.append((result.address, n, mrif))
            addr += n
        return pieces


@dataclass(frozen=True)
class _MrifPiece:
    """An MRIF-mode interrupt file page: reads return zeros, a write sets a pending bit."""

    iommu: RiscvIommu
    request: Request
    translation: Translation

    def read(self, length: int) -> bytes:
        return bytes(length)

    def write(self, data: memoryview, addr: int, length: int) -> None:
        if len(data) != 4 or self.request.iova & 3:
            raise DmaError(addr, length, True, "MRIF access is not an aligned 32-bit write")
        fault = self.iommu.mrif_write(self.request, self.translation, bytes(data))
        if fault is not None:
            raise DmaError(addr, length, True, f"IOMMU fault cause {fault.cause}", fault=fault)
