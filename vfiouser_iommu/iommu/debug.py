"""Debug translation interface (spec v1.0.1 §5.24–§5.26): tr_req_iova, tr_req_ctl and
tr_response.

Writing tr_req_ctl with Go/Busy=1 runs one translation, synchronously, through part 1's
`iommu.translate` as an Untranslated request with `debug=True` (so an MRIF-mode MSI
PTE gives cause 260 and there are no side effects); faults also reach the fault queue
as part 1 reports them. Go/Busy is therefore already 0 when software reads it back.

Because an 8-byte register may be written as two 4-byte halves, high half first, the
translation starts on whichever write sets Go/Busy (bit 0, in the low half). Writes to
tr_req_iova or tr_req_ctl while Go/Busy is 1 cannot happen here (it is never seen
set), which settles the spec's UNSPECIFIED case.

tr_response reports the page size NAPOT-encoded in PPN with S=1 whenever the
translation is larger than 4 KiB.
"""

from __future__ import annotations

from vfiouser_iommu.iommu.regs_layouts import LAYOUTS, TR_REQ_CTL, TR_RESPONSE

TR_REQ_IOVA = LAYOUTS["tr_req_iova"]
_GO = TR_REQ_CTL.mask("Go_Busy")
_CTL_WRITABLE = TR_REQ_CTL.defined_mask & ~TR_REQ_CTL.mask("custom")
_PAGE = 4096


def napot_ppn(address: int, size: int) -> tuple[int, bool]:
    """(PPN, S) of tr_response for a translation of `size` bytes covering `address`."""
    if size <= _PAGE:
        return address >> 12, False
    pages = size // _PAGE
    return ((address >> 12) & ~(pages - 1)) | (pages // 2 - 1), True


class DebugInterface:
    """The three debug registers; present when capabilities.DBG=1."""

    def __init__(self, regs):
        self.regs = regs
        self.reset()

    def reset(self) -> None:
        self.tr_req_iova = 0
        self.tr_req_ctl = 0
        self.tr_response = 0

    def write_iova(self, value: int, mask: int) -> None:
        merged = (self.tr_req_iova & ~mask) | (value & mask)
        self.tr_req_iova = merged & TR_REQ_IOVA.mask("vpn")

    def write_ctl(self, value: int, mask: int) -> None:
        merged = ((self.tr_req_ctl & ~mask) | (value & mask)) & _CTL_WRITABLE
        self.tr_req_ctl = merged
        if merged & _GO and mask & _GO:
            self.tr_response = self._translate()
            self.tr_req_ctl &= ~_GO

    def _translate(self) -> int:
        from vfiouser_iommu import iommu as api

        f = TR_REQ_CTL.decode(self.tr_req_ctl)
        pv = bool(f["PV"])
        if f["Exe"]:
            access = api.Access.EXECUTE
        else:
            access = api.Access.READ if f["NW"] else api.Access.WRITE
        request = api.Request(device_id=f["DID"], process_id=f["PID"] if pv else None,
                              iova=self.tr_req_iova, access=access,
                              privileged=pv and bool(f["Priv"]),
                              kind=api.RequestKind.UNTRANSLATED, debug=True)
        result = self.regs.iommu.translate(request)
        if isinstance(result, api.Fault):
            return TR_RESPONSE.encode(fault=1)
        ppn, s = napot_ppn(result.address, result.page_size)
        return TR_RESPONSE.encode(PPN=ppn, S=s, PBMT=getattr(result, "pbmt", 0))
