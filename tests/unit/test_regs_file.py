"""Register file: reset values, RO/RW/RW1C/WARL behaviour, access sizes (spec §5)."""

import dataclasses

import pytest
from part2_double import FakeIommu

from vfiouser_iommu.iommu.registers import RegisterFile
from vfiouser_iommu.iommu.regs_layouts import LAYOUTS

CAPS, FCTL, DDTP, CQB, CQH, CQT, FQB, FQH, FQT = 0, 8, 0x10, 0x18, 0x20, 0x24, 0x28, 0x30, 0x34
PQB, PQH, PQT, CQCSR, FQCSR, PQCSR, IPSR = 0x38, 0x40, 0x44, 0x48, 0x4C, 0x50, 0x54
IOCOUNTOVF, IOCOUNTINH, IOHPMCYCLES, ICVEC = 0x58, 0x5C, 0x60, 0x2F8
TR_REQ_IOVA, TR_REQ_CTL, TR_RESPONSE, QOSID = 0x258, 0x260, 0x268, 0x270


@pytest.fixture
def iommu():
    return FakeIommu(msi_table_external=False)


RESET_ZERO = [FCTL, DDTP, CQH, CQT, FQH, FQT, PQH, PQT, CQCSR, FQCSR, PQCSR, IPSR, IOCOUNTOVF,
              IOCOUNTINH, 0x68, 0x160, TR_REQ_IOVA, TR_REQ_CTL, TR_RESPONSE, ICVEC]


@pytest.mark.parametrize("offset", RESET_ZERO)
def test_reset_value_is_zero(iommu, offset):
    for _ in range(2):
        assert iommu.read(offset, 4) == 0
        iommu.write(offset, 0xFFFF_FFFE)  # Go=0: no debug translation
        iommu.regs.reset()


def test_capabilities_reads_config_and_is_read_only(iommu):
    caps = iommu.config.capabilities
    assert iommu.read(CAPS, 8) == caps
    assert iommu.read(CAPS, 4) == caps & 0xFFFF_FFFF
    assert iommu.read(CAPS + 4, 4) == caps >> 32
    iommu.write(CAPS, 0, 8)
    assert iommu.read(CAPS, 8) == caps


def test_ddtp_resets_off_with_ppn_zero_and_reset_empties_caches(iommu):
    iommu.write(DDTP, 0x1234_5000 | 4, 8)
    resets = iommu.translation_resets
    iommu.regs.reset()
    assert iommu.read(DDTP, 8) == 0 and iommu.ddtp == 0
    assert iommu.translation_resets == resets + 1


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_ddtp_supported_modes_read_back_with_ppn(iommu, mode):
    iommu.write(DDTP, (0xABCDE << 10) | mode, 8)
    assert iommu.read(DDTP, 8) == (0xABCDE << 10) | mode
    assert iommu.ddtp == (0xABCDE << 10) | mode


@pytest.mark.parametrize("mode", range(5, 16))
def test_ddtp_reserved_modes_keep_old_value(iommu, mode):
    iommu.write(DDTP, 1, 8)
    iommu.write(DDTP, (7 << 10) | mode, 8)
    assert iommu.read(DDTP, 8) == 1


def test_ddtp_level_to_other_level_ignored_but_off_bare_allowed(iommu):
    iommu.write(DDTP, (5 << 10) | 4, 8)
    iommu.write(DDTP, (5 << 10) | 3, 8)
    assert iommu.read(DDTP, 8) == (5 << 10) | 4
    iommu.write(DDTP, (5 << 10) | 1, 8)
    assert iommu.read(DDTP, 8) & 0xF == 1
    iommu.write(DDTP, (5 << 10) | 3, 8)
    iommu.write(DDTP, 0, 8)
    assert iommu.read(DDTP, 8) == 0


def test_ddtp_busy_and_reserved_bits_read_zero(iommu):
    iommu.write(DDTP, 0xFFFF_FFFF_FFFF_FFF0, 8)
    value = iommu.read(DDTP, 8)
    assert value & 0x3F0 == 0 and value >> 54 == 0
    assert value >> 10 == (1 << 44) - 1


def test_ddtp_written_as_two_halves_high_first(iommu):
    value = (0x12_3456_789A << 10) | 4
    iommu.write(DDTP + 4, value >> 32)
    iommu.write(DDTP, value & 0xFFFF_FFFF)
    assert iommu.read(DDTP, 8) == value


