"""Register, command and page-request layouts of the RISC-V IOMMU (spec v1.0.1 §6–§8).

Each architected layout is written once, here, as a `construct` definition named as in
the spec (field names follow the spec's tables; `LOG2SZ-1` is spelled `LOG2SZ_1`).
Registers and in-memory records are little-endian integers, so every layout is a
`BitStruct` (most significant field first, as construct wants it) wrapped in
`ByteSwapped`. Unnamed `Padding` marks reserved bits.

The hot paths never call construct: `BitLayout` reads each field's bit position out of
the construct definition once, at import, and then works on plain ints. A unit test
proves that `BitLayout` and construct agree on every layout.
"""

from __future__ import annotations

from construct import BitsInteger, BitStruct, ByteSwapped, Construct, Flag, Padding


def _reg(*fields: Construct) -> Construct:
    return ByteSwapped(BitStruct(*fields))


class BitLayout:
    """Field positions of one little-endian layout, derived from its construct definition."""

    def __init__(self, name: str, layout: Construct):
        self.name = name
        self.construct = layout
        self.fields: dict[str, tuple[int, int]] = {}
        subcons = layout.subcon.subcon.subcons  # ByteSwapped -> Bitwise -> Struct
        self.bits = sum(sc.sizeof() for sc in subcons)
        pos = self.bits
        for sc in subcons:
            width = sc.sizeof()
            pos -= width
            if sc.name is not None and not sc.name.startswith("_"):
                self.fields[sc.name] = (pos, width)
        self.defined_mask = 0
        for lo, width in self.fields.values():
            self.defined_mask |= ((1 << width) - 1) << lo
        self.reserved_mask = ((1 << self.bits) - 1) & ~self.defined_mask

    def mask(self, name: str) -> int:
        lo, width = self.fields[name]
        return ((1 << width) - 1) << lo

    def get(self, value: int, name: str) -> int:
        lo, width = self.fields[name]
        return (value >> lo) & ((1 << width) - 1)

    def put(self, value: int, name: str, field: int) -> int:
        lo, width = self.fields[name]
        m = ((1 << width) - 1) << lo
        return (value & ~m) | ((field << lo) & m)

    def decode(self, value: int) -> dict[str, int]:
        return {name: self.get(value, name) for name in self.fields}

    def encode(self, **fields: int) -> int:
        value = 0
        for name, field in fields.items():
            value = self.put(value, name, int(field))
        return value


# -- §6.3 capabilities --------------------------------------------------------------
capabilities = _reg(
    "custom" / BitsInteger(8), Padding(12),
    "S" / Flag, "NL" / Flag, "QOSID" / Flag, "PD20" / Flag, "PD17" / Flag, "PD8" / Flag,
    "PAS" / BitsInteger(6),
    "DBG" / Flag, "HPM" / Flag, "IGS" / BitsInteger(2), "END" / Flag, "T2GPA" / Flag,
    "ATS" / Flag, "AMO_HWAD" / Flag, "MSI_MRIF" / Flag, "MSI_FLAT" / Flag, "AMO_MRIF" / Flag,
    Padding(1),
    "Sv57x4" / Flag, "Sv48x4" / Flag, "Sv39x4" / Flag, "Sv32x4" / Flag, "Svpbmt" / Flag,
    "Svrsw60t59b" / Flag, Padding(2),
    "Sv57" / Flag, "Sv48" / Flag, "Sv39" / Flag, "Sv32" / Flag,
    "version" / BitsInteger(8),
)

# -- §6.4 fctl ----------------------------------------------------------------------
fctl = _reg("custom" / BitsInteger(16), Padding(13), "GXL" / Flag, "WSI" / Flag, "BE" / Flag)

# -- §6.5 ddtp ----------------------------------------------------------------------
ddtp = _reg(Padding(10), "PPN" / BitsInteger(44), Padding(5), "busy" / Flag,
            "iommu_mode" / BitsInteger(4))

# -- §6.6–§6.14 queue bases, heads, tails -----------------------------------------------
cqb = _reg(Padding(10), "PPN" / BitsInteger(44), Padding(5), "LOG2SZ_1" / BitsInteger(5))
fqb = cqb
pqb = cqb
queue_index = _reg("index" / BitsInteger(32))
cqh = cqt = fqh = fqt = pqh = pqt = queue_index

