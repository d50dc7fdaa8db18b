"""PCI function model: configuration space (type 0 header, BARs, capabilities) and the
function API that device models implement and the vfio-user server serves.
"""

from .config import BarSpec, ConfigSpace, MsixSpec, PciIdentity
from .function import DetachedHost, FunctionHost, PciFunction, RegionAccessError

__all__ = ["BarSpec", "ConfigSpace", "DetachedHost", "FunctionHost", "MsixSpec",
           "PciFunction", "PciIdentity", "RegionAccessError"]