@pytest.mark.parametrize("caps,writable", [
    (dict(END=0, IGS=0), 0), (dict(END=1, IGS=0), 1), (dict(END=0, IGS=2), 2),
    (dict(END=1, IGS=2), 3)])
def test_fctl_warl_per_capabilities(caps, writable):
    iommu = FakeIommu(caps)
    iommu.write(FCTL, 0xFFFF_FFFF)
    assert iommu.read(FCTL) == writable
    assert iommu.fctl == writable


def test_fctl_wsi_only_reads_one_and_gxl_follows_config():
    iommu = FakeIommu(dict(IGS=1))
    assert iommu.read(FCTL) == 2
    iommu.write(FCTL, 0)
    assert iommu.read(FCTL) == 2
    iommu = FakeIommu(dict(Sv32x4=1))
    assert iommu.config.gxl_writable
    iommu.write(FCTL, 4)
    assert iommu.read(FCTL) == 4


def test_fctl_write_ignored_while_a_queue_is_on():
    iommu = FakeIommu(dict(END=1))
    iommu.write(CQB, 0x8000_0 << 10 >> 10, 8)
    iommu.write(CQCSR, 1)
    iommu.write(FCTL, 1)
    assert iommu.read(FCTL) == 0


@pytest.mark.parametrize("qb", [CQB, FQB, PQB])
def test_queue_base_log2sz_and_ppn_exact_readback(iommu, qb):
    iommu.write(qb, 0x1F, 8)
    assert iommu.read(qb, 8) == 0x1F
    value = (0x80123 << 10) | 11
    iommu.write(qb, value, 8)
    assert iommu.read(qb, 8) == value
    iommu.write(qb, 0xFFFF_FFFF_FFFF_FFFF, 8)
    assert iommu.read(qb, 8) == ((1 << 44) - 1) << 10 | 0x1F


def test_queue_base_ppn_limited_by_pas():
    iommu = FakeIommu(dict(PAS=40))
    iommu.write(CQB, 0xFFFF_FFFF_FFFF_FFFF, 8)
    assert iommu.read(CQB, 8) == ((1 << 28) - 1) << 10 | 0x1F


@pytest.mark.parametrize("index_reg,qb", [(CQT, CQB), (FQH, FQB), (PQH, PQB)])
def test_software_index_warl_to_queue_size(iommu, index_reg, qb):
    iommu.write(qb, (0x80000 << 10) | 3, 8)  # 16 entries
    iommu.write(index_reg, 0xFFFF_FFFF)
    assert iommu.read(index_reg) == 0xF


@pytest.mark.parametrize("ro", [CQH, FQT, PQT])
def test_iommu_owned_indices_are_read_only(iommu, ro):
    iommu.write(ro, 5)
    assert iommu.read(ro) == 0


@pytest.mark.parametrize("csr,en,errors", [
    (CQCSR, 0x3, (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11)),
    (FQCSR, 0x3, (1 << 8) | (1 << 9)), (PQCSR, 0x3, (1 << 8) | (1 << 9))])
def test_csr_enable_on_busy_and_rw1c(iommu, csr, en, errors):
    iommu.write(csr - 0x48 + CQB if csr == CQCSR else (FQB if csr == FQCSR else PQB),
                0x80000 << 10, 8)
    iommu.write(csr, 0xFFFF_FFFF)
    assert iommu.read(csr) == en | 1 << 16  # en, ie, on; busy 0; RW1C stay 0
    queue = {CQCSR: iommu.regs.cq, FQCSR: iommu.regs.fq, PQCSR: iommu.regs.pq}[csr]
    queue.csr |= errors
    iommu.write(csr, en)  # writing 0 to RW1C bits keeps them
    assert iommu.read(csr) & errors == errors
    iommu.write(csr, en | errors)
    assert iommu.read(csr) & errors == 0
    iommu.write(csr, 0)
    assert iommu.read(csr) == 0