# -- §6.15–§6.17 queue CSRs ---------------------------------------------------------
cqcsr = _reg(
    "custom" / BitsInteger(4), Padding(10), "busy" / Flag, "cqon" / Flag, Padding(4),
    "fence_w_ip" / Flag, "cmd_ill" / Flag, "cmd_to" / Flag, "cqmf" / Flag, Padding(6),
    "cie" / Flag, "cqen" / Flag,
)
fqcsr = _reg(
    "custom" / BitsInteger(4), Padding(10), "busy" / Flag, "fqon" / Flag, Padding(6),
    "fqof" / Flag, "fqmf" / Flag, Padding(6), "fie" / Flag, "fqen" / Flag,
)
pqcsr = _reg(
    "custom" / BitsInteger(4), Padding(10), "busy" / Flag, "pqon" / Flag, Padding(6),
    "pqof" / Flag, "pqmf" / Flag, Padding(6), "pie" / Flag, "pqen" / Flag,
)

# -- §6.18 ipsr ---------------------------------------------------------------------
ipsr = _reg(Padding(16), "custom" / BitsInteger(8), Padding(4),
            "pip" / Flag, "pmip" / Flag, "fip" / Flag, "cip" / Flag)

# -- §6.19–§6.23 HPM ----------------------------------------------------------------
iocountovf = _reg("hpm" / BitsInteger(31), "cy" / Flag)
iocountinh = _reg("hpm" / BitsInteger(31), "cy" / Flag)
iohpmcycles = _reg("OF" / Flag, "counter" / BitsInteger(63))
iohpmctr = _reg("counter" / BitsInteger(64))
iohpmevt = _reg(
    "OF" / Flag, "IDT" / Flag, "DV_GSCV" / Flag, "PV_PSCV" / Flag,
    "DID_GSCID" / BitsInteger(24), "PID_PSCID" / BitsInteger(20), "DMASK" / Flag,
    "eventID" / BitsInteger(15),
)

# -- §6.24–§6.26 debug translation interface --------------------------------------------
tr_req_iova = _reg("vpn" / BitsInteger(52), Padding(12))
tr_req_ctl = _reg(
    "DID" / BitsInteger(24), "custom" / BitsInteger(4), Padding(3), "PV" / Flag,
    "PID" / BitsInteger(20), Padding(8), "NW" / Flag, "Exe" / Flag, "Priv" / Flag,
    "Go_Busy" / Flag,
)
tr_response = _reg(
    "custom" / BitsInteger(4), Padding(6), "PPN" / BitsInteger(44), "S" / Flag,
    "PBMT" / BitsInteger(2), Padding(6), "fault" / Flag,
)

# -- §6.27 iommu_qosid --------------------------------------------------------------
iommu_qosid = _reg(Padding(4), "MCID" / BitsInteger(12), Padding(4), "RCID" / BitsInteger(12))

# -- §6.28–§6.29 icvec and msi_cfg_tbl ------------------------------------------------
icvec = _reg("custom" / BitsInteger(32), Padding(16),
             "piv" / BitsInteger(4), "pmiv" / BitsInteger(4), "fiv" / BitsInteger(4),
             "civ" / BitsInteger(4))
msi_addr = _reg(Padding(8), "ADDR" / BitsInteger(54), Padding(2))
msi_data = _reg("data" / BitsInteger(32))
msi_vec_ctl = _reg(Padding(31), "M" / Flag)

# -- §4.1 commands (16 bytes; DW1 is the high half of the 128-bit little-endian value) --
command = _reg("dw1" / BitsInteger(64), "dw0_operands" / BitsInteger(54),
               "func3" / BitsInteger(3), "opcode" / BitsInteger(7))
