"""IOMMU capabilities (spec v1.0.1 §5.3, `capabilities` register) as named fields.

`IommuConfig` is what the model implements: every capability bit the spec defines, as a
field, plus a few model parameters that are not architected (cache sizes). The
`capabilities` property is the register value; `from_capabilities` goes the other way.
The bit layout is `regs_layouts.capabilities`; a field here is named as its register
field, in lower case. Register fields with no field here (Svrsw60t59b, custom) read 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import IntEnum

from vfiouser_iommu.iommu.regs_layouts import CAPABILITIES


class Igs(IntEnum):
    """capabilities.IGS: which interrupt generation the IOMMU supports."""

    MSI = 0
    WSI = 1
    BOTH = 2


@dataclass(frozen=True)
class IommuConfig:
    """What this IOMMU instance implements.

    Defaults describe a full-featured RV64 IOMMU that the Linux driver is happy with:
    all RV64 first- and second-stage modes, MSI_FLAT + MSI_MRIF (so 64-byte extended
    device contexts), HW A/D, ATS/T2GPA, MSI interrupts only, HPM and debug interface,
    56-bit physical addresses, all three PDT depths. Sv32/Sv32x4 (needing fctl.GXL /
    tc.SXL), END, AMO_MRIF and QOSID are off by default.
    """

    version: int = 0x10
    sv32: bool = False
    sv39: bool = True
    sv48: bool = True
    sv57: bool = True
    svpbmt: bool = True
    sv32x4: bool = False
    sv39x4: bool = True
    sv48x4: bool = True
    sv57x4: bool = True
    amo_mrif: bool = False
    msi_flat: bool = True
    msi_mrif: bool = True
    amo_hwad: bool = True
    ats: bool = True
    t2gpa: bool = True
    end: bool = False
    igs: Igs = Igs.MSI
    hpm: bool = True
    dbg: bool = True
    pas: int = 56
    pd8: bool = True
    pd17: bool = True
    pd20: bool = True
    qosid: bool = False
    # The NL and S extensions of IOTINVAL (non-leaf, address-range invalidation).
    nl: bool = False
    s: bool = False
    # Model parameters, not architected.
    rcid_bits: int = 12
    mcid_bits: int = 12
    ddt_cache_entries: int = 256
    pdt_cache_entries: int = 256
    iotlb_entries: int = 4096
    gtlb_entries: int = 1024
    msi_cache_entries: int = 256
    # How many interrupt vectors icvec may name (msi_cfg_tbl entries), HPM counters.
    interrupt_vectors: int = 4
    hpm_counters: int = 31
    # True when the MSI table is not ours (QEMU emulates the PCI function's MSI-X table
    # over msi_cfg_tbl): the core then only says which vector fires.
    msi_table_external: bool = False

    @property
    def capabilities(self) -> int:
        """The `capabilities` register value."""
        return CAPABILITIES.encode(**{spec: getattr(self, name)
                                      for name, spec in CAPABILITY_FIELDS.items()})

    @classmethod
    def from_capabilities(cls, caps: int, **model: object) -> "IommuConfig":
        """Configuration from a `capabilities` value (model parameters from `model`)."""
        values = {name: CAPABILITIES.get(caps, spec) for name, spec in CAPABILITY_FIELDS.items()}
        values = {name: v if name in _NUMBERS else bool(v) for name, v in values.items()}
        values["igs"] = Igs(values["igs"]) if values["igs"] in Igs._value2member_map_ \
            else Igs.MSI
        names = {f.name for f in fields(cls)}
        return replace(cls(), **values, **{k: v for k, v in model.items() if k in names})

    @property
    def gxl_writable(self) -> bool:
        """Whether fctl.GXL can be set: only when 32-bit G-stage (Sv32x4) exists.

        The spec leaves this to the implementation; tying it to Sv32x4 means tc.SXL=1
        (Sv32 first stage) is legal under GXL=0 exactly when the IOMMU can do 32-bit
        translation at all.
        """
        return self.sv32x4

    @property
    def be_writable(self) -> bool:
        """fctl.BE is writable only when both endiannesses are supported (END)."""
        return self.end

    @property
    def dc_size(self) -> int:
        """Device-context size: 64-byte extended format iff MSI_FLAT."""
        return 64 if self.msi_flat else 32


#: IommuConfig field -> `capabilities` register field, LSB first, for each field both have.
CAPABILITY_FIELDS = {spec.lower(): spec for spec in sorted(CAPABILITIES.fields,
                                                           key=CAPABILITIES.fields.get)
                     if spec.lower() in {f.name for f in fields(IommuConfig)}}
_NUMBERS = {"version", "igs", "pas"}
