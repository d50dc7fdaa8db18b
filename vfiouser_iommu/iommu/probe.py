"""A side-effect-free translation that shows every step (spec v1.0.1 §3.3), and the walk
explainer that follows fault records in the log.

`probe_walk(iommu, request)` runs the IOMMU's own translation code — the same
`RiscvIommu` methods, `walk.walk`, `directory.locate_*` and MSI code the DMA path runs,
never a second implementation — on a probe that shares the IOMMU's guest memory,
configuration and registers but:

- has empty caches that keep nothing (no cache lookup, no cache fill);
- reports no fault record and counts no HPM event;
- writes no A/D bit: an A/D update the walk would make is noted, not stored;
- records every table entry read (`steps.StepRecorder`) with the decision taken.

The `WalkReport` holds the steps, the translation or the fault (cause number and the
spec's name for it), and renders itself as one or two log lines or as JSON-ready dicts.
"""

from __future__ import annotations

import copy
from collections import Counter, deque
from dataclasses import dataclass, field

from vfiouser_iommu.iommu import steps
from vfiouser_iommu.iommu.caches import TranslationCaches
from vfiouser_iommu.iommu.directory import DeviceContext, ProcessContext
from vfiouser_iommu.iommu.faults import Cause, Fault, Ttyp
from vfiouser_iommu.iommu.request import Access, Request, Translation
from vfiouser_iommu.iommu.steps import Step, StepRecorder
from vfiouser_iommu.iommu.walk import LEAF, NEXT, decode_pte
from vfiouser_iommu.memory import MemoryAccessError

#: The spec's name of each fault cause (§4.2, "Fault record CAUSE field encodings").
CAUSE_NAMES = {
    1: "Instruction access fault", 4: "Read address misaligned", 5: "Read access fault",
    6: "Write/AMO address misaligned", 7: "Write/AMO access fault",
    12: "Instruction page fault", 13: "Read page fault", 15: "Write/AMO page fault",
    20: "Instruction guest page fault", 21: "Read guest-page fault",
    23: "Write/AMO guest-page fault", 256: "All inbound transactions disallowed",
    257: "DDT entry load access fault", 258: "DDT entry not valid",
    259: "DDT entry misconfigured", 260: "Transaction type disallowed",
    261: "MSI PTE load access fault", 262: "MSI PTE not valid",
    263: "MSI PTE misconfigured", 264: "MRIF access fault",
    265: "PDT entry load access fault", 266: "PDT entry not valid",
    267: "PDT entry misconfigured", 268: "DDT data corruption",
    269: "PDT data corruption", 270: "MSI PT data corruption",
    271: "MSI MRIF data corruption", 272: "Internal data path error",
    273: "IOMMU MSI write access fault", 274: "First/second-stage PT data corruption",
}

#: The access of an untranslated request, by the TTYP of its fault record.
TTYP_ACCESS = {Ttyp.UNTRANSLATED_EXECUTE: Access.EXECUTE,
               Ttyp.UNTRANSLATED_READ: Access.READ,
               Ttyp.UNTRANSLATED_WRITE: Access.WRITE}


def cause_name(cause: int) -> str:
    return CAUSE_NAMES.get(cause, "reserved or custom cause")


class _ProbeMemory:
    """Reads guest memory like the real walk does; never writes it."""

    def __init__(self, memory) -> None:
        self._memory = memory
        self.last_read: int | None = None
        self.ad_updates: list[tuple[int, int, int]] = []

    def contains(self, gpa: int, length: int = 1) -> bool:
        self.last_read = gpa
        return self._memory.contains(gpa, length)

    def read_int(self, gpa: int, size: int, *, big_endian: bool = False) -> int:
        self.last_read = gpa
        return self._memory.read_int(gpa, size, big_endian=big_endian)

    def compare_exchange(self, gpa: int, size: int, expected: int, new: int, *,
                         big_endian: bool = False) -> int:
        found = self.read_int(gpa, size, big_endian=big_endian)
        if found == expected:
            self.ad_updates.append((gpa, expected, new))
        return found

    def read(self, gpa: int, length: int) -> bytes:
        self.last_read = gpa
        return self._memory.read(gpa, length)

    def write(self, gpa: int, data) -> None:
        raise MemoryAccessError(gpa, len(data), "a probe never writes")

    def write_int(self, gpa: int, size: int, value: int, *, big_endian: bool = False) -> None:
        raise MemoryAccessError(gpa, size, "a probe never writes")


class _ProbeRecorder(StepRecorder):
    """Keeps the steps of the whole translation (fill sites restart a real recorder)."""

    def restart(self) -> int:
        return self.mark()


def _no_fault(fault: Fault) -> None:
    """A probe reports no fault record."""


def _no_event(event, device_id, process_id, gscid, pscid) -> None:
    """A probe counts no HPM event."""


