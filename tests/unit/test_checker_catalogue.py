"""The catalogue of injected driver bugs (issue 11): each is caught by the invalidation
checker with the right structure and the right missing command, and each is a wrong
translation under cache=max. The command the checker names is then parsed, submitted
through the command queue, and must be enough: the next translation is what memory
says and nothing more is reported (so the checker's words are a working recipe).

A driver that does everything right (the same edits with the spec's invalidations)
gets no warning at all, in every cache mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from iommu_tables import LEAF_RW, RAM_BASE, V, atp, make_iommu

from vfiouser_iommu.iommu import Access, Fault, Request, Translation
from vfiouser_iommu.iommu import steps as S
from vfiouser_iommu.iommu.modes import set_modes
from vfiouser_iommu.iommu.probe import probe_walk
from vfiouser_iommu.iommu.regs_layouts import CMD_IODIR, CMD_IOTINVAL
from vfiouser_iommu.iommu.walk import SV39, SV39X4

DID, PID, PSCID, GSCID = 0x30, 0x5, 0x55, 0x66
PAGE_A, PAGE_B = RAM_BASE + (1 << 20), RAM_BASE + (1 << 20) + 0x1000
IOVA = 0x5000
CQ = RAM_BASE + (40 << 20)
FILE_GPA, MSI_MASK = 0x2800_0000, 0x7
IMSIC_A, IMSIC_B = RAM_BASE + (2 << 20), RAM_BASE + (2 << 20) + 0x1000
MIB2 = 2 << 20


class Driver:
    """A RiscvIommu with its command queue on, and the table builder a driver has."""

    def __init__(self, mode: str, negative: bool):
        self.iommu, self.b, self.root = make_iommu()
        set_modes(self.iommu, check=True, cache=mode, negative=negative)
        self.iommu.mmio_write(0x18, 8, (CQ >> 12) << 10 | 5)   # cqb: 64 entries
        self.iommu.mmio_write(0x48, 4, 1)                       # cqcsr.cqen
        self.tail = 0

    def submit(self, *commands: int) -> None:
        for command in commands:
            address = CQ + 16 * self.tail
            self.iommu.memory.write_int(address, 8, command & (1 << 64) - 1)
            self.iommu.memory.write_int(address + 8, 8, command >> 64)
            self.tail = (self.tail + 1) % 64
        self.iommu.mmio_write(0x24, 4, self.tail)
        assert self.iommu.mmio_read(0x20, 4) == self.tail        # cqh: all done

    def translate(self, request: Request):
        return self.iommu.translate(request)

    @property
    def stale(self):
        return list(self.iommu.checker.recent)


def vma(*, gv=0, gscid=0, pscv=0, pscid=0, av=0, addr=0) -> int:
    return CMD_IOTINVAL.encode(opcode=1, func3=0, GV=gv, GSCID=gscid, PSCV=pscv,
                               PSCID=pscid, AV=av, ADDR=addr >> 12)


def gvma(*, gv=0, gscid=0, av=0, addr=0) -> int:
    return CMD_IOTINVAL.encode(opcode=1, func3=1, GV=gv, GSCID=gscid, AV=av, ADDR=addr >> 12)


def inval_ddt(did=None) -> int:
    return CMD_IODIR.encode(opcode=3, func3=0, DV=did is not None, DID=did or 0)


def inval_pdt(did, pid) -> int:
    return CMD_IODIR.encode(opcode=3, func3=1, DV=1, DID=did, PID=pid)


def parse_command(text: str) -> list[int]:
    """The commands of a checker's `required` text ("A ..., then B ...")."""
    commands = []
    for part in re.split(r", then | and ", text):
        name, *operands = part.split(" (")[0].split()
        f = {k.lower(): int(v, 0) for k, v in (op.split("=") for op in operands)}
        build = {"IOTINVAL.VMA": vma, "IOTINVAL.GVMA": gvma}.get(name)
        if build is not None:
            commands.append(build(**f))
        elif name == "IODIR.INVAL_DDT":
            commands.append(inval_ddt(f["did"] if f.get("dv") else None))
        elif name == "IODIR.INVAL_PDT":
            commands.append(inval_pdt(f["did"], f["pid"]))
        else:
            raise AssertionError(f"unknown command in {text!r}")
    return commands


