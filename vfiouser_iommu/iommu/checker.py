"""The invalidation checker (`--iommu ...,check=on`): catches a driver using a cached
structure it changed without the invalidation the spec requires (spec v1.0.1 §4.1
commands, §10 caching; the software recipes of the "guidelines for software" chapter).

With the checker on, every walk records the entries it read (`steps.StepRecorder`) and
each cache entry keeps them (its `Source`). Whenever a cached device context, process
context, leaf translation (IOTLB), G-stage leaf or MSI PTE is used, the checker reads
those entries again. Since an entry leaves the cache when an invalidation covers it, a
difference means the driver changed the structure and no covering invalidation ran
since the fill: a **stale use**. The warning names the structure, its address, the old
and new values, the command the spec requires, and the invalidations that ran since the
fill but did not cover it (and why). Warnings go to the log (WARNING), to listeners
(control-socket events, the trace) and to the summary at server stop; each distinct
stale use is reported once and counted after that.

A/D bits that became set are not a change (the IOMMU sets them itself). An IOTLB entry is
also stale when the device or process context in use now has another first-stage or
G-stage root than the walk that filled it (the driver switched tables and invalidated
the directory cache but not the IOTLB). Negative entries (negative=on) are stale when
the entry they cached as V=0 is now valid: a V=0→1 change without invalidation.

The checker never changes a translation: the IOMMU still uses the cached value, exactly
as it would without it. Combine with `cache=max` so that nothing is evicted before it
can be used stale.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vfiouser_iommu.iommu import steps
from vfiouser_iommu.iommu.caches import (
    Lru,
    Tlb,
    TlbEntry,
    gvma_covers,
    iotinval_range,
    vma_covers,
)
from vfiouser_iommu.iommu.directory import BARE, DeviceContext, ProcessContext
from vfiouser_iommu.iommu.regs_layouts import CMD_IODIR, CMD_IOTINVAL, COMMAND
from vfiouser_iommu.iommu.steps import Source, Step, StepRecorder
from vfiouser_iommu.iommu.walk import LEAF, NEXT, PTE_A, PTE_D
from vfiouser_iommu.memory import MemoryAccessError

log = logging.getLogger(__name__)

_AD = PTE_A | PTE_D
_PTE_STRUCTURES = (steps.FS_PTE, steps.GS_PTE)
#: Names of the cached-structure kinds, as the warnings say them.
CACHE_NAMES = {"ddt": "device-context cache", "pdt": "process-context cache",
               "iotlb": "IOTLB", "gtlb": "G-stage cache", "msi": "MSI PTE cache"}
_DC_WORDS = ("tc", "iohgatp", "ta", "fsc", "msiptp", "msi_addr_mask", "msi_addr_pattern",
             "reserved")
_PC_WORDS = ("ta", "fsc")
#: How many distinct stale uses and invalidations are kept for tools.
KEEP = 256


@dataclass
class StaleUse:
    """One distinct stale use (later uses of the same staleness only count)."""

    cache: str                 # "iotlb", "ddt", ...
    structure: str             # steps.DC, steps.FS_PTE, ..., or "roots"
    device_id: int | None
    process_id: int | None
    address: int | None        # system-physical address of the changed structure
    old: tuple[int, ...] | None
    new: tuple[int, ...] | None  # None: no longer readable
    required: str              # the command the spec requires
    what: str                  # which entry was used, for what
    change: str                # the change, decoded
    missed: list[str] = field(default_factory=list)
    negative: bool = False
    level: str = ""            # e.g. " (level 0 leaf)" for page-table entries
    time: float = field(default_factory=time.time)
    count: int = 1

    def message(self) -> str:
        where = "" if self.address is None else f" at {self.address:#x}"
        if self.negative:
            state = (f"is cached as not valid (V=0) but memory now holds a valid one "
                     f"({self.change})")
        else:
            state = f"changed ({self.change}) and is still cached"
        text = (f"stale use of the {CACHE_NAMES[self.cache]}: {self.structure}"
                f"{self.level}{where} {state}; used for {self.what}; "
                f"missing {self.required}")
        if self.missed:
            text += "; since the fill: " + "; ".join(self.missed)
        return text

    def as_dict(self) -> dict:
        return {"cache": self.cache, "structure": self.structure,
                "device_id": self.device_id, "process_id": self.process_id,
                "address": self.address,
                "old": None if self.old is None else list(self.old),
                "new": None if self.new is None else list(self.new),
                "required": self.required, "used_for": self.what, "change": self.change,
                "level": self.level.strip(" ()"),
                "not_covered_by": self.missed, "negative": self.negative,
                "time": self.time, "count": self.count, "message": self.message()}


@dataclass(frozen=True)
class Invalidation:
    """An executed invalidation command, as the checker remembers it."""

    seq: int
    name: str
    fields: dict
    removed: int | None
    index: int

    def text(self) -> str:
        """The command in the operand style of the `required` texts."""
        f = self.fields
        if self.name.startswith("IOTINVAL"):
            parts = ["GV=0" if not f["GV"] else f"GV=1 GSCID={f['GSCID']:#x}"]
            if self.name == "IOTINVAL.VMA":
                parts.append("PSCV=0" if not f["PSCV"] else f"PSCV=1 PSCID={f['PSCID']:#x}")
            parts.append("AV=0" if not f["AV"] else f"AV=1 ADDR={f['ADDR'] << 12:#x}")
        else:
            parts = ["DV=0"] if not f["DV"] else [f"DV=1 DID={f['DID']:#x}"]
            if self.name == "IODIR.INVAL_PDT":
                parts.append(f"PID={f['PID']:#x}")
        return f"{self.name} {' '.join(parts)} (cq[{self.index}])"


def read_step(memory, step: Step) -> tuple[int, ...] | None:
    """What guest memory holds now where `step` was read (None if it is no longer
    mapped RAM: the checker never reads through the fallback, a message to the VMM)."""
    if not memory.contains(step.address, step.size * len(step.words)):
        return None
    try:
        return tuple(memory.read_int(step.address + step.size * k, step.size,
                                     big_endian=step.big_endian)
                     for k in range(len(step.words)))
    except MemoryAccessError:
        return None


def changed(step: Step, now: tuple[int, ...] | None) -> bool:
    """Whether `now` differs from what `step` read (A/D becoming set is no change)."""
    if now is None:
        return True
    old = step.words
    if step.structure not in _PTE_STRUCTURES:
        return now != old
    return (now[0] & ~_AD) != (old[0] & ~_AD) or bool(old[0] & _AD & ~now[0])


def describe_change(step: Step, now: tuple[int, ...] | None) -> str:
    if now is None:
        return "no longer readable guest RAM"
    names = {steps.DC: _DC_WORDS, steps.PC: _PC_WORDS, steps.MSI_PTE: ("dw0", "dw1")}.get(
        step.structure)
    if names is None:
        return f"{step.words[0]:#x} -> {now[0]:#x}"
    return ", ".join(f"{names[k]} {old:#x} -> {new:#x}"
                     for k, (old, new) in enumerate(zip(step.words, now, strict=False))
                     if old != new)


def _stage_operands(gscid: int | None) -> str:
    return "GV=0" if gscid is None else f"GV=1 GSCID={gscid:#x}"


def required_command(step: Step, cache: str, tags: dict) -> str:
    """The invalidation the spec's software guidelines require after `step` changed."""
    did, pid = tags.get("device_id"), tags.get("process_id")
    structure = step.structure
    if structure == steps.DDTE:
        return "IODIR.INVAL_DDT DV=0"
    if structure == steps.DC:
        return f"IODIR.INVAL_DDT DV=1 DID={did:#x}" + _after_dc(step.words)
    if structure == steps.PDTE:
        return f"IODIR.INVAL_DDT DV=1 DID={did:#x}"
    if structure == steps.PC:
        pc = ProcessContext(*step.words)
        then = ""
        if pc.v and pc.fsc_mode != BARE:
            then = f", then IOTINVAL.VMA {_stage_operands(tags.get('gscid'))} PSCV=1 " \
                   f"PSCID={pc.pscid:#x} AV=0"
        return f"IODIR.INVAL_PDT DID={did:#x} PID={pid:#x}" + then
    if structure == steps.MSI_PTE:
        return f"IOTINVAL.GVMA GV=1 GSCID={tags['msi_gscid']:#x} AV=1 ADDR={step.input:#x}"
    if structure == steps.GS_PTE:
        gscid = tags.get("gscid") or 0
        command = (f"IOTINVAL.GVMA GV=1 GSCID={gscid:#x} AV=1 ADDR={step.input & ~0xFFF:#x}"
                   if step.decision == LEAF else f"IOTINVAL.GVMA GV=1 GSCID={gscid:#x} AV=0")
        if cache == "pdt":
            command += f", then IODIR.INVAL_PDT DID={did:#x} PID={pid:#x}"
        return command
    # First stage.
    pscid = tags.get("pscid")
    space = _stage_operands(tags.get("gscid"))
    asid = "PSCV=0" if tags.get("global") or pscid is None else f"PSCV=1 PSCID={pscid:#x}"
    if step.decision == LEAF:
        return f"IOTINVAL.VMA {space} {asid} AV=1 ADDR={tags['page']:#x}"
    return f"IOTINVAL.VMA {space} {asid} AV=0 (a non-leaf PTE changed)"