def _probe_of(iommu, recorder: StepRecorder):
    """A shallow copy of `iommu` whose side effects all go nowhere (see module doc)."""
    probe = copy.copy(iommu)
    probe.memory = _ProbeMemory(iommu.memory)
    probe.caches = TranslationCaches(0, 0, 0, 0, 0)
    probe.recorder = recorder
    probe.checker = None
    probe.needs_reference_path = True
    probe.report_fault = _no_fault
    probe.count_event = _no_event
    probe.raise_irq = None
    probe.counters = Counter()
    probe.recent_faults = deque(maxlen=1)
    return probe


@dataclass
class WalkReport:
    """Everything a side-effect-free translation of `request` read and decided."""

    request: Request
    steps: list[Step]
    translation: Translation | None = None
    cause: int | None = None
    failed_read: int | None = None            # a table read that faulted (its address)
    ad_updates: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def fault_name(self) -> str | None:
        return None if self.cause is None else cause_name(self.cause)

    # -- text ----------------------------------------------------------------------------
    def explain(self) -> list[str]:
        """One line of steps and one with the outcome (the walk explainer's lines)."""
        chain = " -> ".join(_step_text(s) for s in self.steps) or "no table read"
        if self.translation is not None:
            t = self.translation
            outcome = (f"translates to {t.address:#x} ({_size(t.page_size)} page, "
                       f"{t.permissions})")
            if self.ad_updates:
                outcome += f"; would set A/D in {len(self.ad_updates)} PTE(s)"
        else:
            outcome = f"cause {self.cause} ({self.fault_name}): {self.failing_check()}"
        return [f"walk: {chain}", f"walk: {outcome}"]

    def failing_check(self) -> str:
        last = self.steps[-1] if self.steps else None
        if self.failed_read is not None and self.cause in _LOAD_CAUSES:
            return f"reading {self.failed_read:#x} failed (not guest RAM, beyond PAS, or poisoned)"
        if last is not None and last.decision not in (NEXT, LEAF, steps.VALID):
            level = (f" (level {last.level})" if last.structure in
                     (steps.FS_PTE, steps.GS_PTE, steps.DDTE, steps.PDTE) else "")
            return f"{last.structure} at {last.address:#x}{level}: {last.decision}"
        return _CAUSE_HINTS.get(self.cause, "see the steps")

    # -- JSON ----------------------------------------------------------------------------
    def as_dict(self) -> dict:
        r = self.request
        out = {"request": {"device_id": r.device_id, "process_id": r.process_id,
                           "iova": r.iova, "access": r.access.name.lower(),
                           "privileged": r.privileged},
               "steps": [step_dict(s) for s in self.steps]}
        if self.translation is not None:
            t = self.translation
            out["result"] = {"address": t.address, "page_size": t.page_size,
                             "permissions": t.permissions, "gpa": t.gpa, "msi": t.msi,
                             "pbmt": t.pbmt}
            out["would_set_ad"] = [{"address": a, "old": o, "new": n}
                                   for a, o, n in self.ad_updates]
        else:
            out["fault"] = {"cause": self.cause, "name": self.fault_name,
                            "check": self.failing_check()}
        return out


_LOAD_CAUSES = {Cause.INSTRUCTION_ACCESS_FAULT, Cause.READ_ACCESS_FAULT,
                Cause.WRITE_ACCESS_FAULT, Cause.DDT_LOAD_ACCESS_FAULT,
                Cause.MSI_PTE_LOAD_ACCESS_FAULT, Cause.PDT_LOAD_ACCESS_FAULT,
                Cause.DDT_DATA_CORRUPTION, Cause.PDT_DATA_CORRUPTION,
                Cause.MSI_PT_DATA_CORRUPTION, Cause.PT_DATA_CORRUPTION}
_CAUSE_HINTS = {
    256: "ddtp.iommu_mode is Off",
    260: "the device context does not allow this request (Bare ddtp, PASID without PDTV, "
         "ATS without EN_ATS, a too-wide device_id or process_id, ENS=0 for a privileged "
         "request)",
    12: "the IOVA is outside the first stage's address space",
    13: "the IOVA is outside the first stage's address space",
    15: "the IOVA is outside the first stage's address space",
    20: "the GPA is outside the G-stage's address space",
    21: "the GPA is outside the G-stage's address space",
    23: "the GPA is outside the G-stage's address space",
}


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and not size & ((1 << shift) - 1):
            return f"{size >> shift} {unit}"
    return f"{size} B"


_SHORT = {steps.DDTE: "DDT.L", steps.DC: "DC", steps.PDTE: "PDT.L", steps.PC: "PC",
          steps.FS_PTE: "S.L", steps.GS_PTE: "G.L", steps.MSI_PTE: "MSI"}


def _step_text(step: Step) -> str:
    name = _SHORT[step.structure]
    if step.structure in (steps.FS_PTE, steps.GS_PTE, steps.DDTE, steps.PDTE):
        name += f"{step.level}"
    value = "=" + " ".join(f"{w:#x}" for w in step.words)
    if step.structure == steps.DC:
        dc = DeviceContext.from_words(list(step.words))
        value = f" tc={dc.tc:#x} iohgatp={dc.iohgatp:#x} ta={dc.ta:#x} fsc={dc.fsc:#x}"
    elif step.structure == steps.PC:
        value = f" ta={step.words[0]:#x} fsc={step.words[1]:#x}"
    text = f"{name}[{step.address:#x}]{value}"
    if step.decision not in (NEXT, steps.VALID):
        text += f" ({step.decision})"
    return text


