"""Reference scenarios: endpoint DMA through a RISC-V IOMMU, driven by qtest.

Models what a driver does to send iommu-testdev DMAs through a RISC-V IOMMU in the
four configurations of QEMU's `tests/qtest/iommu-riscv-test.c` (both stages Bare,
first stage (Sv39) only, G-stage (Sv39x4) only, nested), plus the fault and
invalidation cases a driver developer meets: an IOVA whose leaf PTE has V=0 (spec
v1.0.1 §5 page walks, causes 13/15 and 21/23), a device context with V=0 (§3.3,
cause 258), and a leaf PTE retargeted with and without IOTINVAL.VMA + IOFENCE.C
submitted through the command queue (§4.1, §3.3.6 caching rules). Registers follow §2
(fctl, ddtp, cqb/cqt/cqcsr, fqb/fqh/fqcsr), fault records §4.2. Everything is built
in guest RAM through a qtest session; nothing here knows which IOMMU answers, so the
same scenario runs on QEMU's `riscv-iommu-pci` and on ours.

The encodings are written here from the spec, not imported from `vfiouser_iommu.iommu`:
a scenario that checks our IOMMU must not share its layouts, or a wrong field would be
wrong on both sides and go unnoticed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

PAGE_SIZE = 0x1000
PTE_SIZE = 8

# Register offsets (spec §2 register map).
CAPABILITIES = 0x000
FCTL = 0x008
DDTP = 0x010
CQB, CQH, CQT = 0x018, 0x020, 0x024
FQB, FQH, FQT = 0x028, 0x030, 0x034
CQCSR, FQCSR = 0x048, 0x04C

# capabilities fields (§2.1).
CAP_SV39 = 1 << 9
CAP_SV39X4 = 1 << 17
CAP_MSI_FLAT = 1 << 22
CAP_IGS_SHIFT, IGS_WSI = 28, 1

# fctl (§2.2), ddtp (§2.3), cqcsr/fqcsr (§2.5).
FCTL_BE, FCTL_WSI, FCTL_GXL = 1 << 0, 1 << 1, 1 << 2
DDTP_MODE_MASK, DDTP_BUSY = 0xF, 1 << 4
IOMMU_MODE_OFF, IOMMU_MODE_BARE = 0, 1
IOMMU_MODE_LVL = {1: 2, 2: 3, 3: 4}  # 1LVL, 2LVL, 3LVL
PPN_SHIFT = 10  # ddtp, cqb, fqb, DDTE and PTE all keep their PPN at bit 10
PPN_MASK = (1 << 44) - 1
CQEN, FQEN = 1 << 0, 1 << 0
CQON, FQON = 1 << 16, 1 << 16
CQMF, CMD_TO, CMD_ILL = 1 << 8, 1 << 9, 1 << 10
CQ_ERRORS = CQMF | CMD_TO | CMD_ILL

# Commands (§4.1): opcode 6:0, func3 9:7.
OPCODE_IOTINVAL, OPCODE_IOFENCE = 1, 2
FUNC3_VMA, FUNC3_C = 0, 0
CMD_AV = 1 << 10

# Device context (§3.1): tc.V, and the MODE field shared by iosatp and iohgatp.
TC_V = 1
ATP_MODE_SHIFT = 60
ATP_MODE_SV39 = 8     # iosatp with tc.SXL=0
ATP_MODE_SV39X4 = 8   # iohgatp with fctl.GXL=0

# PTE bits (Privileged spec, RV64).
PTE_V, PTE_R, PTE_W, PTE_U, PTE_A, PTE_D = 1, 2, 4, 16, 64, 128

# Queue entry sizes (§2.4); 64 entries keep each queue inside one 4 KiB page.
CQ_ENTRY, FQ_ENTRY = 16, 32
QUEUE_LOG2SZ = 6

# iommu-testdev BAR0 (QEMU hw/misc/iommu-testdev.c): 32-bit registers only.
DMA_TRIGGERING = 0x00
DMA_GVA_LO, DMA_GVA_HI = 0x04, 0x08
DMA_LEN, DMA_RESULT, DMA_DBELL, DMA_ATTRS = 0x0C, 0x10, 0x14, 0x18
DMA_GPA_LO, DMA_GPA_HI = 0x1C, 0x20
# Our testdev's extension (endpoints/testdev.py): direction in DMA_CTRL bits 2:1. QEMU's
# device ignores the register, so only ours-only scenarios set it.
DMA_CTRL = 0x28
CTRL_READ = 1 << 1
DMA_DBELL_ARM = 1
DMA_RESULT_BUSY = 0xFFFF_FFFE
DMA_ERR_TX_FAIL = 0xDEAD_0002
DMA_ERR_MISMATCH = 0xDEAD_0004
TESTDEV_PATTERN = 0x1234_5678

# The IOVA of QEMU's test: itself a RAM address, so data that was not moved by
# translation would be visible there.
SCENARIO_IOVA = 0x8060_4567

POLL_SECONDS = 2.0


class Stages(enum.Enum):
    """Which translation stages the device context enables (iosatp / iohgatp modes)."""

    BARE = "bare"
    FIRST_STAGE = "s-stage-only"
    G_STAGE = "g-stage-only"
    NESTED = "nested"

    @property
    def first_stage(self) -> bool:
        return self in (Stages.FIRST_STAGE, Stages.NESTED)

    @property
    def g_stage(self) -> bool:
        return self in (Stages.G_STAGE, Stages.NESTED)


class QTestLike(Protocol):
    """The part of `lab.qtest.QTest` a scenario uses (a unit test may fake it)."""

    def readl(self, addr: int) -> int: ...
    def readq(self, addr: int) -> int: ...
    def writel(self, addr: int, value: int) -> None: ...
    def writeq(self, addr: int, value: int) -> None: ...
    def memread(self, addr: int, length: int) -> bytes: ...
    def memset(self, addr: int, length: int, value: int = 0) -> None: ...
    def clock_step(self, ns: int | None = None) -> int: ...


class ScenarioError(Exception):
    """The IOMMU cannot run the scenario (missing capability, not fresh from reset...)."""


@dataclass(frozen=True)
class ScenarioMemory:
    """Where the scenario puts its structures in guest RAM.

    `guest_offset` is the nested case's guest: a first-stage table or data page at
    system address A is the guest-physical address A - guest_offset, and the G-stage
    maps it back.
    """

    base: int = 0x8100_0000
    limit: int = 0x8200_0000
    guest_offset: int = 0x8000_0000


@dataclass(frozen=True)
class FaultRecord:
    """One fault-queue record (§7)."""

    cause: int
    pid: int
    pv: int
    priv: int
    ttyp: int
    did: int
    iotval: int
    iotval2: int

    @classmethod
    def decode(cls, raw: bytes) -> FaultRecord:
        dw0, _, iotval, iotval2 = (int.from_bytes(raw[i:i + 8], "little") for i in range(0, 32, 8))
        return cls(cause=dw0 & 0xFFF, pid=(dw0 >> 12) & 0xF_FFFF, pv=(dw0 >> 32) & 1,
                   priv=(dw0 >> 33) & 1, ttyp=(dw0 >> 34) & 0x3F, did=dw0 >> 40,
                   iotval=iotval, iotval2=iotval2)


@dataclass
class Tables:
    """What the builder wrote: addresses are system-physical unless named gpa."""

    ddt_root: int
    dc_address: int
    dc: list[int]
    data_page: int
    expected_address: int
    first_stage_pages: list[int] = field(default_factory=list)
    g_stage_pages: list[int] = field(default_factory=list)
    # The leaf PTE that maps the IOVA in the stage that decides it: the first stage when
    # enabled (nested included), else the G-stage; None for Bare.
    leaf_pte: int | None = None
    # How the leaf stores an address (nested first stages hold guest-physical ones).
    pointer: Callable[[int], int] = lambda a: a


@dataclass
class ScenarioResult:
    stages: Stages
    capabilities: int
    dma_result: int
    iova: int
    expected_address: int
    found: bytes            # at expected_address after the DMA
    at_iova: bytes          # at the IOVA read as a system address
    faults: list[FaultRecord]
    fqcsr: int
    tables: Tables

    @property
    def expected_data(self) -> bytes:
        return pattern(len(self.found))


def pattern(length: int) -> bytes:
    """The bytes iommu-testdev writes: its 32-bit pattern, little-endian, repeated."""
    word = TESTDEV_PATTERN.to_bytes(4, "little")
    return (word * (length // 4 + 1))[:length]


# -- guest memory ---------------------------------------------------------------------------
class PageAllocator:
    """Hands out zeroed, naturally aligned blocks of guest RAM from one window."""

    def __init__(self, mem: QTestLike, base: int, limit: int):
        self.mem, self.next, self.limit = mem, base, limit

    def take(self, size: int = PAGE_SIZE) -> int:
        addr = (self.next + size - 1) & ~(size - 1)
        if addr + size > self.limit:
            raise ScenarioError("scenario memory window exhausted")
        self.next = addr + size
        # Pages are zeroed because an IOMMU reads every entry a walk touches: stale
        # bytes from an earlier run would be live entries.
        self.mem.memset(addr, size, 0)
        return addr


def pte(address: int, flags: int) -> int:
    return (address >> 12) << PPN_SHIFT | flags


def atp(mode: int, root: int) -> int:
    """iosatp / iohgatp: MODE in 63:60, PPN in 43:0 (PSCID/GSCID left 0)."""
    return mode << ATP_MODE_SHIFT | (root >> 12) & PPN_MASK


class PageTable:
    """A Sv39 first-stage or Sv39x4 G-stage table tree under construction (§5.1).

    `pointer` turns the system address of a page into what the tables store: the
    identity, except for a nested first stage, whose tables hold guest-physical
    addresses.
    """

    def __init__(self, mem: QTestLike, pages: PageAllocator, root_vpn_bits: int,
                 pointer: Callable[[int], int] = lambda a: a):
        self.mem, self.pages, self.pointer = mem, pages, pointer
        self.root_vpn_bits = root_vpn_bits
        # The Sv39x4 root is 16 KiB (two more index bits) and aligned to its size.
        self.root = pages.take(PAGE_SIZE << (root_vpn_bits - 9))
        self.table_pages = [self.root]
        self._children: dict[tuple[int, int], int] = {}

    def vpn(self, address: int, level: int) -> int:
        width = self.root_vpn_bits if level == 2 else 9
        return (address >> (12 + 9 * level)) & ((1 << width) - 1)

    def map_page(self, address: int, target: int, leaf_flags: int) -> int:
        """Map one 4 KiB page; returns the address of its leaf PTE."""
        table = self.root
        for level in (2, 1):
            table = self._child(table, self.vpn(address, level))
        leaf = table + PTE_SIZE * self.vpn(address, 0)
        self.mem.writeq(leaf, pte(self.pointer(target), leaf_flags))
        return leaf

    def _child(self, table: int, index: int) -> int:
        child = self._children.get((table, index))
        if child is None:
            child = self.pages.take()
            self.table_pages.append(child)
            self._children[table, index] = child
            # Non-leaf PTEs carry V only: A, D, U set on a non-leaf are a page fault.
            self.mem.writeq(table + PTE_SIZE * index, pte(self.pointer(child), PTE_V))
        return child


# -- device directory ----------------------------------------------------------------------
def ddi_widths(extended_dc: bool) -> tuple[int, int, int]:
    """Bits of device_id indexing DDT levels 0, 1, 2 (§3, table of DDI slices)."""
    return (6, 9, 9) if extended_dc else (7, 9, 8)


def build_ddt(mem: QTestLike, pages: PageAllocator, device_id: int, levels: int,
              extended_dc: bool) -> tuple[int, int]:
    """A 1/2/3-level DDT reaching `device_id`; returns (root, address of its DC)."""
    widths = ddi_widths(extended_dc)
    if device_id >> sum(widths[:levels]):
        raise ScenarioError(f"device_id {device_id:#x} needs more than {levels} DDT level(s)")
    shifts = (0, widths[0], widths[0] + widths[1])
    root = table = pages.take()
    for level in range(levels - 1, 0, -1):
        ddi = (device_id >> shifts[level]) & ((1 << widths[level]) - 1)
        child = pages.take()
        mem.writeq(table + PTE_SIZE * ddi, pte(child, PTE_V))
        table = child
    dc_size = 64 if extended_dc else 32
    return root, table + dc_size * (device_id & ((1 << widths[0]) - 1))


def write_device_context(mem: QTestLike, address: int, dc: list[int]) -> None:
    # tc (which holds V) goes last, so an IOMMU already walking this DDT never sees a
    # valid context with half-written translation pointers.
    for index in range(len(dc) - 1, -1, -1):
        mem.writeq(address + 8 * index, dc[index])


# -- the tables of one scenario ------------------------------------------------------------
def leaf_flags(user: bool) -> int:
    # Requests without a PASID are U-mode (§5.1): first-stage leaves need U=1, and the
    # G-stage treats every access as user, so its leaves need U=1 as well.
    return PTE_V | PTE_R | PTE_W | PTE_A | PTE_D | (PTE_U if user else 0)


def build_translation(mem: QTestLike, pages: PageAllocator, device_id: int, stages: Stages,
                      iova: int, extended_dc: bool, memory: ScenarioMemory = ScenarioMemory(),
                      ddt_levels: int = 1, user_leaves: bool = True) -> Tables:
    """Write DDT, device context and page tables sending `iova` of `device_id` to RAM."""
    ddt_root, dc_address = build_ddt(mem, pages, device_id, ddt_levels, extended_dc)
    data_page = pages.take()
    tables = Tables(ddt_root, dc_address, [], data_page,
                    expected_address=data_page + (iova & (PAGE_SIZE - 1)))
    iosatp, iohgatp = 0, 0
    flags = leaf_flags(user_leaves)
    if stages is Stages.BARE:
        tables.expected_address = iova
    if stages is Stages.FIRST_STAGE:
        first = PageTable(mem, pages, 9)
        tables.leaf_pte = first.map_page(iova, data_page, flags)
        iosatp, tables.first_stage_pages = atp(ATP_MODE_SV39, first.root), first.table_pages
    if stages is Stages.G_STAGE:
        second = PageTable(mem, pages, 11)
        tables.leaf_pte = second.map_page(iova, data_page, flags)
        iohgatp, tables.g_stage_pages = atp(ATP_MODE_SV39X4, second.root), second.table_pages
    if stages is Stages.NESTED:
        iosatp, iohgatp = build_nested(mem, pages, iova, data_page, memory, flags, tables)
    tables.dc = [TC_V, iohgatp, 0, iosatp] + ([0, 0, 0, 0] if extended_dc else [])
    write_device_context(mem, dc_address, tables.dc)
    return tables


def build_nested(mem: QTestLike, pages: PageAllocator, iova: int, data_page: int,
                 memory: ScenarioMemory, flags: int, tables: Tables) -> tuple[int, int]:
    """First stage in guest-physical terms; the G-stage maps each of its pages back."""
    def gpa(spa: int) -> int:
        return spa - memory.guest_offset

    first = PageTable(mem, pages, 9, pointer=gpa)
    tables.leaf_pte, tables.pointer = first.map_page(iova, data_page, flags), gpa
    second = PageTable(mem, pages, 11)
    # The IOMMU reads first-stage tables through the G-stage (implicit accesses), so
    # every table page needs a G-stage mapping, not just the data page.
    for page in [*first.table_pages, data_page]:
        second.map_page(gpa(page), page, flags)
    tables.first_stage_pages, tables.g_stage_pages = first.table_pages, second.table_pages
    return atp(ATP_MODE_SV39, gpa(first.root)), atp(ATP_MODE_SV39X4, second.root)


# -- IOMMU registers -----------------------------------------------------------------------
def poll(qt: QTestLike, read: Callable[[], int], done: Callable[[int], bool], what: str) -> int:
    """Read until `done`; virtual time advances too, for IOMMUs that act on timers."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what}: still {value:#x} after {POLL_SECONDS}s")
        qt.clock_step(100)