def _after_dc(old: tuple[int, ...]) -> str:
    """The IOTINVALs the spec's recipe adds after IODIR.INVAL_DDT, decided on the old
    device context (what translations it may have left in the IOTLB)."""
    dc = DeviceContext.from_words(list(old))
    if not dc.v:
        return ""
    if dc.iohgatp_mode != BARE:
        return (f", then IOTINVAL.VMA GV=1 GSCID={dc.gscid:#x} PSCV=0 AV=0 and "
                f"IOTINVAL.GVMA GV=1 GSCID={dc.gscid:#x} AV=0")
    if dc.pdtv:
        return ", then IOTINVAL.VMA GV=0 PSCV=0 AV=0"
    if dc.fsc_mode != BARE:
        return f", then IOTINVAL.VMA GV=0 PSCV=1 PSCID={dc.pscid:#x} AV=0"
    return ""


class CheckedLru(Lru):
    """A directory or MSI PTE cache whose every hit the checker verifies."""

    def __init__(self, limit: int, checker: InvalidationChecker, kind: str):
        super().__init__(limit)
        self.checker = checker
        self.kind = kind

    def lookup(self, key):
        value = super().lookup(key)
        if value is not None:
            self.checker.cached_use(self.kind, key, value)
        return value


class CheckedTlb(Tlb):
    """The G-stage cache, with every hit verified."""

    def __init__(self, limit: int, checker: InvalidationChecker, kind: str):
        super().__init__(limit)
        self.checker = checker
        self.kind = kind

    def lookup(self, space: tuple, va: int):
        entry = super().lookup(space, va)
        if entry is not None:
            self.checker.cached_use(self.kind, (space, va), entry)
        return entry