IOTINVAL = _reg(
    Padding(2), "ADDR" / BitsInteger(52), "S" / Flag, Padding(9),
    Padding(4), "GSCID" / BitsInteger(16), Padding(9), "NL" / Flag, "GV" / Flag,
    "PSCV" / Flag, "PSCID" / BitsInteger(20), Padding(1), "AV" / Flag,
    "func3" / BitsInteger(3), "opcode" / BitsInteger(7),
)
IOFENCE = _reg(
    Padding(2), "ADDR" / BitsInteger(62),
    "DATA" / BitsInteger(32), Padding(18), "PW" / Flag, "PR" / Flag, "WSI" / Flag,
    "AV" / Flag, "func3" / BitsInteger(3), "opcode" / BitsInteger(7),
)
IODIR = _reg(
    Padding(64),
    "DID" / BitsInteger(24), Padding(6), "DV" / Flag, Padding(1), "PID" / BitsInteger(20),
    Padding(2), "func3" / BitsInteger(3), "opcode" / BitsInteger(7),
)
ATS = _reg(
    "PAYLOAD" / BitsInteger(64),
    "DSEG" / BitsInteger(8), "RID" / BitsInteger(16), Padding(6), "DSV" / Flag, "PV" / Flag,
    "PID" / BitsInteger(20), Padding(2), "func3" / BitsInteger(3), "opcode" / BitsInteger(7),
)
# §4.1.4: the ATS.INVAL and ATS.PRGR payloads as PCIe carries them.
ats_inval_payload = _reg("addr" / BitsInteger(52), "S" / Flag, Padding(10), "G" / Flag)
prgr_payload = _reg(Padding(16), "response_code" / BitsInteger(4), Padding(3),
                    "prg_index" / BitsInteger(9), Padding(32))

# -- §3.3 page-request record (16 bytes) ----------------------------------------------
page_request = _reg(
    "page_addr" / BitsInteger(52), "prg_index" / BitsInteger(9), "L" / Flag, "W" / Flag,
    "R" / Flag,
    "DID" / BitsInteger(24), Padding(5), "EXEC" / Flag, "PRIV" / Flag, "PV" / Flag,
    "PID" / BitsInteger(20), Padding(12),
)

LAYOUTS: dict[str, BitLayout] = {
    name: BitLayout(name, c) for name, c in {
        "capabilities": capabilities, "fctl": fctl, "ddtp": ddtp, "cqb": cqb,
        "queue_index": queue_index, "cqcsr": cqcsr, "fqcsr": fqcsr, "pqcsr": pqcsr,
        "ipsr": ipsr, "iocountovf": iocountovf, "iocountinh": iocountinh,
        "iohpmcycles": iohpmcycles, "iohpmctr": iohpmctr, "iohpmevt": iohpmevt,
        "tr_req_iova": tr_req_iova, "tr_req_ctl": tr_req_ctl, "tr_response": tr_response,
        "iommu_qosid": iommu_qosid, "icvec": icvec, "msi_addr": msi_addr,
        "msi_data": msi_data, "msi_vec_ctl": msi_vec_ctl, "command": command,
        "IOTINVAL": IOTINVAL, "IOFENCE": IOFENCE, "IODIR": IODIR, "ATS": ATS,
        "ats_inval_payload": ats_inval_payload, "prgr_payload": prgr_payload,
        "page_request": page_request,
    }.items()
}

CAPABILITIES = LAYOUTS["capabilities"]
FCTL = LAYOUTS["fctl"]
DDTP = LAYOUTS["ddtp"]
QB = LAYOUTS["cqb"]
CQCSR = LAYOUTS["cqcsr"]
FQCSR = LAYOUTS["fqcsr"]
PQCSR = LAYOUTS["pqcsr"]
IPSR = LAYOUTS["ipsr"]
IOHPMCYCLES = LAYOUTS["iohpmcycles"]
IOHPMEVT = LAYOUTS["iohpmevt"]
TR_REQ_CTL = LAYOUTS["tr_req_ctl"]
TR_RESPONSE = LAYOUTS["tr_response"]
IOMMU_QOSID = LAYOUTS["iommu_qosid"]
ICVEC = LAYOUTS["icvec"]
MSI_ADDR = LAYOUTS["msi_addr"]
COMMAND = LAYOUTS["command"]
CMD_IOTINVAL = LAYOUTS["IOTINVAL"]
CMD_IOFENCE = LAYOUTS["IOFENCE"]
CMD_IODIR = LAYOUTS["IODIR"]
CMD_ATS = LAYOUTS["ATS"]
PRGR_PAYLOAD = LAYOUTS["prgr_payload"]
PAGE_REQUEST = LAYOUTS["page_request"]
