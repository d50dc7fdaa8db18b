"""The RISC-V IOMMU core (spec v1.0.1): translation (part 1) and programming interface.

Public names: `RiscvIommu` (the device), `IommuConfig` (its capabilities), `Request`,
`Access`, `RequestKind` (an inbound transaction), `Translation` / `Fault` (its outcome)
and `HpmEvent` (standard performance events).
"""

from vfiouser_iommu.iommu.config import Igs, IommuConfig
from vfiouser_iommu.iommu.core import RiscvIommu
from vfiouser_iommu.iommu.faults import Cause, Fault, Ttyp
from vfiouser_iommu.iommu.request import (
    Access,
    HpmEvent,
    MrifTarget,
    Request,
    RequestKind,
    Translation,
)

__all__ = ["Access", "Cause", "Fault", "HpmEvent", "Igs", "IommuConfig", "MrifTarget",
           "Request", "RequestKind", "RiscvIommu", "Translation", "Ttyp"]