class InvalidationChecker:
    """Stale-use detection for one `RiscvIommu` (installed by `modes.set_modes`)."""

    def __init__(self, iommu) -> None:
        self.iommu = iommu
        self.recorder = StepRecorder()
        self.stale: dict[tuple, StaleUse] = {}
        self.recent: deque[StaleUse] = deque(maxlen=KEEP)
        self.uses = 0                      # stale uses, repeats included
        self.invalidations: deque[Invalidation] = deque(maxlen=KEEP)
        self.executed: Counter = Counter()  # invalidation commands by name
        self.removed_nothing: Counter = Counter()
        self.listeners: list[Callable[[StaleUse], None]] = []

    # -- cache classes for TranslationCaches.configure ------------------------------------
    def lru(self, kind: str, limit: int) -> Lru:
        return CheckedLru(limit, self, kind)

    def tlb(self, kind: str, limit: int) -> Tlb:
        # The IOTLB is checked by the core, which knows the context of the use.
        return Tlb(limit) if kind == "iotlb" else CheckedTlb(limit, self, kind)

    # -- uses ---------------------------------------------------------------------------
    def cached_use(self, kind: str, key, value) -> None:
        """A hit in the cache `kind` (not the IOTLB): verify what it was built from."""
        if kind == "msi":
            source, tags = value[3], {"msi_gscid": key[0]}
            what = f"the interrupt file at GPA {value[2] << 12:#x}"
        elif kind == "gtlb":
            source, tags = value.source, {"gscid": value.gscid}
            what = f"GPA {key[1]:#x} (GSCID {value.gscid:#x})"
            key = (key[0], value.va_base)
        else:
            source = value.source
            did, pid = (key, None) if kind == "ddt" else key
            tags = {"device_id": did, "process_id": pid}
            if source is not None and source.roots is not None:
                tags["gscid"] = source.roots.gscid
            what = f"device {did:#x}" + ("" if pid is None else f" process {pid:#x}")
        if source is not None:
            self._verify(kind, key, source, tags, what, value)

    def iotlb_hit(self, ctx, entry: TlbEntry, iova: int) -> None:
        """An IOTLB hit for `ctx`'s request: verify the entry's walk and roots."""
        source = entry.source
        if source is None:
            return
        request = ctx.request
        tags = {"device_id": request.device_id, "process_id": ctx.process_id,
                "pscid": entry.pscid, "gscid": entry.gscid, "global": entry.is_global,
                "page": iova & ~0xFFF}
        what = (f"IOVA {iova:#x} of device {request.device_id:#x}"
                + ("" if ctx.process_id is None else f" process {ctx.process_id:#x}"))
        roots = source.roots
        if roots is not None:
            now = (ctx.fs_root if ctx.fs_mode is not None else None,
                   ctx.gs_root if ctx.gs_mode is not None else None)
            if (roots.fs_root, roots.gs_root) != now:
                self._stale_roots(entry, roots, now, tags, what, iova)
                return
        self._verify("iotlb", (entry.gscid, entry.pscid, entry.va_base), source, tags, what,
                     entry, iova)

    def negative_hit(self, kind: str, key, entry, ctx) -> None:
        """A negative entry is about to fault a request: is the structure valid now?"""
        source = entry.source
        if source is None or not source.steps:
            return
        last = source.steps[-1]
        now = read_step(self.iommu.memory, last)
        if not changed(last, now):
            return
        if kind in ("ddt", "pdt"):
            did, pid = (key, None) if kind == "ddt" else key
            tags = {"device_id": did, "process_id": pid}
            what = f"device {did:#x}" + ("" if pid is None else f" process {pid:#x}")
        elif kind == "msi":
            tags, what = {"msi_gscid": key[0]}, f"interrupt file {key[2]}"
        else:
            space, address = key
            tags = {"device_id": ctx.request.device_id, "process_id": ctx.process_id,
                    "pscid": ctx.pscid if kind == "iotlb" else None, "gscid": ctx.gscid,
                    "page": address & ~0xFFF}
            what = f"{'IOVA' if kind == 'iotlb' else 'GPA'} {address:#x}"
        required = required_command(last, kind, tags)
        if last.decision != LEAF and last.structure in _PTE_STRUCTURES:
            # The cached V=0 entry is the walk's last step whatever its level: a leaf
            # invalidation of the address covers it (its region holds the address).
            required = required.replace(" AV=0 (a non-leaf PTE changed)",
                                        f" AV=1 ADDR={tags['page']:#x}")
        self._report(StaleUse(
            kind, last.structure, tags.get("device_id"), tags.get("process_id"),
            last.address, last.words, now, required,
            f"{what}, which it faulted",
            describe_change(last, now),
            self._missed(kind, source, entry, tags), negative=True, level=_level(last)),
            ("negative", kind, last.address, now))

    # -- invalidations --------------------------------------------------------------------
    def command(self, record) -> None:
        """A command-queue listener: remember invalidations and what they removed."""
        raw = record.command
        opcode = COMMAND.get(raw, "opcode")
        layout = {1: CMD_IOTINVAL, 3: CMD_IODIR}.get(opcode)
        if layout is None or record.removed is None:
            return
        name = record.name
        self.executed[name] += 1
        if not record.removed:
            self.removed_nothing[name] += 1
        self.invalidations.append(Invalidation(next(self.recorder.seq), name,
                                               layout.decode(raw), record.removed,
                                               record.index))

    # -- reporting ------------------------------------------------------------------------
    def summary(self) -> str:
        """What the checker saw, for the log at server stop."""
        lines = [f"invalidation checker: {len(self.stale)} distinct stale use(s), "
                 f"{self.uses} use(s) in all"]
        for stale in list(self.stale.values())[:20]:
            lines.append(f"  [{stale.count}x] {stale.message()}")
        if self.executed:
            noops = ", ".join(f"{name} {self.removed_nothing[name]} of {n}"
                              for name, n in sorted(self.executed.items()))
            lines.append(f"  invalidations that removed nothing: {noops}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"distinct": len(self.stale), "uses": self.uses,
                "stale_uses": [s.as_dict() for s in self.recent],
                "invalidations": dict(self.executed),
                "removed_nothing": dict(self.removed_nothing)}

    # -- internals ------------------------------------------------------------------------
    def _verify(self, kind: str, key, source: Source, tags: dict, what: str, value,
                iova: int | None = None) -> None:
        memory = self.iommu.memory
        try:
            # slice(): mapped RAM only, never the fallback (a message to the VMM).
            if all(memory.slice(address, len(raw)) == raw for address, raw in source.snapshot):
                return      # the usual case: every entry as it was read
        except MemoryAccessError:
            pass
        for step in source.steps:
            now = read_step(memory, step)
            if changed(step, now):
                self._report(StaleUse(
                    kind, step.structure, tags.get("device_id"), tags.get("process_id"),
                    step.address, step.words, now, required_command(step, kind, tags),
                    what, describe_change(step, now),
                    self._missed(kind, source, value, tags), level=_level(step)),
                    (kind, key, step.address, now))
                return

    def _stale_roots(self, entry: TlbEntry, roots, now, tags: dict, what: str,
                     iova: int) -> None:
        space = _stage_operands(entry.gscid)
        pscid = entry.pscid
        asid = "PSCV=0" if pscid is None else f"PSCV=1 PSCID={pscid:#x}"
        required = f"IOTINVAL.VMA {space} {asid} AV=0"
        if roots.gs_root != now[1] and entry.gscid is not None:
            required = f"IOTINVAL.GVMA GV=1 GSCID={entry.gscid:#x} AV=0 and " + required

        def show(root):
            return "Bare" if root is None else f"{root:#x}"

        change = (f"the entry was walked from first-stage root {show(roots.fs_root)} / "
                  f"G-stage root {show(roots.gs_root)}; the context in use now has "
                  f"{show(now[0])} / {show(now[1])}")
        self._report(StaleUse(
            "iotlb", "translation roots (device or process context)", tags["device_id"],
            tags["process_id"], None, None, None, required, what, change,
            self._missed("iotlb", entry.source, entry, tags)),
            ("roots", entry.gscid, pscid, entry.va_base, now))

    def _missed(self, kind: str, source: Source, value, tags: dict) -> list[str]:
        """The invalidations since the fill that could have covered the entry, and why
        each did not."""
        missed = []
        for inv in self.invalidations:
            if inv.seq < source.seq:
                continue
            why = _not_covered(kind, inv, value, tags)
            if why is not None:
                missed.append(f"{inv.text()} did not cover it: {why}")
        return missed[-3:]

    def _report(self, stale: StaleUse, dedup: tuple) -> None:
        self.uses += 1
        known = self.stale.get(dedup)
        if known is not None:
            known.count += 1
            return
        if len(self.stale) < 100_000:
            self.stale[dedup] = stale
        self.recent.append(stale)
        log.warning("%s", stale.message())
        for listener in list(self.listeners):
            listener(stale)


