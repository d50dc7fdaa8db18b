"""Fault causes, transaction types and the fault record (spec v1.0.1 §4.2).

Every fault the translation side produces is built here, by `build_fault`, from the
request and the cause: TTYP from the request kind and access, iotval from the IOVA (or
the message code for PCIe messages), PV/PID/PRIV from the request's PASID, DID from the
device_id. `Fault.to_record` yields the 32-byte fault-queue record (construct layout in
`layouts.py`). `reportable` applies DTF: which causes are still logged when a device
context says "don't report translation faults".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from vfiouser_iommu.iommu import layouts
from vfiouser_iommu.iommu.request import Access, Request, RequestKind


class Cause(IntEnum):
    """CAUSE values of the fault record (§4.2 table)."""

    INSTRUCTION_ACCESS_FAULT = 1
    READ_ADDRESS_MISALIGNED = 4
    READ_ACCESS_FAULT = 5
    WRITE_ADDRESS_MISALIGNED = 6
    WRITE_ACCESS_FAULT = 7
    INSTRUCTION_PAGE_FAULT = 12
    READ_PAGE_FAULT = 13
    WRITE_PAGE_FAULT = 15
    INSTRUCTION_GUEST_PAGE_FAULT = 20
    READ_GUEST_PAGE_FAULT = 21
    WRITE_GUEST_PAGE_FAULT = 23
    ALL_INBOUND_DISALLOWED = 256
    DDT_LOAD_ACCESS_FAULT = 257
    DDT_ENTRY_NOT_VALID = 258
    DDT_ENTRY_MISCONFIGURED = 259
    TRANSACTION_TYPE_DISALLOWED = 260
    MSI_PTE_LOAD_ACCESS_FAULT = 261
    MSI_PTE_NOT_VALID = 262
    MSI_PTE_MISCONFIGURED = 263
    MRIF_ACCESS_FAULT = 264
    PDT_LOAD_ACCESS_FAULT = 265
    PDT_ENTRY_NOT_VALID = 266
    PDT_ENTRY_MISCONFIGURED = 267
    DDT_DATA_CORRUPTION = 268
    PDT_DATA_CORRUPTION = 269
    MSI_PT_DATA_CORRUPTION = 270
    MRIF_DATA_CORRUPTION = 271
    INTERNAL_DATAPATH_ERROR = 272
    IOMMU_MSI_WRITE_ACCESS_FAULT = 273
    PT_DATA_CORRUPTION = 274


class Ttyp(IntEnum):
    """Transaction type of the fault record (§4.2)."""

    NONE = 0
    UNTRANSLATED_EXECUTE = 1
    UNTRANSLATED_READ = 2
    UNTRANSLATED_WRITE = 3
    TRANSLATED_EXECUTE = 5
    TRANSLATED_READ = 6
    TRANSLATED_WRITE = 7
    ATS_TRANSLATION = 8
    PCIE_MESSAGE = 9


_TTYP = {
    (RequestKind.UNTRANSLATED, Access.EXECUTE): Ttyp.UNTRANSLATED_EXECUTE,
    (RequestKind.UNTRANSLATED, Access.READ): Ttyp.UNTRANSLATED_READ,
    (RequestKind.UNTRANSLATED, Access.WRITE): Ttyp.UNTRANSLATED_WRITE,
    (RequestKind.TRANSLATED, Access.EXECUTE): Ttyp.TRANSLATED_EXECUTE,
    (RequestKind.TRANSLATED, Access.READ): Ttyp.TRANSLATED_READ,
    (RequestKind.TRANSLATED, Access.WRITE): Ttyp.TRANSLATED_WRITE,
}

#: Access, page and guest-page fault causes by access type (§4.2, Priv spec).
ACCESS_FAULT = {Access.READ: Cause.READ_ACCESS_FAULT, Access.WRITE: Cause.WRITE_ACCESS_FAULT,
                Access.EXECUTE: Cause.INSTRUCTION_ACCESS_FAULT}
PAGE_FAULT = {Access.READ: Cause.READ_PAGE_FAULT, Access.WRITE: Cause.WRITE_PAGE_FAULT,
              Access.EXECUTE: Cause.INSTRUCTION_PAGE_FAULT}
GUEST_PAGE_FAULT = {Access.READ: Cause.READ_GUEST_PAGE_FAULT,
                    Access.WRITE: Cause.WRITE_GUEST_PAGE_FAULT,
                    Access.EXECUTE: Cause.INSTRUCTION_GUEST_PAGE_FAULT}

#: The data-corruption cause of a table read, by the cause its access fault would have
#: (§4.2; "poisoned data" in the §3.3 steps): DDT 257 -> 268, PDT 265 -> 269, MSI PT
#: 261 -> 270, first/second-stage PT (access faults 1/5/7) -> 274. The G-stage tables
#: reached for a PDT access fault as the PDT does (§3.3.2): 265, and poison 269.
DATA_CORRUPTION = {
    Cause.DDT_LOAD_ACCESS_FAULT: Cause.DDT_DATA_CORRUPTION,
    Cause.PDT_LOAD_ACCESS_FAULT: Cause.PDT_DATA_CORRUPTION,
    Cause.MSI_PTE_LOAD_ACCESS_FAULT: Cause.MSI_PT_DATA_CORRUPTION,
    Cause.INSTRUCTION_ACCESS_FAULT: Cause.PT_DATA_CORRUPTION,
    Cause.READ_ACCESS_FAULT: Cause.PT_DATA_CORRUPTION,
    Cause.WRITE_ACCESS_FAULT: Cause.PT_DATA_CORRUPTION,
}

#: Causes still reported when DC.tc.DTF=1 (§3.1.3.1, fault table "DTF" column).
NOT_SUPPRESSED_BY_DTF = frozenset({
    Cause.ALL_INBOUND_DISALLOWED, Cause.DDT_LOAD_ACCESS_FAULT, Cause.DDT_ENTRY_NOT_VALID,
    Cause.DDT_ENTRY_MISCONFIGURED, Cause.DDT_DATA_CORRUPTION,
    Cause.INTERNAL_DATAPATH_ERROR, Cause.IOMMU_MSI_WRITE_ACCESS_FAULT,
})


class Stop(Exception):
    """A translation stops with a fault `cause` (caught and recorded by the core).

    `dtf` is filled in once the device context is known, so the core can apply DTF.
    """

    def __init__(self, cause: int, iotval2: int = 0, *, dtf: bool = False):
        super().__init__(cause)
        self.cause = int(cause)
        self.iotval2 = iotval2
        self.dtf = dtf


def ttyp_of(request: Request) -> Ttyp:
    if request.kind is RequestKind.ATS_TRANSLATION:
        return Ttyp.ATS_TRANSLATION
    if request.kind is RequestKind.PCIE_MESSAGE:
        return Ttyp.PCIE_MESSAGE
    return _TTYP[(request.kind, request.access)]


@dataclass(frozen=True)
class Fault:
    """One fault record's content (§4.2). process_id is None when PV=0."""

    cause: int
    ttyp: int
    iotval: int
    iotval2: int
    device_id: int
    process_id: int | None
    privileged: bool

    def to_record(self, big_endian: bool = False) -> bytes:
        """The 32-byte fault-queue record (fields truncated to their widths)."""
        with_did = self.ttyp != Ttyp.NONE
        pv = with_did and self.process_id is not None
        return layouts.fault_record.build({
            "dw0": {"CAUSE": self.cause & 0xFFF,
                    "PID": self.process_id & 0xFFFFF if pv else 0, "PV": pv,
                    "PRIV": pv and self.privileged, "TTYP": self.ttyp,
                    "DID": self.device_id & 0xFFFFFF if with_did else 0},
            "dw1": {"custom": 0, "reserved": 0},
            "iotval": {"iotval": self.iotval & (1 << 64) - 1},
            "iotval2": {"iotval2": self.iotval2 & (1 << 64) - 1},
        }, big_endian)

    @classmethod
    def from_record(cls, record: bytes, big_endian: bool = False) -> "Fault":
        p = layouts.fault_record.parse(record, big_endian)
        return cls(p.dw0.CAUSE, p.dw0.TTYP, p.iotval.iotval, p.iotval2.iotval2, p.dw0.DID,
                   p.dw0.PID if p.dw0.PV else None, bool(p.dw0.PRIV))


def build_fault(request: Request, cause: int, iotval2: int = 0) -> Fault:
    """The fault record for `request` failing with `cause` (the one place faults are made).

    iotval is the request's IOVA (the message code for PCIe messages); PRIV is only
    meaningful with a PASID, so it is cleared without one.
    """
    ttyp = ttyp_of(request)
    iotval = request.message_code if ttyp is Ttyp.PCIE_MESSAGE else request.iova
    pid = request.process_id
    return Fault(int(cause), int(ttyp), iotval & (1 << 64) - 1, iotval2 & (1 << 64) - 1,
                 request.device_id & 0xFFFFFF, pid,
                 bool(request.privileged and pid is not None))


def reportable(cause: int, dtf: bool) -> bool:
    """Whether a fault is logged, given DC.tc.DTF (taken as 0 when no DC was found)."""
    return not dtf or cause in NOT_SUPPRESSED_BY_DTF
