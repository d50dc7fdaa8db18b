"""In-memory translation data structures of the RISC-V IOMMU (spec v1.0.1 §3, §4.2, §8).

Every layout is written once here as a `construct` definition with the spec's field
names: non-leaf DDTE/PDTE (§3.1.1, §3.2.1), base and extended device context (§3.1.3),
process context (§3.2.2), iosatp/iohgatp/pdtp/msiptp, the page-table entry (Privileged
spec, Sv32 and RV64), the MSI PTE in basic-translate and MRIF mode (§3.1.3.6 / AIA) and
the fault-queue record (§4.2). Each architected doubleword is a bit structure whose fields
are listed least-significant first, as the spec's tables draw them. A `Layout` holds
both byte orders (fctl.BE / tc.SBE select one).

The translation hot path decodes with integer shifts instead (see `walk.py`); the unit
tests prove those decoders agree with these definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import BitsInteger, BitStruct, ByteSwapped, Construct, Flag, Struct


def lsb_first(pairs: list[tuple[str, Construct]]) -> list[Construct]:
    """Named bit fields listed LSB first, in the MSB-first order BitStruct wants."""
    return [name / sub for name, sub in reversed(pairs)]


def _dword(pairs: list[tuple[str, Construct]], *, little: bool) -> Construct:
    bits = sum(sub.sizeof() for _, sub in pairs)
    if bits != 64 and bits != 32:
        raise AssertionError(f"layout is {bits} bits")
    body = BitStruct(*lsb_first(pairs))
    return ByteSwapped(body) if little else body


def _u(width: int) -> Construct:
    return BitsInteger(width)


@dataclass(frozen=True)
class Layout:
    """One architected layout in both byte orders."""

    name: str
    little: Construct
    big: Construct

    def get(self, big_endian: bool) -> Construct:
        return self.big if big_endian else self.little

    def parse(self, data: bytes, big_endian: bool = False):
        return self.get(big_endian).parse(data)

    def build(self, value: dict, big_endian: bool = False) -> bytes:
        return self.get(big_endian).build(value)

    @property
    def size(self) -> int:
        return self.little.sizeof()


def _word_layout(name: str, pairs: list[tuple[str, Construct]]) -> Layout:
    return Layout(name, _dword(pairs, little=True), _dword(pairs, little=False))


def _struct_layout(name: str, members: list[tuple[str, Layout]]) -> Layout:
    return Layout(name, Struct(*[n / lay.little for n, lay in members]),
                  Struct(*[n / lay.big for n, lay in members]))


_NON_LEAF = [("V", Flag), ("reserved0", _u(9)), ("PPN", _u(44)), ("reserved1", _u(10))]

#: Non-leaf device-directory-table entry (§3.1.1).
ddte = _word_layout("ddte", _NON_LEAF)
#: Non-leaf process-directory-table entry (§3.2.1).
pdte = _word_layout("pdte", _NON_LEAF)

#: DC.tc, translation control (§3.1.3.1).
tc = _word_layout("tc", [
    ("V", Flag), ("EN_ATS", Flag), ("EN_PRI", Flag), ("T2GPA", Flag), ("DTF", Flag),
    ("PDTV", Flag), ("PRPR", Flag), ("GADE", Flag), ("SADE", Flag), ("DPE", Flag),
    ("SBE", Flag), ("SXL", Flag), ("reserved0", _u(12)), ("custom", _u(8)),
    ("reserved1", _u(32)),
])

#: DC.iohgatp, G-stage root and GSCID (§3.1.3.2).
iohgatp = _word_layout("iohgatp", [("PPN", _u(44)), ("GSCID", _u(16)), ("MODE", _u(4))])

#: DC.ta, translation attributes (§3.1.3.3).
ta = _word_layout("ta", [("reserved0", _u(12)), ("PSCID", _u(20)), ("reserved1", _u(8)),
                         ("RCID", _u(12)), ("MCID", _u(12))])

_ATP = [("PPN", _u(44)), ("reserved", _u(16)), ("MODE", _u(4))]
#: First-stage root pointer: DC.fsc with PDTV=0, and PC.fsc (§3.1.3.4).
iosatp = _word_layout("iosatp", _ATP)
#: Process-directory root pointer: DC.fsc with PDTV=1 (§3.1.3.4).
pdtp = _word_layout("pdtp", _ATP)
#: MSI page-table pointer (§3.1.3.5).
msiptp = _word_layout("msiptp", _ATP)

_MSI_ADDR = [("value", _u(52)), ("reserved", _u(12))]
#: DC.msi_addr_mask / DC.msi_addr_pattern (§3.1.3.6).
msi_addr_mask = _word_layout("msi_addr_mask", _MSI_ADDR)
msi_addr_pattern = _word_layout("msi_addr_pattern", _MSI_ADDR)

_reserved_dw = _word_layout("reserved", [("reserved", _u(64))])

_DC_BASE = [("tc", tc), ("iohgatp", iohgatp), ("ta", ta), ("fsc", iosatp)]
#: 32-byte base-format device context (capabilities.MSI_FLAT=0).
device_context_base = _struct_layout("device_context_base", _DC_BASE)
#: 64-byte extended-format device context (capabilities.MSI_FLAT=1).
device_context_extended = _struct_layout("device_context_extended", _DC_BASE + [
    ("msiptp", msiptp), ("msi_addr_mask", msi_addr_mask),
    ("msi_addr_pattern", msi_addr_pattern), ("reserved", _reserved_dw)])

#: PC.ta (§3.2.2).
pc_ta = _word_layout("pc_ta", [("V", Flag), ("ENS", Flag), ("SUM", Flag),
                               ("reserved0", _u(9)), ("PSCID", _u(20)),
                               ("reserved1", _u(32))])
#: 16-byte process context (§3.2.2).
process_context = _struct_layout("process_context", [("ta", pc_ta), ("fsc", iosatp)])

_PTE_FLAGS = [("V", Flag), ("R", Flag), ("W", Flag), ("X", Flag), ("U", Flag), ("G", Flag),
              ("A", Flag), ("D", Flag), ("RSW", _u(2))]
#: RV64 page-table entry (Sv39/48/57 and the x4 G-stage forms), Privileged spec.
pte = _word_layout("pte", _PTE_FLAGS + [("PPN", _u(44)), ("reserved", _u(7)),
                                        ("PBMT", _u(2)), ("N", Flag)])
#: Sv32 / Sv32x4 page-table entry.
pte_sv32 = _word_layout("pte_sv32", _PTE_FLAGS + [("PPN", _u(22))])

#: MSI PTE, basic-translate mode M=3 (§3.1.3.6 / AIA "IOMMU").
msi_pte_basic = _struct_layout("msi_pte_basic", [
    ("dw0", _word_layout("msi_pte_basic_dw0", [
        ("V", Flag), ("M", _u(2)), ("reserved0", _u(7)), ("PPN", _u(44)),
        ("reserved1", _u(9)), ("C", Flag)])),
    ("dw1", _word_layout("msi_pte_basic_dw1", [("ignored", _u(64))])),
])
#: MSI PTE, MRIF mode M=1.
msi_pte_mrif = _struct_layout("msi_pte_mrif", [
    ("dw0", _word_layout("msi_pte_mrif_dw0", [
        ("V", Flag), ("M", _u(2)), ("reserved0", _u(4)), ("MRIF_Address", _u(47)),
        ("reserved1", _u(9)), ("C", Flag)])),
    ("dw1", _word_layout("msi_pte_mrif_dw1", [
        ("NID", _u(10)), ("NPPN", _u(44)), ("reserved0", _u(6)), ("NID_10", Flag),
        ("reserved1", _u(3))])),
])

#: 32-byte fault-queue record (§4.2).
fault_record = _struct_layout("fault_record", [
    ("dw0", _word_layout("fault_record_dw0", [
        ("CAUSE", _u(12)), ("PID", _u(20)), ("PV", Flag), ("PRIV", Flag), ("TTYP", _u(6)),
        ("DID", _u(24))])),
    ("dw1", _word_layout("fault_record_dw1", [("custom", _u(32)), ("reserved", _u(32))])),
    ("iotval", _word_layout("iotval", [("iotval", _u(64))])),
    ("iotval2", _word_layout("iotval2", [("iotval2", _u(64))])),
])

ALL_LAYOUTS = (ddte, pdte, tc, iohgatp, ta, iosatp, pdtp, msiptp, msi_addr_mask,
               msi_addr_pattern, device_context_base, device_context_extended, pc_ta,
               process_context, pte, pte_sv32, msi_pte_basic, msi_pte_mrif, fault_record)