# -- the driver bugs ------------------------------------------------------------------------
def first_stage(d: Driver, tc: int = 1) -> int:
    pt = d.b.root(SV39)
    d.b.set_dc(d.root, 3, DID, 64, tc=tc, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    return pt


def pte_changed(d: Driver, commands: Callable[[], list[int]]) -> Request:
    pt = first_stage(d)
    slot = d.b.map(SV39, pt, IOVA, PAGE_A)
    request = Request(DID, None, IOVA, Access.WRITE)
    d.translate(request)
    d.b.write_pte(slot, (PAGE_B >> 12) << 10 | LEAF_RW, 8)
    d.submit(*commands())
    return request


def pte_without_iotinval(d: Driver, fixed: bool) -> Request:
    return pte_changed(d, lambda: [vma(pscv=1, pscid=PSCID, av=1, addr=IOVA)] if fixed else [])


def iotinval_wrong_pscid(d: Driver, fixed: bool) -> Request:
    return pte_changed(d, lambda: [vma(pscv=1, pscid=PSCID if fixed else PSCID + 1, av=1,
                                       addr=IOVA)])


def iotinval_wrong_address(d: Driver, fixed: bool) -> Request:
    return pte_changed(d, lambda: [vma(pscv=1, pscid=PSCID, av=1,
                                       addr=IOVA if fixed else IOVA + 0x1000)])


def superpage_split(d: Driver, fixed: bool) -> Request:
    """A 2 MiB leaf becomes a table of 4 KiB leaves, one of them retargeted, with no
    invalidation. The fix: one IOTINVAL.VMA of any 4 KiB page inside the old superpage,
    which removes every cache entry holding that superpage's leaf (§4.1.1 table: the
    entries "that contain first-stage leaf page table entries corresponding to the IOVA
    in ADDR"); here the first page, not the retargeted one."""
    pt = first_stage(d)
    base, target = 0x20_0000, RAM_BASE + (4 << 20)
    slot = d.b.map(SV39, pt, base, target, MIB2)
    changed = base + 0x1000
    for iova in (base, changed):
        d.translate(Request(DID, None, iova, Access.READ))
    table = d.b.alloc()
    for k in range(512):
        out = PAGE_B if base + k * 0x1000 == changed else target + k * 0x1000
        d.b.write_pte(table + 8 * k, (out >> 12) << 10 | LEAF_RW, 8)
    d.b.write_pte(slot, (table >> 12) << 10 | V, 8)
    d.submit(*([vma(pscv=1, pscid=PSCID, av=1, addr=base)] if fixed else []))
    return Request(DID, None, changed, Access.READ)


def dc_without_inval_ddt(d: Driver, fixed: bool) -> Request:
    """An identity (Bare) device context moved to a paging domain."""
    d.b.set_dc(d.root, 3, DID, 64, tc=1)
    request = Request(DID, None, IOVA, Access.READ)
    d.translate(request)
    pt = d.b.root(SV39)
    d.b.map(SV39, pt, IOVA, PAGE_A)
    d.b.set_dc(d.root, 3, DID, 64, tc=1, ta=PSCID << 12, fsc=atp(8, pt >> 12))
    d.submit(*([inval_ddt(DID)] if fixed else []))
    return request


def pc_without_inval_pdt(d: Driver, fixed: bool) -> Request:
    pdt = d.b.alloc()
    d.b.set_dc(d.root, 3, DID, 64, tc=1 | 1 << 5, fsc=atp(1, pdt >> 12))  # PDTV, PD8
    roots = []
    for page in (PAGE_A, PAGE_B):
        pt = d.b.root(SV39)
        d.b.map(SV39, pt, IOVA, page)
        roots.append(pt)
    d.b.set_pc(pdt, 1, PID, ta=PSCID << 12 | 1, fsc=atp(8, roots[0] >> 12))
    request = Request(DID, PID, IOVA, Access.READ)
    d.translate(request)
    d.b.set_pc(pdt, 1, PID, ta=PSCID << 12 | 1, fsc=atp(8, roots[1] >> 12))
    d.submit(*([inval_pdt(DID, PID), vma(pscv=1, pscid=PSCID)] if fixed else []))
    return request


def g_pte_without_gvma(d: Driver, fixed: bool) -> Request:
    g = d.b.root(SV39X4)
    d.b.set_dc(d.root, 3, DID, 64, tc=1, iohgatp=atp(8, g >> 12, GSCID))
    slot = d.b.map(SV39X4, g, IOVA, PAGE_A)
    request = Request(DID, None, IOVA, Access.READ)
    d.translate(request)
    d.b.write_pte(slot, (PAGE_B >> 12) << 10 | LEAF_RW, 8)
    d.submit(*([gvma(gv=1, gscid=GSCID, av=1, addr=IOVA)] if fixed else []))
    return request


def msi_pte_without_gvma(d: Driver, fixed: bool) -> Request:
    msipt = d.b.alloc()
    index = 2
    d.b.write64(msipt + index * 16, 1 | 3 << 1 | (IMSIC_A >> 12) << 10)
    d.b.set_dc(d.root, 3, DID, 64, tc=1, msiptp=atp(1, msipt >> 12), msi_mask=MSI_MASK,
               msi_pattern=FILE_GPA >> 12)
    file = FILE_GPA + index * 0x1000
    request = Request(DID, None, file, Access.WRITE)
    d.translate(request)
    d.b.write64(msipt + index * 16, 1 | 3 << 1 | (IMSIC_B >> 12) << 10)
    # The spec's recipe: GV=1 with DC.iohgatp.GSCID, which is 0 here (G-stage Bare).
    d.submit(*([gvma(gv=1, gscid=0, av=1, addr=file)] if fixed else []))
    return request


def dc_made_valid_under_negative_caching(d: Driver, fixed: bool) -> Request:
    d.b.set_dc(d.root, 3, DID, 64, tc=0)
    request = Request(DID, None, IOVA, Access.READ)
    assert isinstance(d.translate(request), Fault)
    d.b.set_dc(d.root, 3, DID, 64, tc=1)
    d.submit(*([inval_ddt(DID)] if fixed else []))
    return request


@dataclass(frozen=True)
class Bug:
    name: str
    inject: Callable[[Driver, bool], Request]
    cache: str
    structure: str
    level: str
    required: str
    negative: bool = False


CATALOGUE = [
    Bug("pte-changed-without-iotinval", pte_without_iotinval, "iotlb", S.FS_PTE,
        "level 0 leaf", f"IOTINVAL.VMA GV=0 PSCV=1 PSCID={PSCID:#x} AV=1 ADDR={IOVA:#x}"),
    Bug("iotinval-vma-wrong-pscid", iotinval_wrong_pscid, "iotlb", S.FS_PTE,
        "level 0 leaf", f"IOTINVAL.VMA GV=0 PSCV=1 PSCID={PSCID:#x} AV=1 ADDR={IOVA:#x}"),
    Bug("iotinval-vma-wrong-address", iotinval_wrong_address, "iotlb", S.FS_PTE,
        "level 0 leaf", f"IOTINVAL.VMA GV=0 PSCV=1 PSCID={PSCID:#x} AV=1 ADDR={IOVA:#x}"),
    Bug("superpage-split-without-iotinval", superpage_split, "iotlb", S.FS_PTE,
        "level 1 leaf: a 2 MiB superpage",
        f"IOTINVAL.VMA GV=0 PSCV=1 PSCID={PSCID:#x} AV=1 ADDR=0x201000"),
    Bug("dc-changed-without-iodir-inval-ddt", dc_without_inval_ddt, "ddt", S.DC, "",
        f"IODIR.INVAL_DDT DV=1 DID={DID:#x}"),
    Bug("pc-changed-without-iodir-inval-pdt", pc_without_inval_pdt, "pdt", S.PC, "",
        f"IODIR.INVAL_PDT DID={DID:#x} PID={PID:#x}, "
        f"then IOTINVAL.VMA GV=0 PSCV=1 PSCID={PSCID:#x} AV=0"),
    Bug("g-stage-pte-changed-without-iotinval-gvma", g_pte_without_gvma, "iotlb", S.GS_PTE,
        "level 0 leaf", f"IOTINVAL.GVMA GV=1 GSCID={GSCID:#x} AV=1 ADDR={IOVA:#x}"),
    Bug("msi-pte-changed-without-iotinval-gvma", msi_pte_without_gvma, "msi", S.MSI_PTE, "",
        f"IOTINVAL.GVMA GV=1 GSCID=0x0 AV=1 ADDR={FILE_GPA + 0x2000:#x}"),
    Bug("dc-made-valid-without-iodir-inval-ddt-negative", dc_made_valid_under_negative_caching,
        "ddt", S.DC, "", f"IODIR.INVAL_DDT DV=1 DID={DID:#x}", negative=True),
]


def outcome(result) -> tuple:
    if isinstance(result, Translation):
        return ("translation", result.address)
    return ("fault", result.cause)


@pytest.mark.parametrize("bug", CATALOGUE, ids=lambda b: b.name)
def test_bug_is_caught_and_is_a_wrong_translation_under_cache_max(bug):
    d = Driver("max", bug.negative)
    request = bug.inject(d, False)
    result = d.translate(request)
    memory_says = probe_walk(d.iommu, request)
    memory = (("translation", memory_says.translation.address) if memory_says.cause is None
              else ("fault", memory_says.cause))
    assert outcome(result) != memory, "the stale cache entry was not used"
    [stale] = d.stale
    assert (stale.cache, stale.structure, stale.level.strip(" ()"), stale.required) == \
        (bug.cache, bug.structure, bug.level, bug.required), stale.message()
    assert stale.old != stale.new and stale.address is not None
    assert stale.negative == bug.negative
    # The named command is enough: after it, memory's answer and no new warning.
    d.submit(*parse_command(stale.required))
    assert outcome(d.translate(request)) == memory
    assert len(d.stale) == 1 and d.stale[0].count == 1


@pytest.mark.parametrize("bug", CATALOGUE, ids=lambda b: b.name)
def test_bug_is_caught_in_cache_mode_spec_too(bug):
    d = Driver("spec", bug.negative)
    request = bug.inject(d, False)
    d.translate(request)
    assert [(s.structure, s.required) for s in d.stale] == [(bug.structure, bug.required)]


@pytest.mark.parametrize("mode", ["spec", "max", "none"])
@pytest.mark.parametrize("bug", CATALOGUE, ids=lambda b: b.name)
def test_the_correct_driver_gets_no_warning(bug, mode):
    d = Driver(mode, bug.negative and mode != "none")
    request = bug.inject(d, True)
    result = d.translate(request)
    assert d.stale == []
    memory_says = probe_walk(d.iommu, request)
    if memory_says.cause is None:
        assert outcome(result) == ("translation", memory_says.translation.address)
    else:
        assert outcome(result) == ("fault", memory_says.cause)


def test_the_warning_says_which_invalidation_missed_and_why():
    d = Driver("max", False)
    request = iotinval_wrong_pscid(d, False)
    d.translate(request)
    [stale] = d.stale
    assert len(stale.missed) == 1
    assert stale.missed[0].startswith("IOTINVAL.VMA")
    assert f"PSCID {PSCID + 1:#x} is not the entry's {PSCID:#x}" in stale.missed[0]
    message = stale.message()
    for part in ("IOTLB", "first-stage PTE (level 0 leaf)", "0x20040", "missing IOTINVAL.VMA"):
        assert part in message


def test_repeated_stale_uses_are_counted_not_repeated():
    d = Driver("max", False)
    request = pte_without_iotinval(d, False)
    for _ in range(5):
        d.translate(request)
    [stale] = d.stale
    assert stale.count == 5 and d.iommu.checker.uses == 5


def test_invalidations_that_removed_nothing_are_counted():
    d = Driver("spec", False)
    pte_without_iotinval(d, True)          # removes the IOTLB entry
    d.submit(vma(pscv=1, pscid=PSCID, av=1, addr=IOVA), inval_ddt(0x99))
    checker = d.iommu.checker
    assert checker.executed == {"IOTINVAL.VMA": 2, "IODIR.INVAL_DDT": 1}
    assert checker.removed_nothing == {"IOTINVAL.VMA": 1, "IODIR.INVAL_DDT": 1}
    assert "IOTINVAL.VMA 1 of 2" in checker.summary()
    assert [r.removed for r in d.iommu.regs.cq.history] == [1, 0, 0]


def test_a_dc_root_change_with_inval_ddt_but_no_iotinval_is_stale_roots():
    """The DC was invalidated, so the directory cache is fine; the IOTLB entry still
    comes from the old page tables (the SW recipe also needs IOTINVAL.VMA PSCID)."""
    d = Driver("max", False)
    pt = first_stage(d)
    d.b.map(SV39, pt, IOVA, PAGE_A)
    request = Request(DID, None, IOVA, Access.READ)
    d.translate(request)
    other = d.b.root(SV39)
    d.b.map(SV39, other, IOVA, PAGE_B)
    d.b.set_dc(d.root, 3, DID, 64, tc=1, ta=PSCID << 12, fsc=atp(8, other >> 12))
    d.submit(inval_ddt(DID))
    assert d.translate(request).address == PAGE_A
    [stale] = d.stale
    assert stale.structure.startswith("translation roots")
    assert stale.required == f"IOTINVAL.VMA GV=0 PSCV=1 PSCID={PSCID:#x} AV=0"
    d.submit(*parse_command(stale.required))
    assert d.translate(request).address == PAGE_B


def test_a_and_d_set_by_the_iommu_are_no_change():
    d = Driver("max", False)
    pt = first_stage(d, tc=1 | 1 << 8)             # SADE: the IOMMU sets A/D
    d.b.map(SV39, pt, IOVA, PAGE_A, flags=LEAF_RW & ~(1 << 6 | 1 << 7))
    d.translate(Request(DID, None, IOVA, Access.READ))     # sets A
    d.translate(Request(DID, None, IOVA, Access.WRITE))    # sets D, refills
    d.translate(Request(DID, None, IOVA, Access.WRITE))    # hit
    assert d.stale == []