def test_icvec_warl_vector_count():
    iommu = FakeIommu()
    iommu.write(ICVEC, 0xFFFF, 8)
    assert iommu.read(ICVEC, 8) == 0x3333  # 4 vectors by default
    iommu = FakeIommu(vectors=16)
    iommu.write(ICVEC, 0xFFFF_FFFF_FFFF_FFFF, 8)
    assert iommu.read(ICVEC, 8) == 0xFFFF
    iommu = FakeIommu(dict(HPM=0, ATS=0), vectors=16)
    iommu.write(ICVEC, 0xFFFF, 8)
    assert iommu.read(ICVEC, 8) == 0x00FF  # pmiv and piv read-only 0


@pytest.mark.parametrize("caps,offsets", [
    (dict(ATS=0), [PQB, PQH, PQT, PQCSR]),
    (dict(HPM=0), [IOCOUNTOVF, IOCOUNTINH, IOHPMCYCLES, 0x68, 0x160]),
    (dict(DBG=0), [TR_REQ_IOVA, TR_REQ_CTL, TR_RESPONSE]),
    (dict(QOSID=0), [QOSID]), (dict(IGS=1), [0x300, 0x308, 0x30C])])
def test_absent_optional_registers_read_zero(caps, offsets):
    iommu = FakeIommu(caps, msi_table_external=False)
    for offset in offsets:
        iommu.write(offset, 0xFFFF_FFFF)
        assert iommu.read(offset) == 0


def test_qosid_warl_per_configured_widths():
    iommu = FakeIommu(dict(QOSID=1))
    iommu.write(QOSID, 0xFFFF_FFFF)
    assert iommu.read(QOSID) == 0x0FFF_0FFF
    iommu.config = dataclasses.replace(iommu.config, rcid_bits=4, mcid_bits=6)
    iommu.regs = RegisterFile(iommu)
    iommu.write(QOSID, 0xFFFF_FFFF)
    assert iommu.read(QOSID) == 0x003F_000F


@pytest.mark.parametrize("offset,size", [(FCTL + 1, 4), (DDTP + 4, 8), (CQH, 8), (CQB, 2),
                                         (CQB, 1), (0x274, 4), (0x400, 4), (0xFF8, 8),
                                         (0x1000, 4)])
def test_unsupported_accesses_read_zero_and_write_nothing(iommu, offset, size):
    iommu.write(CQB, 0x1F, 8)
    stable = [o for o in range(0, 0x300, 4) if o not in (IOHPMCYCLES, IOHPMCYCLES + 4)]
    before = {o: iommu.read(o, 4) for o in stable}
    iommu.write(offset, 0xFFFF_FFFF_FFFF_FFFF & ((1 << 8 * size) - 1), size)
    assert iommu.read(offset, size) == 0
    assert {o: iommu.read(o, 4) for o in stable} == before


def test_split_access_to_64bit_register_reads_halves(iommu):
    iommu.write(CQB, (0x87654 << 10) | 5, 8)
    value = iommu.read(CQB, 8)
    assert iommu.read(CQB, 4) | iommu.read(CQB + 4, 4) << 32 == value
    iommu.write(CQB + 4, 0)
    assert iommu.read(CQB, 8) == value & 0xFFFF_FFFF


def test_msi_cfg_tbl_fields(iommu):
    iommu.write(0x310, 0xFFFF_FFFF_FFFF_FFFF, 8)
    assert iommu.read(0x310, 8) == ((1 << 56) - 1) & ~3
    iommu.write(0x318, 0xDEAD_BEEF)
    assert iommu.read(0x318) == 0xDEAD_BEEF
    iommu.write(0x31C, 0xFFFF_FFFF)
    assert iommu.read(0x31C) == 1


def test_msi_cfg_tbl_absent_when_external():
    iommu = FakeIommu(msi_table_external=True)
    iommu.write(0x300, 0x1234, 4)
    assert iommu.read(0x300) == 0


def test_layout_codec_agrees_with_construct():
    """The hot-path BitLayout and the construct definitions decode the same bits."""
    import random

    rng = random.Random(5)
    for name, layout in LAYOUTS.items():
        nbytes = layout.bits // 8
        for _ in range(20):
            raw = rng.getrandbits(layout.bits)
            parsed = layout.construct.parse(raw.to_bytes(nbytes, "little"))
            fields = layout.decode(raw)
            assert {k: int(parsed[k]) for k in fields} == fields, name
            rebuilt = int.from_bytes(layout.construct.build(fields), "little")
            assert rebuilt == raw & layout.defined_mask, name
            assert layout.encode(**fields) == rebuilt, name
