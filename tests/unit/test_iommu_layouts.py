"""Layouts: every construct definition round-trips, and the hot-path int decoders
(DeviceContext, ProcessContext, decode_pte, MSI PTE fields, capabilities) agree with it."""

from __future__ import annotations

import random

import pytest

from vfiouser_iommu.iommu import Fault, IommuConfig, layouts
from vfiouser_iommu.iommu.config import Igs
from vfiouser_iommu.iommu.directory import DeviceContext, ProcessContext
from vfiouser_iommu.iommu.regs_layouts import CAPABILITIES
from vfiouser_iommu.iommu.walk import decode_pte


@pytest.mark.parametrize("layout", layouts.ALL_LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("big_endian", [False, True])
def test_round_trip(layout, big_endian):
    rng = random.Random(layout.name)
    for _ in range(20):
        raw = bytes(rng.randrange(256) for _ in range(layout.size))
        parsed = layout.parse(raw, big_endian)
        assert layout.build(parsed, big_endian) == raw


def test_sizes():
    assert layouts.device_context_base.size == 32
    assert layouts.device_context_extended.size == 64
    assert layouts.process_context.size == 16
    assert layouts.fault_record.size == 32
    assert layouts.msi_pte_basic.size == layouts.msi_pte_mrif.size == 16
    assert layouts.pte_sv32.size == 4


def test_field_positions_match_spec():
    tc = layouts.tc.parse((1 << 0 | 1 << 5 | 1 << 11).to_bytes(8, "little"))
    assert tc.V and tc.PDTV and tc.SXL and not tc.EN_ATS
    atp = layouts.iohgatp.parse((8 << 60 | 0xABCD << 44 | 0x123).to_bytes(8, "little"))
    assert (atp.MODE, atp.GSCID, atp.PPN) == (8, 0xABCD, 0x123)
    rec = layouts.fault_record.parse(bytes([0x0D, 0x10, 0, 0, 0x01, 0x10, 0, 0]) + bytes(24))
    assert rec.dw0.CAUSE == 13 and rec.dw0.PID == 1 and rec.dw0.PV and rec.dw0.DID == 0x10


def _le(value: int) -> bytes:
    return value.to_bytes(8, "little")


def test_device_context_decoder_agrees_with_layout():
    rng = random.Random(1)
    for _ in range(200):
        words = [rng.getrandbits(64) for _ in range(8)]
        dc = DeviceContext.from_words(words)
        p = layouts.device_context_extended.parse(b"".join(map(_le, words)))
        assert (dc.v, dc.en_ats, dc.en_pri, dc.t2gpa, dc.dtf, dc.pdtv, dc.prpr, dc.gade,
                dc.sade, dc.dpe, dc.sbe, dc.sxl) == (
            p.tc.V, p.tc.EN_ATS, p.tc.EN_PRI, p.tc.T2GPA, p.tc.DTF, p.tc.PDTV, p.tc.PRPR,
            p.tc.GADE, p.tc.SADE, p.tc.DPE, p.tc.SBE, p.tc.SXL)
        assert (dc.iohgatp_mode, dc.gscid, dc.iohgatp_ppn) == (
            p.iohgatp.MODE, p.iohgatp.GSCID, p.iohgatp.PPN)
        assert (dc.pscid, dc.rcid, dc.mcid) == (p.ta.PSCID, p.ta.RCID, p.ta.MCID)
        assert (dc.fsc_mode, dc.fsc_ppn) == (p.fsc.MODE, p.fsc.PPN)
        assert (dc.msiptp_mode, dc.msiptp_ppn) == (p.msiptp.MODE, p.msiptp.PPN)
        assert dc.msi_mask == p.msi_addr_mask.value
        assert dc.msi_pattern == p.msi_addr_pattern.value


def test_process_context_decoder_agrees_with_layout():
    rng = random.Random(2)
    for _ in range(200):
        ta, fsc = rng.getrandbits(64), rng.getrandbits(64)
        pc = ProcessContext(ta, fsc)
        p = layouts.process_context.parse(_le(ta) + _le(fsc))
        assert (pc.v, pc.ens, pc.sum, pc.pscid, pc.fsc_mode, pc.fsc_ppn) == (
            p.ta.V, p.ta.ENS, p.ta.SUM, p.ta.PSCID, p.fsc.MODE, p.fsc.PPN)


def test_pte_decoder_agrees_with_layout():
    rng = random.Random(3)
    for _ in range(300):
        raw = rng.getrandbits(64)
        flags, ppn, reserved, pbmt, n = decode_pte(raw, sv32=False)
        p = layouts.pte.parse(_le(raw))
        assert flags == sum(int(p[k]) << i for i, k in enumerate("VRWXUGAD"))
        assert (ppn, reserved >> 54, pbmt, n) == (p.PPN, p.reserved, p.PBMT, int(p.N))
        raw32 = raw & 0xFFFF_FFFF
        flags, ppn, *_ = decode_pte(raw32, sv32=True)
        p = layouts.pte_sv32.parse(raw32.to_bytes(4, "little"))
        assert flags & 1 == p.V and ppn == p.PPN


def test_msi_pte_fields_agree_with_layout():
    rng = random.Random(4)
    for _ in range(100):
        dw0, dw1 = rng.getrandbits(64), rng.getrandbits(64)
        p = layouts.msi_pte_mrif.parse(_le(dw0) + _le(dw1))
        assert (dw0 >> 7 & ((1 << 47) - 1)) == p.dw0.MRIF_Address
        assert (dw1 >> 10 & ((1 << 44) - 1)) == p.dw1.NPPN
        assert (dw1 & 0x3FF) | (dw1 >> 60 & 1) << 10 == p.dw1.NID | int(p.dw1.NID_10) << 10
        b = layouts.msi_pte_basic.parse(_le(dw0) + _le(dw1))
        assert (dw0 >> 10 & ((1 << 44) - 1)) == b.dw0.PPN and (dw0 >> 1 & 3) == b.dw0.M


def test_fault_record_round_trip_and_rules():
    f = Fault(cause=13, ttyp=2, iotval=0x1234, iotval2=0x5679, device_id=0xABCDEF,
              process_id=0x12345, privileged=True)
    for be in (False, True):
        assert Fault.from_record(f.to_record(be), be) == f
    no_pv = Fault(258, 3, 0x1000, 0, 0x10, None, True).to_record()
    p = layouts.fault_record.parse(no_pv)
    assert not p.dw0.PV and not p.dw0.PRIV and p.dw0.PID == 0
    none = Fault(273, 0, 0xFEE0_0000, 0, 0x10, 5, False).to_record()
    p = layouts.fault_record.parse(none)
    assert p.dw0.DID == 0 and not p.dw0.PV


def test_capabilities_round_trip_and_bits():
    c = IommuConfig()
    caps = c.capabilities
    assert caps & 0xFF == 0x10
    assert caps >> 9 & 7 == 0b111 and not caps >> 8 & 1          # Sv39/48/57, no Sv32
    assert caps >> 15 & 1 and caps >> 17 & 7 == 0b111            # Svpbmt, Sv39x4..57x4
    assert caps >> 22 & 1 and caps >> 23 & 1 and caps >> 24 & 1  # MSI_FLAT, MSI_MRIF, HWAD
    assert caps >> 28 & 3 == Igs.MSI and caps >> 32 & 0x3F == 56
    assert caps >> 38 & 7 == 0b111                               # PD8/17/20
    assert IommuConfig.from_capabilities(caps) == c
    qemu_pci = 0x0000_0078_C2CF_4F10 & ~(1 << 14)   # QEMU's default, minus Svrsw60t59b
    q = IommuConfig.from_capabilities(qemu_pci)
    assert q.sv32 and q.sv57 and q.msi_flat and q.ats and q.dbg and q.pd8 and not q.pd17
    assert q.capabilities == qemu_pci
    assert CAPABILITIES.construct.sizeof() == 8
