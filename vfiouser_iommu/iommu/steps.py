"""What a translation read from guest memory, step by step (spec v1.0.1 §3.3 process).

The real walks (`walk.walk`, `directory.locate_device_context` /
`locate_process_context`, `msi._fetch_msi_pte`) take an optional recorder and tell it
every table entry they read and what they decided on it. Two users:

- the side-effect-free `walk` of the control socket and the walk explainer in the log
  (`probe.py`), which show the steps;
- the invalidation checker (`checker.py`), which keeps the steps a cached entry was
  built from (its `Source`) and re-reads them when the entry is used.

A `Step` names the structure, the level, the system-physical address read (and the
guest-physical one when the entry was reached through the G-stage), the raw value and
the decision. Nothing here changes what a translation does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# Structures, named as the spec names them.
DDTE = "DDT entry"                 # non-leaf DDT entry
DC = "device context"
PDTE = "PDT entry"                 # non-leaf PDT entry
PC = "process context"
FS_PTE = "first-stage PTE"
GS_PTE = "G-stage PTE"
MSI_PTE = "MSI PTE"

#: Decisions of directory steps that do not stop the walk.
VALID = "valid"


@dataclass(frozen=True, slots=True)
class Step:
    """One table entry a translation read."""

    structure: str
    level: int                       # table level (0 = leaf level); DC/PC/MSI PTE: 0
    address: int                     # system-physical address of the entry
    value: int | tuple[int, ...]     # raw value (several doublewords for DC/PC/MSI PTE)
    decision: str                    # walk.NEXT / walk.LEAF / VALID, or why it stopped
    size: int = 8                    # bytes per word (4 for Sv32 PTEs)
    big_endian: bool = False
    gpa: int | None = None           # the entry's guest-physical address, if translated
    input: int | None = None         # the address being translated (PTE steps)

    @property
    def words(self) -> tuple[int, ...]:
        return self.value if isinstance(self.value, tuple) else (self.value,)

    def raw_bytes(self) -> bytes:
        """The bytes the step read, as they lie in memory."""
        order = "big" if self.big_endian else "little"
        return b"".join(w.to_bytes(self.size, order) for w in self.words)


@dataclass(frozen=True, slots=True)
class Roots:
    """The context an IOTLB entry was filled in: which tables its walk started from."""

    device_id: int
    process_id: int | None
    fs_root: int | None
    gs_root: int | None
    pscid: int | None
    gscid: int | None


@dataclass(frozen=True, slots=True)
class Source:
    """What a cached entry was built from: fill order, steps, and (IOTLB) roots.

    `snapshot` holds (address, bytes) of every step, so that checking an entry on each
    use is one memory read and one comparison per step while nothing changed.
    """

    seq: int
    steps: tuple[Step, ...]
    roots: Roots | None = None
    snapshot: tuple[tuple[int, bytes], ...] = ()


class StepRecorder:
    """Collects the steps of the walks in progress.

    A fill site calls `restart()` (top-level walk) or `mark()` (a nested one, e.g. a
    G-stage walk inside a first-stage walk) and later `source(mark)` for the steps read
    since. `seq` numbers fills and invalidations in one sequence, so the checker can
    tell which invalidations came after an entry was filled.
    """

    def __init__(self, seq: itertools.count | None = None) -> None:
        self.steps: list[Step] = []
        self.seq = seq if seq is not None else itertools.count(1)
        self._g_leaf: tuple[int, int, int] | None = None  # (gpa base, size, spa base)

    # -- marks ----------------------------------------------------------------------------
    def restart(self) -> int:
        self.steps.clear()
        self._g_leaf = None
        return 0

    def mark(self) -> int:
        return len(self.steps)

    def source(self, mark: int, ctx=None) -> Source:
        roots = None
        if ctx is not None:
            request = ctx.request
            roots = Roots(request.device_id, ctx.process_id,
                          ctx.fs_root if ctx.fs_mode is not None else None,
                          ctx.gs_root if ctx.gs_mode is not None else None,
                          ctx.pscid, ctx.gscid)
        taken = tuple(self.steps[mark:])
        return Source(next(self.seq), taken, roots,
                      tuple((step.address, step.raw_bytes()) for step in taken))

    # -- steps ----------------------------------------------------------------------------
    def step(self, structure: str, level: int, address: int, value, decision: str, *,
             size: int = 8, big_endian: bool = False, gpa: int | None = None,
             input: int | None = None) -> None:
        self.steps.append(Step(structure, level, address, value, decision, size,
                               big_endian, gpa, input))

    def first_stage(self, ctx, iova: int, pte_size: int, big_endian: bool):
        """The `record` callback of one first-stage walk (`walk.walk`)."""
        nested = ctx.gs_mode is not None

        def record(level: int, address: int, pte: int, decision: str) -> None:
            spa, gpa = address, None
            if nested:
                spa, gpa = self._spa(address), address
            self.steps.append(Step(FS_PTE, level, spa, pte, decision, pte_size,
                                   big_endian, gpa, iova))
        return record

    def g_stage(self, ctx, gpa: int, pte_size: int, big_endian: bool):
        """The `record` callback of one G-stage walk."""
        def record(level: int, address: int, pte: int, decision: str) -> None:
            self.steps.append(Step(GS_PTE, level, address, pte, decision, pte_size,
                                   big_endian, None, gpa))
        return record

    def g_leaf(self, gpa: int, leaf, cached: Source | None) -> None:
        """A G-stage translation of `gpa` finished (walked, or `cached` from the G-stage
        cache, whose steps then join this walk's: the entry being filled depends on
        them too)."""
        if cached is not None:
            self.steps.extend(cached.steps)
        base = gpa & ~(leaf.size - 1)
        self._g_leaf = (base, leaf.size, leaf.out_base)

    def _spa(self, gpa: int) -> int:
        """The system address of a first-stage table entry at `gpa`: the G-stage
        translation just made for it (the walk translates each entry before reading)."""
        if self._g_leaf is not None:
            base, size, out = self._g_leaf
            if base <= gpa < base + size:
                return out | (gpa & (size - 1))
        return gpa