def check_capabilities(qt: QTestLike, base: int, stages: Stages) -> int:
    caps = qt.readq(base + CAPABILITIES)
    if stages.first_stage and not caps & CAP_SV39:
        raise ScenarioError(f"capabilities {caps:#x} lack Sv39")
    if stages.g_stage and not caps & CAP_SV39X4:
        raise ScenarioError(f"capabilities {caps:#x} lack Sv39x4")
    return caps


def require_reset_state(qt: QTestLike, base: int) -> None:
    # fctl and queue bases may only change while the IOMMU is Off and the queues are
    # off (§2.2, §2.4); the scenario does not tear down an earlier configuration.
    mode = qt.readq(base + DDTP) & DDTP_MODE_MASK
    if mode not in (IOMMU_MODE_OFF, IOMMU_MODE_BARE):
        raise ScenarioError(f"ddtp.iommu_mode is {mode}: IOMMU not fresh from reset")
    if qt.readl(base + CQCSR) & CQON or qt.readl(base + FQCSR) & FQON:
        raise ScenarioError("a queue is already on: IOMMU not fresh from reset")


def program_fctl(qt: QTestLike, base: int, caps: int) -> None:
    """Little-endian structures, 64-bit G-stage encodings, and the supported interrupts."""
    fctl = qt.readl(base + FCTL)
    wanted = fctl & ~(FCTL_BE | FCTL_WSI | FCTL_GXL)
    if (caps >> CAP_IGS_SHIFT) & 3 == IGS_WSI:
        wanted |= FCTL_WSI
    if wanted != fctl:
        qt.writel(base + FCTL, wanted)
    got = qt.readl(base + FCTL)
    if got & (FCTL_BE | FCTL_GXL):
        raise ScenarioError(f"fctl reads {got:#x}: BE or GXL stuck at 1")


