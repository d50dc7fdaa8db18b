"""Device and process directories (spec v1.0.1 §3.1, §3.2, §3.3.2, §3.3.3).

`DeviceContext` and `ProcessContext` are decoded contexts (plain int bit-twiddling;
`tests/unit/test_iommu_layouts.py` proves the decoders agree with the construct layouts).
`locate_device_context` walks the DDT for a device_id and applies every validity and
misconfiguration check of §3.1.4; `locate_process_context` walks the PDT (through the
G-stage when iohgatp is not Bare) and applies the checks of §3.2.3. Failures raise
`Stop` with the spec's cause. Both tell an optional recorder (`steps.StepRecorder`)
each entry they read and what they decided.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vfiouser_iommu.iommu import steps
from vfiouser_iommu.iommu.config import IommuConfig
from vfiouser_iommu.iommu.faults import DATA_CORRUPTION, Cause, Stop
from vfiouser_iommu.iommu.walk import NEXT
from vfiouser_iommu.memory import GuestMemory, MemoryPoisonError

PPN_MASK = (1 << 44) - 1
PAGE_SHIFT = 12

# ddtp.iommu_mode
MODE_OFF, MODE_BARE, MODE_1LVL, MODE_2LVL, MODE_3LVL = range(5)
DDT_LEVELS = {MODE_1LVL: 1, MODE_2LVL: 2, MODE_3LVL: 3}

# iosatp / iohgatp / pdtp / msiptp MODE encodings
BARE = 0
SV39 = SV39X4 = 8
SV48 = SV48X4 = 9
SV57 = SV57X4 = 10
SV32 = SV32X4 = 8
PD8, PD17, PD20 = 1, 2, 3
PDT_LEVELS = {PD8: 1, PD17: 2, PD20: 3}
PID_BITS = {PD8: 8, PD17: 17, PD20: 20}
MSIPTP_OFF, MSIPTP_FLAT = 0, 1

# device_id split (§3.3.2 step 3-4): (DDI[0] bits, DDI[1] bits, DDI[2] bits)
_DDI_BITS = {64: (6, 9, 9), 32: (7, 9, 8)}


def _bit(value: int, n: int) -> bool:
    return bool(value >> n & 1)


def _field(value: int, hi: int, lo: int) -> int:
    return value >> lo & ((1 << (hi - lo + 1)) - 1)


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """A device context as fetched (raw doublewords) with decoded fields."""

    tc: int
    iohgatp: int
    ta: int
    fsc: int
    msiptp: int = 0
    msi_addr_mask: int = 0
    msi_addr_pattern: int = 0
    reserved: int = 0
    # What it was read from (steps.Source), when the invalidation checker is on.
    source: object = field(default=None, compare=False, repr=False)

    @classmethod
    def from_words(cls, words: list[int]) -> "DeviceContext":
        return cls(*words)

    # tc
    v = property(lambda s: _bit(s.tc, 0))
    en_ats = property(lambda s: _bit(s.tc, 1))
    en_pri = property(lambda s: _bit(s.tc, 2))
    t2gpa = property(lambda s: _bit(s.tc, 3))
    dtf = property(lambda s: _bit(s.tc, 4))
    pdtv = property(lambda s: _bit(s.tc, 5))
    prpr = property(lambda s: _bit(s.tc, 6))
    gade = property(lambda s: _bit(s.tc, 7))
    sade = property(lambda s: _bit(s.tc, 8))
    dpe = property(lambda s: _bit(s.tc, 9))
    sbe = property(lambda s: _bit(s.tc, 10))
    sxl = property(lambda s: _bit(s.tc, 11))
    # iohgatp
    iohgatp_mode = property(lambda s: s.iohgatp >> 60)
    iohgatp_ppn = property(lambda s: s.iohgatp & PPN_MASK)
    gscid = property(lambda s: _field(s.iohgatp, 59, 44))
    # ta
    pscid = property(lambda s: _field(s.ta, 31, 12))
    rcid = property(lambda s: _field(s.ta, 51, 40))
    mcid = property(lambda s: _field(s.ta, 63, 52))
    # fsc (iosatp or pdtp)
    fsc_mode = property(lambda s: s.fsc >> 60)
    fsc_ppn = property(lambda s: s.fsc & PPN_MASK)
    # MSI
    msiptp_mode = property(lambda s: s.msiptp >> 60)
    msiptp_ppn = property(lambda s: s.msiptp & PPN_MASK)
    msi_mask = property(lambda s: s.msi_addr_mask & ((1 << 52) - 1))
    msi_pattern = property(lambda s: s.msi_addr_pattern & ((1 << 52) - 1))


@dataclass(frozen=True, slots=True)
class ProcessContext:
    """A process context (§3.2.2) with decoded fields."""

    ta: int
    fsc: int
    source: object = field(default=None, compare=False, repr=False)

    v = property(lambda s: _bit(s.ta, 0))
    ens = property(lambda s: _bit(s.ta, 1))
    sum = property(lambda s: _bit(s.ta, 2))
    pscid = property(lambda s: _field(s.ta, 31, 12))
    fsc_mode = property(lambda s: s.fsc >> 60)
    fsc_ppn = property(lambda s: s.fsc & PPN_MASK)


def device_directory_index(device_id: int, dc_size: int) -> tuple[int, int, int]:
    """DDI[0], DDI[1], DDI[2] of a device_id for the DC format in use."""
    b0, b1, b2 = _DDI_BITS[dc_size]
    return (device_id & (1 << b0) - 1, device_id >> b0 & (1 << b1) - 1,
            device_id >> (b0 + b1) & (1 << b2) - 1)


def device_id_fits(device_id: int, mode: int, dc_size: int) -> bool:
    """§3.3 step 5: a device_id wider than the DDT's levels can index is disallowed."""
    b0, b1, b2 = _DDI_BITS[dc_size]
    width = {MODE_1LVL: b0, MODE_2LVL: b0 + b1, MODE_3LVL: b0 + b1 + b2}[mode]
    return 0 <= device_id < 1 << width


