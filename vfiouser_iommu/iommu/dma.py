"""Endpoint DMA through the IOMMU: the translating `DmaView` (DESIGN.md "Layers").

Every access is split at translated-page boundaries and each piece is translated as an
Untranslated request of the view's requester; a fault becomes a `DmaError` carrying the
fault record. MSI writes are handled as MSI: a basic-translate page is written at the
translated address, an MRIF-mode page gets the pending bit plus the notice MSI
(`RiscvIommu.mrif_write`), and reads of an MRIF page return zeros.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfiouser_iommu.iommu.faults import Fault
from vfiouser_iommu.iommu.request import Access, Request, Translation
from vfiouser_iommu.memory import DmaAttrs, DmaError, DmaView, MemoryAccessError

if TYPE_CHECKING:
    from vfiouser_iommu.iommu.core import RiscvIommu


class IommuDmaView(DmaView):
    """DMA of one requester (device_id, default PASID/privilege), translated by `iommu`.

    Plain `read`/`write` use the view's own PASID and privilege; the `*_as` forms take
    them (and read-for-execute) from the request's `DmaAttrs`.
    """

    def __init__(self, iommu: RiscvIommu, device_id: int, process_id: int | None = None,
                 privileged: bool = False):
        super().__init__(iommu.memory)
        self.iommu = iommu
        self.device_id = device_id
        self.attrs = DmaAttrs(process_id, privileged)

    def _request(self, addr: int, write: bool, attrs: DmaAttrs) -> Request:
        access = Access.WRITE if write else Access.EXECUTE if attrs.execute else Access.READ
        return Request(self.device_id, attrs.pasid, addr, access, attrs.privileged)

    def _pieces(self, addr: int, length: int, write: bool, attrs: DmaAttrs):
        """(request, translation, length) for each translated page of the range."""
        pieces = []
        end = addr + length
        while addr < end:
            request = self._request(addr, write, attrs)
            result = self.iommu.translate(request)
            if isinstance(result, Fault):
                raise DmaError(addr, length, write, f"IOMMU fault cause {result.cause}",
                               fault=result)
            n = min(end - addr, result.page_size - (addr & (result.page_size - 1)))
            pieces.append((request, result, n))
            addr += n
        return pieces

    def map_range(self, addr: int, length: int, write: bool) -> list[tuple[int, int]]:
        return self.map_range_as(addr, length, write, self.attrs)

    def map_range_as(self, addr: int, length: int, write: bool,
                     attrs: DmaAttrs) -> list[tuple[int, int]]:
        return [(t.address, n) for _, t, n in self._pieces(addr, length, write, attrs)]

    def read(self, addr: int, length: int) -> bytes:
        return self.read_as(addr, length, self.attrs)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.write_as(addr, data, self.attrs)

    def read_as(self, addr: int, length: int, attrs: DmaAttrs) -> bytes:
        if length == 0:
            return b""
        out = []
        for _, t, n in self._pieces(addr, length, False, attrs):
            out.append(bytes(n) if t.mrif is not None else self._read(t, n, addr, length))
        return b"".join(out)

    def _read(self, t: Translation, n: int, addr: int, length: int) -> bytes:
        try:
            return self.memory.read(t.address, n)
        except MemoryAccessError as e:
            raise DmaError(addr, length, False, str(e)) from None

    def write_as(self, addr: int, data: bytes | bytearray | memoryview,
                 attrs: DmaAttrs) -> None:
        length = len(data)
        if length == 0:
            return
        view = memoryview(data).cast("B")
        done = 0
        for request, t, n in self._pieces(addr, length, True, attrs):
            chunk = bytes(view[done:done + n])
            done += n
            if t.mrif is not None:
                self._mrif(request, t, chunk, addr, length)
                continue
            try:
                self.memory.write(t.address, chunk)
            except MemoryAccessError as e:
                raise DmaError(addr, length, True, str(e)) from None

    def _mrif(self, request: Request, t: Translation, chunk: bytes, addr: int,
              length: int) -> None:
        if len(chunk) != 4 or request.iova & 3:
            raise DmaError(addr, length, True, "MRIF access is not an aligned 32-bit write")
        fault = self.iommu.mrif_write(request, t, chunk)
        if fault is not None:
            raise DmaError(addr, length, True, f"IOMMU fault cause {fault.cause}", fault=fault)