def enable_queue(qt: QTestLike, base: int, qb: int, index: int, csr: int, on: int,
                 address: int) -> None:
    """Point a queue at `address`, zero the software-owned index, set en, wait for on."""
    qt.writeq(base + qb, (address >> 12) << PPN_SHIFT | (QUEUE_LOG2SZ - 1))
    qt.writel(base + index, 0)
    qt.writel(base + csr, 1)  # cqen / fqen
    poll(qt, lambda: qt.readl(base + csr), lambda v: bool(v & on), f"csr {csr:#x} on")


def enable_ddt(qt: QTestLike, base: int, ddt_root: int, levels: int) -> None:
    ddtp = (ddt_root >> 12) << PPN_SHIFT | IOMMU_MODE_LVL[levels]
    qt.writeq(base + DDTP, ddtp)
    value = poll(qt, lambda: qt.readq(base + DDTP), lambda v: not v & DDTP_BUSY, "ddtp.busy")
    keep = (PPN_MASK << PPN_SHIFT) | DDTP_MODE_MASK
    if value & keep != ddtp & keep:
        raise ScenarioError(f"ddtp wrote {ddtp:#x}, reads {value:#x}")


def drain_fault_queue(qt: QTestLike, base: int, fq_address: int) -> list[FaultRecord]:
    """Decode the records between fqh and fqt, then hand them back by moving fqh."""
    entries = 1 << QUEUE_LOG2SZ
    head, tail = qt.readl(base + FQH), qt.readl(base + FQT)
    records = []
    while head != tail:
        records.append(FaultRecord.decode(qt.memread(fq_address + FQ_ENTRY * head, FQ_ENTRY)))
        head = (head + 1) % entries
    qt.writel(base + FQH, head)
    return records


