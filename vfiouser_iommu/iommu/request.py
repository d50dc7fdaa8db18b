"""Inbound transactions and their outcome (spec v1.0.1 §2.3, §3.6).

A `Request` is what an IO bridge hands the IOMMU: device_id, optional process_id
(PASID), the IOVA, the access and its privilege, and the PCIe transaction kind. The
result of `RiscvIommu.translate` is a `Translation` or a `Fault` (see `faults.py`).
`HpmEvent` numbers the standard performance events of §5.23.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class Access(Enum):
    """What the transaction does with the memory it addresses."""

    READ = "r"
    WRITE = "w"
    EXECUTE = "x"  # read-for-execute


class RequestKind(Enum):
    """PCIe transaction kinds the IOMMU distinguishes (TTYP families)."""

    UNTRANSLATED = "untranslated"
    TRANSLATED = "translated"
    ATS_TRANSLATION = "ats_translation"
    PCIE_MESSAGE = "pcie_message"


class HpmEvent(IntEnum):
    """Standard iohpmevt eventIDs (§5.23)."""

    UNTRANSLATED_REQ = 1
    TRANSLATED_REQ = 2
    ATS_TRANSLATION_REQ = 3
    IOTLB_MISS = 4
    DDT_WALK = 5
    PDT_WALK = 6
    S_STAGE_WALK = 7
    G_STAGE_WALK = 8


@dataclass(frozen=True)
class Request:
    """One inbound transaction.

    For ATS_TRANSLATION, `access` encodes the request's flags: READ is NW=1, WRITE is
    NW=0, EXECUTE is Exe=1 with NW=1. For PCIE_MESSAGE, `message_code` is the PCIe
    message code and `iova` is ignored. `debug` marks a request from the debug
    translation interface (§5.18): an MRIF-mode MSI PTE then gives cause 260 and no
    side effect happens.
    """

    device_id: int
    process_id: int | None
    iova: int
    access: Access = Access.READ
    privileged: bool = False
    kind: RequestKind = RequestKind.UNTRANSLATED
    debug: bool = False
    message_code: int = 0


@dataclass(frozen=True)
class MrifTarget:
    """An MSI that hit an MRIF-mode MSI PTE: where the interrupt file and notice go."""

    mrif_address: int
    notice_ppn: int
    notice_id: int


@dataclass(frozen=True)
class Translation:
    """A successful translation of the page holding the request's IOVA.

    `address` is the translated address of the request's IOVA (page offset kept);
    `page_size` the size of the naturally aligned region translated linearly. The
    permission bits are what the IOMMU grants for that region (for ATS completions:
    R/W/X/U/G of §3.6; for an MRIF-mode MSI page U=1 tells the device to keep using
    untranslated requests). `gpa` is the guest-physical address when a G-stage (or
    T2GPA) applied. `mrif` is set when the address is an MRIF-mode interrupt file page:
    writes there must go through `RiscvIommu.mrif_write`, reads return 0.
    """

    address: int
    page_size: int
    r: bool = True
    w: bool = True
    x: bool = False
    u: bool = False
    g: bool = False
    pbmt: int = 0
    gpa: int | None = None
    msi: bool = False
    mrif: MrifTarget | None = None

    @property
    def permissions(self) -> str:
        return "".join(c if f else "-" for c, f in
                       (("r", self.r), ("w", self.w), ("x", self.x), ("u", self.u),
                        ("g", self.g)))