def step_dict(step: Step) -> dict:
    """A step as JSON: where, the raw value, its decoded fields, the decision."""
    out = {"structure": step.structure, "level": step.level, "address": step.address,
           "gpa": step.gpa, "input": step.input,
           "raw": step.value if not isinstance(step.value, tuple) else list(step.value),
           "decision": step.decision}
    out["fields"] = decode_step(step)
    return out


def decode_step(step: Step) -> dict:
    if step.structure in (steps.FS_PTE, steps.GS_PTE):
        return decode_pte_fields(step.words[0], step.size == 4)
    if step.structure in (steps.DDTE, steps.PDTE):
        w = step.words[0]
        ppn = w >> 10 & ((1 << 44) - 1)
        return {"V": w & 1, "PPN": ppn, "next": ppn << 12}
    if step.structure == steps.DC:
        return decode_device_context(DeviceContext.from_words(list(step.words)))
    if step.structure == steps.PC:
        return decode_process_context(ProcessContext(*step.words))
    return decode_msi_pte(*step.words)


def decode_pte_fields(pte: int, sv32: bool = False) -> dict:
    flags, ppn, reserved, pbmt, n = decode_pte(pte, sv32)
    names = "VRWXUGAD"
    out = {names[i]: flags >> i & 1 for i in range(8)}
    out.update({"RSW": pte >> 8 & 3, "PPN": ppn, "PBMT": pbmt, "N": n,
                "reserved": reserved >> 54 if reserved else 0, "address": ppn << 12})
    return out


def decode_device_context(dc: DeviceContext) -> dict:
    tc_bits = ("V", "EN_ATS", "EN_PRI", "T2GPA", "DTF", "PDTV", "PRPR", "GADE", "SADE",
               "DPE", "SBE", "SXL")
    out = {"tc": {name: dc.tc >> i & 1 for i, name in enumerate(tc_bits)},
           "iohgatp": {"MODE": dc.iohgatp_mode, "GSCID": dc.gscid, "PPN": dc.iohgatp_ppn},
           "ta": {"PSCID": dc.pscid, "RCID": dc.rcid, "MCID": dc.mcid},
           "fsc": {"MODE": dc.fsc_mode, "PPN": dc.fsc_ppn,
                   "is": "pdtp" if dc.pdtv else "iosatp"}}
    out["msiptp"] = {"MODE": dc.msiptp_mode, "PPN": dc.msiptp_ppn}
    out["msi_addr_mask"] = dc.msi_mask
    out["msi_addr_pattern"] = dc.msi_pattern
    return out


def decode_process_context(pc: ProcessContext) -> dict:
    return {"ta": {"V": int(pc.v), "ENS": int(pc.ens), "SUM": int(pc.sum), "PSCID": pc.pscid},
            "fsc": {"MODE": pc.fsc_mode, "PPN": pc.fsc_ppn}}


def decode_msi_pte(dw0: int, dw1: int = 0) -> dict:
    mode = dw0 >> 1 & 3
    out = {"V": dw0 & 1, "M": mode, "C": dw0 >> 63}
    if mode == 3:
        out["PPN"] = dw0 >> 10 & ((1 << 44) - 1)
        out["mode"] = "basic"
    elif mode == 1:
        out.update({"mode": "MRIF", "MRIF_address": (dw0 >> 7 & ((1 << 47) - 1)) << 9,
                    "NPPN": dw1 >> 10 & ((1 << 44) - 1),
                    "NID": (dw1 & 0x3FF) | (dw1 >> 60 & 1) << 10})
    return out


def probe_walk(iommu, request: Request) -> WalkReport:
    """Translate `request` on `iommu` without any side effect; report every step."""
    recorder = _ProbeRecorder()
    probe = _probe_of(iommu, recorder)
    result = probe.translate(request)
    report = WalkReport(request, list(recorder.steps), ad_updates=probe.memory.ad_updates)
    if isinstance(result, Fault):
        report.cause = result.cause
        report.failed_read = probe.memory.last_read
    else:
        report.translation = result
    return report


def fault_request(fault: Fault) -> Request | None:
    """The untranslated request a fault record describes, or None for other TTYPs."""
    access = TTYP_ACCESS.get(fault.ttyp)
    if access is None:
        return None
    return Request(fault.device_id, fault.process_id, fault.iotval, access, fault.privileged)


def explain_fault(iommu, fault: Fault) -> list[str]:
    """The walk explainer: the lines that follow a fault record in the log."""
    request = fault_request(fault)
    if request is None:
        return []
    report = probe_walk(iommu, request)
    lines = report.explain()
    if report.cause is None:
        lines.append("walk: the tables in memory translate it now: the fault came from a "
                     "cached entry (stale, or a cached V=0 under negative=on); check=on "
                     "says which")
    elif report.cause != fault.cause:
        lines.append(f"walk: memory now gives cause {report.cause}, the fault had "
                     f"{fault.cause}: the tables changed, or a cached entry was used")
    return lines