def _level(step: Step) -> str:
    if step.structure not in _PTE_STRUCTURES:
        return ""
    if step.decision == NEXT:
        return f" (level {step.level} non-leaf)"
    if step.decision != LEAF:
        return f" (level {step.level}, {step.decision})"
    if step.level:
        size = 1 << (12 + step.level * (10 if step.size == 4 else 9))
        unit = ("GiB", 30) if size >= 1 << 30 else ("MiB", 20)
        return f" (level {step.level} leaf: a {size >> unit[1]} {unit[0]} superpage)"
    return " (level 0 leaf)"


def _not_covered(kind: str, inv: Invalidation, value, tags: dict) -> str | None:
    """Why invalidation `inv` did not remove the cached `value` of cache `kind`, or None
    when it is not the kind of command that could have."""
    f = inv.fields
    if kind in ("ddt", "pdt"):
        if not inv.name.startswith("IODIR"):
            return None
        if inv.name == "IODIR.INVAL_PDT" and kind == "ddt":
            return "IODIR.INVAL_PDT never removes a device context"
        if f["DV"] and f["DID"] != tags["device_id"]:
            return f"DID {f['DID']:#x} is not the device {tags['device_id']:#x}"
        if inv.name == "IODIR.INVAL_PDT" and f["PID"] != tags.get("process_id"):
            return f"PID {f['PID']:#x} is not the process {tags.get('process_id')}"
        return "it ran before the structure was cached again"
    if not isinstance(value, TlbEntry):
        if inv.name != "IOTINVAL.GVMA":
            return None
        if f["GV"] and f["GSCID"] != tags.get("msi_gscid"):
            return f"GSCID {f['GSCID']:#x} is not the DC's {tags.get('msi_gscid'):#x}"
        return "ADDR names another interrupt file"
    if inv.name == "IOTINVAL.VMA" and kind == "iotlb":
        return _vma_miss(f, value)
    if inv.name == "IOTINVAL.GVMA":
        if gvma_covers(value, bool(f["GV"]), f["GSCID"], bool(f["AV"]), *iotinval_range(f)):
            return None
        if not f["GV"]:
            return "GV=0 covers G-stage translations, this one has none"
        if value.gscid != f["GSCID"]:
            return f"GSCID {f['GSCID']:#x} is not the entry's {_hex(value.gscid)}"
        return f"ADDR {f['ADDR'] << 12:#x} is not a GPA the entry was built from"
    if inv.name == "IOTINVAL.VMA" and kind == "gtlb":
        return "IOTINVAL.VMA never removes G-stage translations"
    return None


def _vma_miss(f: dict, entry: TlbEntry) -> str | None:
    gv, pscv, av = bool(f["GV"]), bool(f["PSCV"]), bool(f["AV"])
    addr, size = iotinval_range(f)
    if vma_covers(entry, gv, f["GSCID"], pscv, f["PSCID"], av, addr, size):
        return None
    if entry.gscid != (f["GSCID"] if gv else None):
        if not gv:
            return "GV=0 names host address spaces; the entry is in a VM's (GSCID " \
                   f"{entry.gscid:#x})"
        return f"GV=1 GSCID={f['GSCID']:#x} is not the entry's {_hex(entry.gscid)}"
    if pscv and entry.is_global:
        return "PSCV=1 spares global entries (G=1)"
    if pscv and entry.pscid != f["PSCID"]:
        return f"PSCID {f['PSCID']:#x} is not the entry's {_hex(entry.pscid)}"
    size = entry.size
    return (f"ADDR {addr:#x} is outside the entry's {size // 1024} KiB page at "
            f"{entry.va_base:#x}")


def _hex(value: int | None) -> str:
    return "none" if value is None else f"{value:#x}"