# -- commands (§4.1) -----------------------------------------------------------------------
def iotinval_vma(*, address: int | None = None, pscid: int | None = None,
                 gscid: int | None = None) -> tuple[int, int]:
    """IOTINVAL.VMA: AV/PSCV/GV set by giving the address / PSCID / GSCID to match."""
    dw0 = OPCODE_IOTINVAL | FUNC3_VMA << 7
    dw1 = 0
    if address is not None:
        dw0 |= CMD_AV
        dw1 = (address >> 12) << 10
    if pscid is not None:
        dw0 |= pscid << 12 | 1 << 32
    if gscid is not None:
        dw0 |= 1 << 33 | gscid << 44
    return dw0, dw1


def iofence_c(*, address: int | None = None, data: int = 0) -> tuple[int, int]:
    """IOFENCE.C; with an address the IOMMU writes the 32-bit `data` there (AV=1)."""
    dw0 = OPCODE_IOFENCE | FUNC3_C << 7 | (data & 0xFFFF_FFFF) << 32
    if address is None:
        return dw0, 0
    if address & 3:
        raise ScenarioError(f"IOFENCE.C address {address:#x} is not 4-byte aligned")
    return dw0 | CMD_AV, address >> 2


# -- a driver's session with one IOMMU -----------------------------------------------------
class Driver:
    """What a driver keeps for one IOMMU: capabilities, its queues, and its page pool.

    `start` brings a fresh IOMMU to the point where only the DDT is missing; `submit`
    feeds commands through the command queue and waits for cqh to pass them, as Linux's
    riscv-iommu driver does.
    """

    def __init__(self, qt: QTestLike, base: int, memory: ScenarioMemory = ScenarioMemory()):
        self.qt, self.base, self.memory = qt, base, memory
        self.pages = PageAllocator(qt, memory.base, memory.limit)
        self.caps = 0
        self.cq_address = self.fq_address = 0
        self.cq_tail = 0

    def start(self, stages: Stages) -> Driver:
        self.caps = check_capabilities(self.qt, self.base, stages)
        require_reset_state(self.qt, self.base)
        self.cq_address, self.fq_address = self.pages.take(), self.pages.take()
        program_fctl(self.qt, self.base, self.caps)
        enable_queue(self.qt, self.base, CQB, CQT, CQCSR, CQON, self.cq_address)
        enable_queue(self.qt, self.base, FQB, FQH, FQCSR, FQON, self.fq_address)
        return self

    @property
    def extended_dc(self) -> bool:
        return bool(self.caps & CAP_MSI_FLAT)

    def submit(self, *commands: tuple[int, int]) -> int:
        """Queue `commands`, ring cqt, wait until cqh passes them; returns cqcsr."""
        entries = 1 << QUEUE_LOG2SZ
        for dw0, dw1 in commands:
            entry = self.cq_address + CQ_ENTRY * self.cq_tail
            self.qt.writeq(entry, dw0)
            self.qt.writeq(entry + 8, dw1)
            self.cq_tail = (self.cq_tail + 1) % entries
        self.qt.writel(self.base + CQT, self.cq_tail)
        poll(self.qt, lambda: self.qt.readl(self.base + CQH),
             lambda head: head == self.cq_tail or bool(self.cqcsr() & CQ_ERRORS), "cqh")
        return self.cqcsr()

    def cqcsr(self) -> int:
        return self.qt.readl(self.base + CQCSR)

    def faults(self) -> list[FaultRecord]:
        return drain_fault_queue(self.qt, self.base, self.fq_address)

    def fqcsr(self) -> int:
        return self.qt.readl(self.base + FQCSR)


