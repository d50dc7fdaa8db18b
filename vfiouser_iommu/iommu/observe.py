"""Watching one IOMMU from outside: recent faults with their times, interrupts, events
for listeners, statistics, and the walk explainer of the log (docs/introspection.md).

`Observer(iommu)` chains itself into the hooks the core already has — `report_fault`
(after the fault queue has written and logged the record), `raise_irq`, the command
queue's listeners and the checker's — so nothing on the translation path changes. It
turns what happens into events, `(kind, data)` with JSON-ready data, for its listeners
(the control socket, the trace):

- "FAULT": a fault record (cause and the spec's name for it, TTYP, IDs, iotval/iotval2);
- "COMMAND": a command the queue executed (decoded, outcome, what it removed, duration);
- "INTERRUPT": an interrupt vector signalled;
- "STALE_USE": an invalidation-checker warning.

With INFO logging on (`vfiouser-iommu -v serve`) each fault record is followed in the
log by the walk that produced it (`probe.explain_fault`): levels, PTE addresses and
values, the failing check.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from vfiouser_iommu.iommu.faults import Fault
from vfiouser_iommu.iommu.probe import cause_name, explain_fault
from vfiouser_iommu.iommu.request import HpmEvent

log = logging.getLogger("vfiouser_iommu.iommu.explain")

Listener = Callable[[str, dict], None]
#: How many faults `recent_faults` keeps.
KEEP = 256


def fault_dict(fault: Fault) -> dict:
    return {"cause": fault.cause, "name": cause_name(fault.cause), "ttyp": fault.ttyp,
            "device_id": fault.device_id, "process_id": fault.process_id,
            "privileged": fault.privileged, "iotval": fault.iotval, "iotval2": fault.iotval2}


def command_dict(record) -> dict:
    return {"index": record.index, "name": record.name, "command": record.describe(),
            "raw": f"{record.command:#034x}", "outcome": record.outcome.value,
            "removed": record.removed, "duration_us": round(record.duration * 1e6, 1),
            "time": record.time}


class Observer:
    """Events and history of one IOMMU; `iommu.observer` once made."""

    def __init__(self, iommu) -> None:
        self.iommu = iommu
        self.started = time.time()
        self.recent_faults: deque[tuple[float, Fault]] = deque(maxlen=KEEP)
        self.fault_causes: Counter = Counter()
        self.faults_by_device: Counter = Counter()
        self.interrupts: Counter = Counter()
        self.commands: Counter = Counter()
        self.command_removed: Counter = Counter()
        self.removed_nothing: Counter = Counter()   # invalidations that removed nothing
        self.listeners: list[Listener] = []
        self._chain_report_fault()
        self._chain_raise_irq()
        regs = getattr(iommu, "regs", None)
        if regs is not None:
            regs.cq.listeners.append(self._on_command)
        # The checker may come and go (set-mode): it finds this list on the IOMMU.
        iommu.stale_listeners = [self._on_stale]
        if iommu.checker is not None:
            iommu.checker.listeners.append(self._on_stale)
        iommu.observer = self

    # -- hooks ----------------------------------------------------------------------------
    def _chain_report_fault(self) -> None:
        previous = self.iommu.report_fault

        def report_fault(fault: Fault) -> None:
            previous(fault)
            self._on_fault(fault)

        self.iommu.report_fault = report_fault

    def _chain_raise_irq(self) -> None:
        previous = self.iommu.raise_irq

        def raise_irq(vector: int) -> None:
            if previous is not None:
                previous(vector)
            self.interrupts[vector] += 1
            self.emit("INTERRUPT", {"vector": vector, "time": time.time()})

        self.iommu.raise_irq = raise_irq

    def _on_fault(self, fault: Fault) -> None:
        now = time.time()
        self.recent_faults.append((now, fault))
        self.fault_causes[fault.cause] += 1
        self.faults_by_device[fault.device_id] += 1
        if log.isEnabledFor(logging.INFO):
            for line in explain_fault(self.iommu, fault):
                log.info("%s", line)
        if self.listeners:
            self.emit("FAULT", dict(fault_dict(fault), time=now))

    def _on_command(self, record) -> None:
        name = record.name
        self.commands[name] += 1
        if record.removed is not None:
            self.command_removed[name] += record.removed
            if not record.removed:
                self.removed_nothing[name] += 1
        if self.listeners:
            self.emit("COMMAND", command_dict(record))

    def _on_stale(self, stale) -> None:
        self.emit("STALE_USE", stale.as_dict())

    def emit(self, kind: str, data: dict) -> None:
        for listener in list(self.listeners):
            listener(kind, data)

    # -- statistics -----------------------------------------------------------------------
    def requester_stats(self) -> dict[int, dict]:
        """Per requester (device_id): DMA, translations, walks, misses, faults."""
        iommu = self.iommu
        devices = set(iommu.requester_stats) | {d for d, _ in iommu.device_walks} | \
            set(self.faults_by_device)
        out = {}
        for device_id in sorted(devices):
            stats = iommu.requester_stats.get(device_id)
            entry = stats.as_dict() if stats is not None else {}
            walks = {event.name.lower(): iommu.device_walks[device_id, event]
                     for event in (HpmEvent.IOTLB_MISS, HpmEvent.DDT_WALK,
                                   HpmEvent.PDT_WALK, HpmEvent.S_STAGE_WALK,
                                   HpmEvent.G_STAGE_WALK)}
            entry.update(walks)
            entry["faults"] = self.faults_by_device[device_id]
            out[device_id] = entry
        return out
