"""First-stage and G-stage page walks (spec v1.0.1 §3.3.4-§3.3.5; Privileged spec
Sv32/Sv39/Sv48/Sv57 and Sv32x4/Sv39x4/Sv48x4/Sv57x4, Svnapot, Svpbmt).

`walk` is the one radix-tree walker; a `PagingMode` says how wide each level is and
whether the root is the 2-bit-widened G-stage root. The caller supplies how a PTE is
loaded and compare-and-swapped (directly, or through the G-stage as an implicit access
for a nested first stage), what raises the stage's fault, and the leaf permission rule.
PTEs are decoded with integer shifts (the construct layouts in `layouts.py` are the
reference; a unit test proves agreement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vfiouser_iommu.iommu.request import Access

PTE_V, PTE_R, PTE_W, PTE_X, PTE_U, PTE_G, PTE_A, PTE_D = (1 << n for n in range(8))
PTE_PERMS = PTE_R | PTE_W | PTE_X
PPN_MASK = (1 << 44) - 1
_RESERVED_RV64 = 0x7F << 54
_NAPOT_64K = 0b1000


@dataclass(frozen=True, slots=True)
class PagingMode:
    """Shape of one translation mode."""

    name: str
    levels: int
    pte_size: int
    vpn_bits: int
    va_bits: int     # width of the input address
    widen: int = 0   # extra index bits of the root (G-stage x4 modes)

    @property
    def sv32(self) -> bool:
        return self.pte_size == 4


SV32 = PagingMode("Sv32", 2, 4, 10, 32)
SV39 = PagingMode("Sv39", 3, 8, 9, 39)
SV48 = PagingMode("Sv48", 4, 8, 9, 48)
SV57 = PagingMode("Sv57", 5, 8, 9, 57)
SV32X4 = PagingMode("Sv32x4", 2, 4, 10, 34, 2)
SV39X4 = PagingMode("Sv39x4", 3, 8, 9, 41, 2)
SV48X4 = PagingMode("Sv48x4", 4, 8, 9, 50, 2)
SV57X4 = PagingMode("Sv57x4", 5, 8, 9, 59, 2)

#: (SXL, iosatp.MODE) -> first-stage mode
FIRST_STAGE_MODES = {(False, 8): SV39, (False, 9): SV48, (False, 10): SV57, (True, 8): SV32}
#: (fctl.GXL, iohgatp.MODE) -> G-stage mode
G_STAGE_MODES = {(False, 8): SV39X4, (False, 9): SV48X4, (False, 10): SV57X4,
                 (True, 8): SV32X4}


@dataclass(frozen=True, slots=True)
class Leaf:
    """A leaf found by a walk: the naturally aligned region [va_base, va_base+size)."""

    out_base: int
    size: int
    flags: int       # PTE bits 7:0 (V R W X U G A D), with G accumulated over the walk
    pbmt: int

    def output(self, va: int) -> int:
        return self.out_base | (va & (self.size - 1))


def decode_pte(pte: int, sv32: bool) -> tuple[int, int, int, int, int]:
    """(flags, ppn, reserved, pbmt, n) of a PTE."""
    if sv32:
        return pte & 0xFF, pte >> 10 & 0x3FFFFF, 0, 0, 0
    return pte & 0xFF, pte >> 10 & PPN_MASK, pte & _RESERVED_RV64, pte >> 61 & 3, pte >> 63


def input_in_range(mode: PagingMode, va: int, sign_extended: bool) -> bool:
    """First stage: IOVA canonical (SXL=0) or zero-extended (Sv32); G-stage: GPA width."""
    if sign_extended:
        top = va >> (mode.va_bits - 1)
        return top == 0 or top == (1 << (64 - mode.va_bits + 1)) - 1
    return va >> mode.va_bits == 0


def permits(flags: int, access: Access) -> bool:
    if access is Access.READ:
        return bool(flags & PTE_R)
    if access is Access.WRITE:
        return bool(flags & PTE_W)
    return bool(flags & PTE_X)


def first_stage_permits(flags: int, access: Access, privileged: bool, sum_: bool) -> bool:
    """R/W/X plus the U/SUM rules of the first stage (§3.3.4, Priv spec)."""
    if not permits(flags, access):
        return False
    if not privileged:
        return bool(flags & PTE_U)
    if flags & PTE_U:
        return access is not Access.EXECUTE and sum_
    return True


def g_stage_permits(flags: int, access: Access) -> bool:
    """G-stage leaves are checked as user accesses: U must be 1."""
    return bool(flags & PTE_U) and permits(flags, access)


def needs_ad_update(flags: int, write: bool) -> bool:
    return not flags & PTE_A or (write and not flags & PTE_D)


# Why a walk stops (the `why` passed to `fail`, and a recorded step's decision).
INVALID = "V=0"
W_WITHOUT_R = "W=1 with R=0 (reserved encoding)"
RESERVED_BITS = "reserved bits 60:54 set"
BAD_PBMT = "PBMT set without Svpbmt, or reserved PBMT=3"
BAD_NON_LEAF = "non-leaf PTE with A, D, U, PBMT or N set"
NO_LEAF = "pointer to a next level at level 0"
BAD_NAPOT = "N=1 other than a 64 KiB NAPOT leaf at level 0"
MISALIGNED = "misaligned superpage (PPN bits below the level not zero)"
DENIED = "permission denied"
NO_AD = "A or D clear and hardware A/D update off (ADE=0)"
#: Decisions of the steps that do not stop the walk.
NEXT, LEAF = "pointer to next level", "leaf"


def _bad_pte(flags: int, reserved: int, pbmt: int, n: int, svpbmt: bool) -> str | None:
    if not flags & PTE_V:
        return INVALID
    if flags & PTE_W and not flags & PTE_R:
        return W_WITHOUT_R
    if reserved:
        return RESERVED_BITS
    return BAD_PBMT if pbmt and (not svpbmt or pbmt == 3) else None


def _bad_non_leaf(flags: int, pbmt: int, n: int) -> bool:
    return bool(flags & (PTE_A | PTE_D | PTE_U) or pbmt or n)


#: `record(level, address, pte, decision)`: told each PTE a walk reads and what it decided.
Record = Callable[[int, int, int, str], None]


def walk(mode: PagingMode, root: int, va: int, *, load: Callable[[int], int],
         store: Callable[[int, int, int], int], fail: Callable[[str, int], None],
         permitted: Callable[[int], bool], ade: bool, write: bool, svpbmt: bool,
         record: Record | None = None) -> Leaf:
    """Walk from `root` (a byte address) for `va`; return the leaf or call `fail(why,
    level)`.

    `load(addr)` reads a PTE, `store(addr, old, new)` compare-and-swaps one and returns
    the value found. A/D are set by `store` when `ade`, otherwise missing A/D fails. A
    PTE that changed under the update restarts the walk, as the spec requires. `why` is
    one of the reasons above and `level` the level of the PTE that stopped the walk.
    `record`, when given, sees every PTE read and the decision taken on it (the walk
    explainer and the invalidation checker use it; docs/introspection.md).
    """
    while True:
        leaf = _walk_once(mode, root, va, load, store, fail, permitted, ade, write, svpbmt,
                          record)
        if leaf is not None:
            return leaf


def _stop(fail, record, level: int, addr: int, pte: int, why: str) -> None:
    if record is not None:
        record(level, addr, pte, why)
    fail(why, level)


def _walk_once(mode, root, va, load, store, fail, permitted, ade, write, svpbmt, record):
    a = root
    g = 0
    vpn_bits, sv32 = mode.vpn_bits, mode.sv32
    for i in range(mode.levels - 1, -1, -1):
        width = vpn_bits + (mode.widen if i == mode.levels - 1 else 0)
        addr = a + (va >> (12 + i * vpn_bits) & ((1 << width) - 1)) * mode.pte_size
        pte = load(addr)
        flags, ppn, reserved, pbmt, n = decode_pte(pte, sv32)
        why = _bad_pte(flags, reserved, pbmt, n, svpbmt)
        if why is not None:
            _stop(fail, record, i, addr, pte, why)
        g |= flags & PTE_G
        if not flags & PTE_PERMS:
            if i == 0:
                _stop(fail, record, i, addr, pte, NO_LEAF)
            if _bad_non_leaf(flags, pbmt, n):
                _stop(fail, record, i, addr, pte, BAD_NON_LEAF)
            if record is not None:
                record(i, addr, pte, NEXT)
            a = ppn << 12
            continue
        size = 1 << (12 + i * vpn_bits)
        if n:
            if i != 0 or ppn & 0xF != _NAPOT_64K:
                _stop(fail, record, i, addr, pte, BAD_NAPOT)
            size = 1 << 16
        elif ppn & ((1 << (i * vpn_bits)) - 1):
            _stop(fail, record, i, addr, pte, MISALIGNED)
        if not permitted(flags):
            _stop(fail, record, i, addr, pte, DENIED)
        if needs_ad_update(flags, write):
            if not ade:
                _stop(fail, record, i, addr, pte, NO_AD)
            new = pte | PTE_A | (PTE_D if write else 0)
            if store(addr, pte, new) != pte:
                return None
            flags |= PTE_A | (PTE_D if write else 0)
            pte = new
        if record is not None:
            record(i, addr, pte, LEAF)
        return Leaf((ppn << 12) & ~(size - 1), size, flags | g, pbmt)
    fail(NO_LEAF, 0)
    return None