# -- the endpoint --------------------------------------------------------------------------
def testdev_dma(qt: QTestLike, bar: int, iova: int, check_address: int, length: int,
                ctrl: int = 0) -> int:
    """One iommu-testdev DMA to `iova`; returns DMA_RESULT.

    By default a write of the pattern, which the device reads back at `check_address`
    without translation and reports a mismatch: the result code is a second,
    independent check of where the data went. `ctrl` (ours only) picks another
    direction, e.g. CTRL_READ.
    """
    registers = [(DMA_GVA_LO, iova), (DMA_GVA_HI, iova >> 32),
                 (DMA_GPA_LO, check_address), (DMA_GPA_HI, check_address >> 32),
                 (DMA_LEN, length), (DMA_ATTRS, 0)]
    if ctrl:
        registers.append((DMA_CTRL, ctrl))
    for reg, value in [*registers, (DMA_DBELL, DMA_DBELL_ARM)]:
        qt.writel(bar + reg, value & 0xFFFF_FFFF)
    qt.readl(bar + DMA_TRIGGERING)
    return poll(qt, lambda: qt.readl(bar + DMA_RESULT), lambda v: v != DMA_RESULT_BUSY,
                "testdev DMA_RESULT")


# -- faults a scenario can plant -----------------------------------------------------------
class Breakage(enum.Enum):
    """What the driver gets wrong before the DMA (applied after the tables are built)."""

    LEAF_NOT_VALID = "unmapped-iova"   # the IOVA's leaf PTE has V=0
    DC_NOT_VALID = "dc-v0"             # the device context has tc.V=0

    def apply(self, qt: QTestLike, tables: Tables) -> None:
        if self is Breakage.LEAF_NOT_VALID:
            if tables.leaf_pte is None:
                raise ScenarioError("Bare stages have no leaf PTE to invalidate")
            qt.writeq(tables.leaf_pte, 0)
        else:
            tables.dc[0] &= ~TC_V
            qt.writeq(tables.dc_address, tables.dc[0])