def read_table_word(memory: GuestMemory, pas: int, addr: int, size: int, big_endian: bool,
                    cause: int, corruption: int | None = None) -> int:
    """One implicit load of a table entry; any access fault becomes `cause`.

    Table walks only touch mapped RAM below 2^PAS: an address outside it is an access
    fault, never a fallback (vfio-user DMA message) access. A load that returns
    poisoned data stops with `corruption`, by default the data-corruption cause of
    the table kind that `cause` names (`faults.DATA_CORRUPTION`).
    """
    if addr < 0 or addr + size > 1 << pas or not memory.contains(addr, size):
        raise Stop(cause)
    try:
        return memory.read_int(addr, size, big_endian=big_endian)
    except MemoryPoisonError:
        raise Stop(corruption if corruption is not None else DATA_CORRUPTION[cause]) from None


NOT_VALID = "V=0"
RESERVED = "reserved bits set"


def _non_leaf(value: int) -> str:
    """What a walk decides on a non-leaf DDT or PDT entry."""
    if not value & 1:
        return NOT_VALID
    return RESERVED if value & _NON_LEAF_RESERVED else NEXT


def locate_device_context(memory: GuestMemory, config: IommuConfig, ddtp: int, fctl: int,
                          device_id: int, record=None) -> DeviceContext:
    """Walk the DDT for `device_id` (§3.3.3) and check the DC (§3.1.4)."""
    mode = ddtp & 0xF
    be = bool(fctl & 1)
    ddi = device_directory_index(device_id, config.dc_size)
    a = (ddtp >> 10 & PPN_MASK) << PAGE_SHIFT
    for i in range(DDT_LEVELS[mode] - 1, 0, -1):
        ddte = read_table_word(memory, config.pas, a + ddi[i] * 8, 8, be,
                               Cause.DDT_LOAD_ACCESS_FAULT)
        decision = _non_leaf(ddte)
        if record is not None:
            record.step(steps.DDTE, i, a + ddi[i] * 8, ddte, decision, big_endian=be)
        if decision is NOT_VALID:
            raise Stop(Cause.DDT_ENTRY_NOT_VALID)
        if decision is RESERVED:
            raise Stop(Cause.DDT_ENTRY_MISCONFIGURED)
        a = (ddte >> 10 & PPN_MASK) << PAGE_SHIFT
    base = a + ddi[0] * config.dc_size
    words = [read_table_word(memory, config.pas, base + 8 * k, 8, be,
                             Cause.DDT_LOAD_ACCESS_FAULT) for k in range(config.dc_size // 8)]
    dc = DeviceContext.from_words(words)
    why = NOT_VALID if not dc.v else misconfiguration(dc, config, fctl)
    if record is not None:
        record.step(steps.DC, 0, base, tuple(words), why or steps.VALID, big_endian=be)
    if why is NOT_VALID:
        raise Stop(Cause.DDT_ENTRY_NOT_VALID)
    if why is not None:
        raise Stop(Cause.DDT_ENTRY_MISCONFIGURED)
    return dc


_NON_LEAF_RESERVED = (0x1FF << 1) | (0x3FF << 54)
_TC_RESERVED = (0xFFF << 12) | (0xFFFF_FFFF << 32)
_TA_RESERVED = 0xFFF | (0xFF << 32)
_ATP_RESERVED = 0xFFFF << 44
_MSI_ADDR_RESERVED = 0xFFF << 52

_FIRST_STAGE_MODES = {False: {BARE: True, SV39: "sv39", SV48: "sv48", SV57: "sv57"},
                      True: {BARE: True, SV32: "sv32"}}
_G_STAGE_MODES = {False: {BARE: True, SV39X4: "sv39x4", SV48X4: "sv48x4", SV57X4: "sv57x4"},
                  True: {BARE: True, SV32X4: "sv32x4"}}
_PDTP_MODES = {BARE: True, PD8: "pd8", PD17: "pd17", PD20: "pd20"}


def mode_supported(table: dict, mode: int, config: IommuConfig) -> bool:
    cap = table.get(mode)
    return cap is True or (cap is not None and getattr(config, cap))


def first_stage_mode_ok(mode: int, sxl: bool, config: IommuConfig) -> bool:
    return mode_supported(_FIRST_STAGE_MODES[sxl], mode, config)


def _reserved_bits_set(dc: DeviceContext, config: IommuConfig) -> bool:
    ta_reserved = _TA_RESERVED if config.qosid else _TA_RESERVED | (0xFFFFFF << 40)
    if dc.tc & _TC_RESERVED or dc.ta & ta_reserved or dc.fsc & _ATP_RESERVED:
        return True
    if config.qosid and (dc.rcid >> config.rcid_bits or dc.mcid >> config.mcid_bits):
        return True
    if not config.msi_flat:
        return False
    return bool(dc.msiptp & _ATP_RESERVED or dc.msi_addr_mask & _MSI_ADDR_RESERVED
                or dc.msi_addr_pattern & _MSI_ADDR_RESERVED or dc.reserved)


def _ats_rules_broken(dc: DeviceContext, config: IommuConfig) -> bool:
    if not config.ats and (dc.en_ats or dc.en_pri or dc.prpr):
        return True
    if not dc.en_ats and (dc.t2gpa or dc.en_pri):
        return True
    if dc.prpr and not dc.en_pri:
        return True
    return dc.t2gpa and (not config.t2gpa or dc.iohgatp_mode == BARE)


def _modes_broken(dc: DeviceContext, config: IommuConfig, gxl: bool) -> bool:
    if dc.pdtv:
        if not mode_supported(_PDTP_MODES, dc.fsc_mode, config):
            return True
    elif dc.dpe or not first_stage_mode_ok(dc.fsc_mode, dc.sxl, config):
        return True
    if not mode_supported(_G_STAGE_MODES[gxl], dc.iohgatp_mode, config):
        return True
    if dc.iohgatp_mode != BARE and dc.iohgatp_ppn & 3:
        return True
    return config.msi_flat and dc.msiptp_mode not in (MSIPTP_OFF, MSIPTP_FLAT)


def _control_broken(dc: DeviceContext, config: IommuConfig, fctl: int) -> bool:
    be, gxl = bool(fctl & 1), bool(fctl & 4)
    if not config.amo_hwad and (dc.sade or dc.gade):
        return True
    if not config.be_writable and dc.sbe != be:
        return True
    if gxl and not dc.sxl:
        return True
    return not config.gxl_writable and dc.sxl


_MISCONFIGURATIONS = (
    ("reserved bits set, or a QoS ID beyond its width",
     lambda dc, config, fctl: _reserved_bits_set(dc, config)),
    ("EN_ATS/EN_PRI/PRPR/T2GPA set against the rules or the capabilities",
     lambda dc, config, fctl: _ats_rules_broken(dc, config)),
    ("an unsupported or reserved iosatp/pdtp/iohgatp/msiptp mode, DPE without PDTV, or "
     "a misaligned iohgatp root",
     lambda dc, config, fctl: _modes_broken(dc, config, bool(fctl & 4))),
    ("SADE/GADE without AMO_HWAD, SBE against fctl.BE, or SXL against GXL",
     _control_broken),
)


def misconfiguration(dc: DeviceContext, config: IommuConfig, fctl: int) -> str | None:
    """§3.1.4: why a V=1 device context is misconfigured (cause 259), or None.

    Address-width checks (PPNs beyond PAS) are left to the walk, where they are access
    faults; the spec allows either.
    """
    for why, broken in _MISCONFIGURATIONS:
        if broken(dc, config, fctl):
            return why
    return None


def device_context_misconfigured(dc: DeviceContext, config: IommuConfig, fctl: int) -> bool:
    """§3.1.4: whether a V=1 device context is misconfigured (cause 259)."""
    return misconfiguration(dc, config, fctl) is not None


def process_id_fits(process_id: int, pdtp_mode: int) -> bool:
    return 0 <= process_id < 1 << PID_BITS[pdtp_mode]


def process_directory_index(process_id: int) -> tuple[int, int, int]:
    return process_id & 0xFF, process_id >> 8 & 0x1FF, process_id >> 17 & 0x7


_PC_TA_RESERVED = (0x1FF << 3) | (0xFFFF_FFFF << 32)


def locate_process_context(memory: GuestMemory, config: IommuConfig, dc: DeviceContext,
                           process_id: int, gpa_to_spa: Callable[[int], int],
                           record=None) -> ProcessContext:
    """Walk the PDT of `dc` for `process_id` (§3.3.2).

    `gpa_to_spa` translates each PDT address through the G-stage as an implicit read
    (identity when iohgatp is Bare); it raises `Stop` with the guest page fault.
    """
    pdi = process_directory_index(process_id)
    a = dc.fsc_ppn << PAGE_SHIFT
    translated = dc.iohgatp_mode != BARE
    for i in range(PDT_LEVELS[dc.fsc_mode] - 1, 0, -1):
        spa = gpa_to_spa(a + pdi[i] * 8)
        pdte = read_table_word(memory, config.pas, spa, 8, dc.sbe, Cause.PDT_LOAD_ACCESS_FAULT)
        decision = _non_leaf(pdte)
        if record is not None:
            record.step(steps.PDTE, i, spa, pdte, decision, big_endian=dc.sbe,
                        gpa=a + pdi[i] * 8 if translated else None)
        if decision is NOT_VALID:
            raise Stop(Cause.PDT_ENTRY_NOT_VALID)
        if decision is RESERVED:
            raise Stop(Cause.PDT_ENTRY_MISCONFIGURED)
        a = (pdte >> 10 & PPN_MASK) << PAGE_SHIFT
    base = a + pdi[0] * 16
    spas = []
    words = []
    for k in range(2):
        spas.append(gpa_to_spa(base + 8 * k))
        words.append(read_table_word(memory, config.pas, spas[k], 8, dc.sbe,
                                     Cause.PDT_LOAD_ACCESS_FAULT))
    spa = spas[0]
    pc = ProcessContext(*words)
    why = NOT_VALID if not pc.v else None
    if why is None and (pc.ta & _PC_TA_RESERVED or pc.fsc & _ATP_RESERVED):
        why = RESERVED
    if why is None and not first_stage_mode_ok(pc.fsc_mode, dc.sxl, config):
        why = "an unsupported or reserved fsc mode"
    if record is not None:
        record.step(steps.PC, 0, spa, tuple(words), why or steps.VALID, big_endian=dc.sbe,
                    gpa=base if translated else None)
    if why is NOT_VALID:
        raise Stop(Cause.PDT_ENTRY_NOT_VALID)
    if why is not None:
        raise Stop(Cause.PDT_ENTRY_MISCONFIGURED)
    return pc
