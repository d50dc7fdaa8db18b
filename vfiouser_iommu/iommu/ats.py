"""ATS Translation requests and PCIe messages (spec v1.0.1 §3.6-§3.8).

An ATS Translation request is translated like an untranslated read (write too when
NW=0, execute when Exe is requested with a PASID). Its completion, per §3.6:

* CA (completer abort) with a logged fault for access faults and context/MSI PT
  load or misconfiguration faults: 1, 5, 7, 261, 263, 265, 267 and the data-corruption
  causes;
* UR (unsupported request) with a logged fault for 256-260;
* Success with R=W=0 and *no* fault for page faults, guest page faults, 262 and 266,
  and for permission denials (a requested write that is not allowed only clears W).

With DC.tc.T2GPA=1 a Success completion carries the GPA, not the SPA.

The result is a `Translation` for Success (R=W=0 when nothing is granted) and a `Fault`
for UR/CA; `completion_status(fault)` names which.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from vfiouser_iommu.iommu.directory import DeviceContext
from vfiouser_iommu.iommu.faults import Cause, Fault, Stop
from vfiouser_iommu.iommu.request import Access, Request, RequestKind, Translation

if TYPE_CHECKING:
    from vfiouser_iommu.iommu.core import RiscvIommu

#: Causes answered "Success, no permission" without logging (§3.6).
SUCCESS_WITHOUT_PERMISSION = frozenset({
    Cause.INSTRUCTION_PAGE_FAULT, Cause.READ_PAGE_FAULT, Cause.WRITE_PAGE_FAULT,
    Cause.INSTRUCTION_GUEST_PAGE_FAULT, Cause.READ_GUEST_PAGE_FAULT,
    Cause.WRITE_GUEST_PAGE_FAULT, Cause.MSI_PTE_NOT_VALID, Cause.PDT_ENTRY_NOT_VALID,
})
_UNSUPPORTED_REQUEST = frozenset(range(256, 261))

# PCIe message codes the IOMMU looks at (§3.8)
MSG_INVALIDATION_COMPLETION = 0x02
MSG_PAGE_REQUEST = 0x04


def completion_status(fault: Fault) -> str:
    """"UR" or "CA": the ATS completion status of a faulted Translation request."""
    return "UR" if fault.cause in _UNSUPPORTED_REQUEST else "CA"


def translate_ats(iommu: RiscvIommu, request: Request) -> Translation | Fault:
    """Answer an ATS Translation request (§3.6)."""
    want_write = request.access is Access.WRITE
    exe = request.access is Access.EXECUTE and request.process_id is not None
    first = Access.WRITE if want_write else Access.READ
    try:
        dc = iommu._device_context(request)
        result = _attempt(iommu, request, dc, first)
        if result is None and want_write:
            result = _attempt(iommu, request, dc, Access.READ)
    except Stop as stop:
        return iommu.fault(request, stop)
    if result is None:
        return Translation(request.iova & ~0xFFF, 1 << 12, r=False, w=False)
    return _completion(request, result, want_write, exe, dc.t2gpa)


def _attempt(iommu: RiscvIommu, request: Request, dc: DeviceContext,
             access: Access) -> Translation | None:
    """One translation try; None for the "Success without permission" causes."""
    try:
        return iommu.translate_in_context(replace(request, access=access), dc)
    except Stop as stop:
        if stop.cause in SUCCESS_WITHOUT_PERMISSION:
            return None
        raise


def _completion(request: Request, t: Translation, want_write: bool, exe: bool,
                t2gpa: bool) -> Translation:
    """The Success completion of translation `t`.

    With DC.tc.T2GPA=1 the permissions and size come from both stages but the address
    is the GPA (DC.tc T2GPA, §3.1.3.1): the device's Translated requests then carry
    that GPA and are G-stage translated (and MSI translated) again.
    """
    address = t.gpa if t2gpa and t.gpa is not None else t.address
    base = address & ~(t.page_size - 1)
    if t.mrif is not None:
        return replace(t, address=base, r=True, w=True, x=False, u=True, g=False)
    return replace(t, address=base, r=True, w=want_write and t.w, x=exe and t.x,
                   u=False, g=t.g and request.process_id is not None and not t.msi)


def check_message(iommu: RiscvIommu, request: Request) -> DeviceContext | Fault:
    """PCIe message from a device (§3.8): Bare mode and DCs without the needed enable
    refuse it with cause 260 (TTYP 9, iotval = message code); returns the DC otherwise.
    """
    request = replace(request, kind=RequestKind.PCIE_MESSAGE)
    try:
        dc = iommu._device_context(request)
    except Stop as stop:
        return iommu.fault(request, stop)
    needed = {MSG_INVALIDATION_COMPLETION: dc.en_ats, MSG_PAGE_REQUEST: dc.en_pri}
    if not needed.get(request.message_code, True):
        return iommu.fault(request, Stop(Cause.TRANSACTION_TYPE_DISALLOWED, dtf=dc.dtf))
    return dc