# -- one scenario, end to end --------------------------------------------------------------
def run_translation_scenario(qt: QTestLike, iommu_base: int, testdev_bar: int,
                             requester_id: int, stages: Stages, *, iova: int = SCENARIO_IOVA,
                             length: int = 4, memory: ScenarioMemory = ScenarioMemory(),
                             ddt_levels: int = 1, user_leaves: bool = True,
                             breakage: Breakage | None = None, ctrl: int = 0) -> ScenarioResult:
    """Configure a fresh IOMMU for `stages`, let the testdev DMA to `iova`, report.

    With a `breakage` the tables are damaged before the IOMMU is enabled, so the DMA
    faults; `ctrl` selects another testdev direction (ours only).
    """
    driver = Driver(qt, iommu_base, memory).start(stages)
    tables = build_translation(qt, driver.pages, requester_id, stages, iova,
                               driver.extended_dc, memory, ddt_levels, user_leaves)
    if breakage is not None:
        breakage.apply(qt, tables)
    enable_ddt(qt, iommu_base, tables.ddt_root, ddt_levels)
    qt.memset(tables.expected_address, length, 0)
    qt.memset(iova, length, 0)
    code = testdev_dma(qt, testdev_bar, iova, tables.expected_address, length, ctrl)
    return ScenarioResult(stages=stages, capabilities=driver.caps, dma_result=code, iova=iova,
                          expected_address=tables.expected_address,
                          found=qt.memread(tables.expected_address, length),
                          at_iova=qt.memread(iova, length),
                          faults=driver.faults(), fqcsr=driver.fqcsr(), tables=tables)


# -- a leaf PTE changed under a cached translation ------------------------------------------
FENCE_DATA = 0x600D_F00D


@dataclass
class Landing:
    """One DMA of the retarget scenario: its result and what pages A and B hold after."""

    dma_result: int
    at_a: bytes
    at_b: bytes

    @property
    def target(self) -> str:
        """'A', 'B', 'none' or 'both': where the pattern landed."""
        data = pattern(len(self.at_a))
        hits = [name for name, got in (("A", self.at_a), ("B", self.at_b)) if got == data]
        return "both" if len(hits) == 2 else hits[0] if hits else "none"


@dataclass
class RetargetResult:
    """Map IOVA→A, DMA; retarget the leaf to B; DMA; IOTINVAL.VMA + IOFENCE.C; DMA."""

    page_a: int
    page_b: int
    first: Landing              # fills the IOMMU's caches
    without_inval: Landing      # after the PTE store, before any invalidation
    after_inval: Landing        # after IOTINVAL.VMA and IOFENCE.C completed
    cqcsr: int
    fence_marker: int           # what IOFENCE.C (AV=1) wrote at its address
    faults: list[FaultRecord]
    tables: Tables


def run_retarget_scenario(qt: QTestLike, iommu_base: int, testdev_bar: int,
                          requester_id: int, stages: Stages = Stages.FIRST_STAGE, *,
                          iova: int = SCENARIO_IOVA, length: int = 4,
                          memory: ScenarioMemory = ScenarioMemory()) -> RetargetResult:
    """Change a live leaf PTE from page A to page B; DMA before and after invalidating.

    The spec (§3.3.6 caching) lets the IOMMU use the old or the new PTE until an
    IOTINVAL.VMA covering the IOVA completes (IOFENCE.C), and nothing else.
    The invalidation names the IOVA (AV=1) in all host address spaces (GV=0, PSCV=0),
    as a driver does after editing one first-stage leaf.
    """
    if not stages.first_stage or stages.g_stage:
        raise ScenarioError("the retarget scenario edits a host first-stage leaf (S-stage only)")
    driver = Driver(qt, iommu_base, memory).start(stages)
    tables = build_translation(qt, driver.pages, requester_id, stages, iova,
                               driver.extended_dc, memory)
    page_a, page_b, marker = tables.data_page, driver.pages.take(), driver.pages.take()
    offset = iova & (PAGE_SIZE - 1)
    enable_ddt(qt, iommu_base, tables.ddt_root, 1)

    def dma(check_page: int) -> Landing:
        qt.memset(page_a + offset, length, 0)
        qt.memset(page_b + offset, length, 0)
        code = testdev_dma(qt, testdev_bar, iova, check_page + offset, length)
        return Landing(code, qt.memread(page_a + offset, length),
                       qt.memread(page_b + offset, length))

    first = dma(page_a)
    # One 64-bit store, as the spec requires for updating a valid entry.
    qt.writeq(tables.leaf_pte, pte(tables.pointer(page_b), leaf_flags(True)))
    without_inval = dma(page_a)
    cqcsr = driver.submit(iotinval_vma(address=iova),
                          iofence_c(address=marker, data=FENCE_DATA))
    after_inval = dma(page_b)
    return RetargetResult(page_a, page_b, first, without_inval, after_inval, cqcsr,
                          int.from_bytes(qt.memread(marker, 4), "little"), driver.faults(),
                          tables)


# -- a device context changed under the IOMMU's cache (the invalidation checker's cases) --
OPCODE_IODIR, FUNC3_INVAL_DDT = 3, 0
CMD_DV = 1 << 33


def iodir_inval_ddt(device_id: int | None = None) -> tuple[int, int]:
    """IODIR.INVAL_DDT: one device's context (DV=1, DID in 63:40), or all (DV=0)."""
    dw0 = OPCODE_IODIR | FUNC3_INVAL_DDT << 7
    if device_id is not None:
        dw0 |= CMD_DV | device_id << 40
    return dw0, 0


@dataclass
class ContextChangeResult:
    """DMA; change the device context in place; DMA without, then with, IODIR.INVAL_DDT
    (+ IOTINVAL.VMA + IOFENCE.C). `first` is None when the first DMA was meant to fault."""

    page_a: int
    page_b: int
    first: Landing
    without_inval: Landing
    after_inval: Landing
    cqcsr: int
    faults: list[FaultRecord]
    tables: Tables


def run_context_change_scenario(qt: QTestLike, iommu_base: int, testdev_bar: int,
                                requester_id: int, *, made_valid: bool = False,
                                iova: int = SCENARIO_IOVA, length: int = 4,
                                memory: ScenarioMemory = ScenarioMemory()
                                ) -> ContextChangeResult:
    """Two cases of a device context changed while the IOMMU may have it cached.

    `made_valid=False`: the first-stage root of a valid context moves from a table that
    maps `iova` to page A to one that maps it to page B (a driver switching the device
    to another domain). `made_valid=True`: the context starts with V=0 (the first DMA
    faults, cause 258) and is then made valid, mapping `iova` to page B. The spec
    (§4.1, IODIR) requires IODIR.INVAL_DDT after a valid context changes; after V=0→1
    it does not (V=0 contexts may not be cached), but an IOMMU that caches them (our
    negative=on) needs it. In both cases the driver then sends IODIR.INVAL_DDT for the
    device, IOTINVAL.VMA (all host address spaces) and IOFENCE.C.
    """
    driver = Driver(qt, iommu_base, memory).start(Stages.FIRST_STAGE)
    tables = build_translation(qt, driver.pages, requester_id, Stages.FIRST_STAGE, iova,
                               driver.extended_dc, memory)
    page_a, page_b = tables.data_page, driver.pages.take()
    other = PageTable(qt, driver.pages, 9)
    other.map_page(iova, page_b, leaf_flags(True))
    new_dc = list(tables.dc)
    new_dc[3] = atp(ATP_MODE_SV39, other.root)
    if made_valid:
        tables.dc[0] &= ~TC_V
        qt.writeq(tables.dc_address, tables.dc[0])
    enable_ddt(qt, iommu_base, tables.ddt_root, 1)
    offset = iova & (PAGE_SIZE - 1)

    def dma(check_page: int) -> Landing:
        qt.memset(page_a + offset, length, 0)
        qt.memset(page_b + offset, length, 0)
        code = testdev_dma(qt, testdev_bar, iova, check_page + offset, length)
        return Landing(code, qt.memread(page_a + offset, length),
                       qt.memread(page_b + offset, length))

    first = dma(page_a)
    write_device_context(qt, tables.dc_address, new_dc)
    without_inval = dma(page_b)
    cqcsr = driver.submit(iodir_inval_ddt(requester_id), iotinval_vma(), iofence_c())
    after_inval = dma(page_b)
    tables.dc = new_dc
    return ContextChangeResult(page_a, page_b, first, without_inval, after_inval, cqcsr,
                               driver.faults(), tables)
