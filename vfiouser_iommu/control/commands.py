"""The control socket's commands (docs/introspection.md has the reference).

Every command reads the IOMMU's state or guest memory as it is now and returns plain
JSON (numbers as integers, 128-bit commands as hex strings); none changes what the IOMMU
or its guest sees, except `set-mode`. Each does bounded work: lists are capped by a
`count`/`limit` argument with a ceiling, and table walks touch at most a few dozen
entries. Arguments that are addresses or IDs accept an integer or a string in any base
Python reads ("0x1000").
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from vfiouser_iommu.control.server import SESSION_COMMAND_NAMES, CommandError
from vfiouser_iommu.iommu import steps
from vfiouser_iommu.iommu.caches import Tlb
from vfiouser_iommu.iommu.directory import (
    BARE,
    DDT_LEVELS,
    DeviceContext,
    ProcessContext,
    device_id_fits,
    locate_device_context,
)
from vfiouser_iommu.iommu.faults import Stop
from vfiouser_iommu.iommu.modes import modes_of, set_modes
from vfiouser_iommu.iommu.observe import command_dict, fault_dict
from vfiouser_iommu.iommu.probe import (
    cause_name,
    decode_device_context,
    decode_process_context,
    probe_walk,
    step_dict,
)
from vfiouser_iommu.iommu.regs_layouts import LAYOUTS
from vfiouser_iommu.iommu.request import Access, Request
from vfiouser_iommu.iommu.steps import StepRecorder

MAX_LIST = 4096
_INVALIDATIONS = ("IOTINVAL.VMA", "IOTINVAL.GVMA", "IODIR.INVAL_DDT", "IODIR.INVAL_PDT")
_ACCESS = {"read": Access.READ, "r": Access.READ, "write": Access.WRITE, "w": Access.WRITE,
           "execute": Access.EXECUTE, "x": Access.EXECUTE}
#: Register name -> layout that decodes it (numbered registers by their prefix).
_LAYOUT_OF = {"cqb": "cqb", "fqb": "cqb", "pqb": "cqb", "cqh": "queue_index",
              "cqt": "queue_index", "fqh": "queue_index", "fqt": "queue_index",
              "pqh": "queue_index", "pqt": "queue_index"}
_PREFIXES = ("iohpmctr", "iohpmevt", "msi_addr_", "msi_data_", "msi_vec_ctl_")


def number(value, what: str, *, bits: int = 64) -> int:
    """An integer argument (int or numeric string) within `bits` bits."""
    if isinstance(value, bool):
        raise CommandError(f"{what} must be a number")
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise CommandError(f"{what}={value!r} is not a number") from None
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise CommandError(f"{what} must be a number in [0, 2^{bits})")
    return value


def count_arg(value, default: int) -> int:
    value = default if value is None else number(value, "count", bits=32)
    return max(1, min(value, MAX_LIST))


class ControlContext:
    """What the commands look at: the IOMMU function (or None) and the endpoints."""

    def __init__(self, iommu_function=None, endpoints=(), trace=None) -> None:
        self.function = iommu_function
        self.endpoints = list(endpoints)  # (FunctionSpec, PciFunction)
        self.trace = trace
        self.started = time.time()

    @property
    def iommu(self):
        if self.function is None:
            raise CommandError("this server has no IOMMU (serve --iommu SS.F)")
        return self.function.iommu

    def endpoint_name(self, device_id: int) -> str | None:
        for spec, _ in self.endpoints:
            if spec.requester_id == device_id:
                return f"{spec.kind}@{spec.addr}"
        return None

    # -- the command table ----------------------------------------------------------------
    def commands(self) -> dict[str, Callable[..., object]]:
        table = {
            "query-version": self.query_version,
            "query-control-commands": self.query_control_commands,
            "query-registers": self.query_registers,
            "query-device-context": self.query_device_context,
            "query-process-context": self.query_process_context,
            "walk": self.walk,
            "query-caches": self.query_caches,
            "query-faults": self.query_faults,
            "query-commands": self.query_commands,
            "query-stats": self.query_stats,
            "query-checker": self.query_checker,
            "query-mode": self.query_mode,
            "set-mode": self.set_mode,
        }
        self._names = sorted([*table, *SESSION_COMMAND_NAMES])
        return table

    # -- commands -------------------------------------------------------------------------
    def query_version(self) -> dict:
        from vfiouser_iommu import __version__
        return {"package": "vfiouser-iommu", "version": __version__, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3),
                "iommu": self.function is not None,
                "endpoints": [f"{s.kind}@{s.addr}" for s, _ in self.endpoints]}

    def query_control_commands(self) -> list[dict]:
        return [{"name": name} for name in self._names]

    def query_registers(self) -> list[dict]:
        """Every register of the register file: offset, raw value, decoded fields."""
        regs = self.iommu.regs
        seen, out = set(), []
        for offset in sorted(regs._registers):
            reg = regs._registers[offset]
            if reg.name in seen:
                continue
            seen.add(reg.name)
            value = _register_value(regs, reg)
            layout = _layout(reg.name)
            entry = {"name": reg.name, "offset": reg.offset, "size": reg.size, "value": value}
            if layout is not None:
                entry["fields"] = {k: v for k, v in layout.decode(value).items()
                                   if not k.startswith("_")}
            out.append(entry)
        return out

    def query_device_context(self, did=None) -> dict:
        """The device context of `did` read live from guest memory, with the DDT
        entries that lead to it (their addresses and values), and the cached copy."""
        iommu = self.iommu
        did = number(did, "did", bits=24)
        mode = iommu.ddtp & 0xF
        if mode not in DDT_LEVELS:
            raise CommandError(f"ddtp.iommu_mode is {mode} ({'Off' if mode == 0 else 'Bare'}"
                               ": no device directory)" if mode < 2 else
                               f"ddtp.iommu_mode {mode} is reserved")
        if not device_id_fits(did, mode, iommu.config.dc_size):
            raise CommandError(f"device_id {did:#x} does not fit a {DDT_LEVELS[mode]}-level DDT")
        recorder = StepRecorder()
        out: dict = {"did": did, "ddtp": iommu.ddtp}
        try:
            dc = locate_device_context(iommu.memory, iommu.config, iommu.ddtp, iommu.fctl,
                                       did, recorder)
        except Stop as stop:
            out["fault"] = {"cause": stop.cause, "name": cause_name(stop.cause)}
            dc = None
        out["steps"] = [step_dict(s) for s in recorder.steps]
        if recorder.steps and recorder.steps[-1].structure == steps.DC:
            last = recorder.steps[-1]
            out["address"] = last.address
            out["device_context"] = decode_device_context(
                DeviceContext.from_words(list(last.words)))
            out["raw"] = list(last.words)
        out["valid"] = dc is not None
        cached = iommu.caches.ddt.get(did)
        if cached is not None:
            words = [cached.tc, cached.iohgatp, cached.ta, cached.fsc, cached.msiptp,
                     cached.msi_addr_mask, cached.msi_addr_pattern, cached.reserved]
            words = words[:iommu.config.dc_size // 8]
            out["cached"] = {"raw": words, "matches_memory": words == out.get("raw")}
        negative = iommu.caches.negative
        if negative is not None and negative.ddt.get(did) is not None:
            out["cached"] = {"negative": True, "matches_memory": dc is None}
        return out

    def query_process_context(self, did=None, pid=None) -> dict:
        """The process context of (`did`, `pid`), read live through the device's PDT
        (and G-stage), with every entry on the way."""
        iommu = self.iommu
        did = number(did, "did", bits=24)
        pid = number(pid, "pid", bits=20)
        report = probe_walk(iommu, Request(did, pid, 0, Access.READ))
        path = []
        for step in report.steps:
            path.append(step)
            if step.structure == steps.PC:
                break
        dc_steps = [s for s in path if s.structure == steps.DC]
        if dc_steps and not DeviceContext.from_words(list(dc_steps[-1].words)).pdtv:
            raise CommandError(f"device {did:#x} has PDTV=0: no process directory")
        out: dict = {"did": did, "pid": pid, "steps": [step_dict(s) for s in path]}
        pc_steps = [s for s in path if s.structure == steps.PC]
        if not pc_steps:
            out["valid"] = False
            out["fault"] = {"cause": report.cause, "name": report.fault_name,
                            "check": report.failing_check()}
            return out
        pc = pc_steps[-1]
        out.update(address=pc.address, gpa=pc.gpa, raw=list(pc.words),
                   process_context=decode_process_context(ProcessContext(*pc.words)),
                   valid=pc.decision == steps.VALID)
        if pc.decision != steps.VALID:
            out["fault"] = {"cause": report.cause, "name": report.fault_name,
                            "check": report.failing_check()}
        cached = iommu.caches.pdt.get((did, pid))
        if cached is not None:
            out["cached"] = {"raw": [cached.ta, cached.fsc],
                             "matches_memory": [cached.ta, cached.fsc] == list(pc.words)}
        return out

    def walk(self, did=None, iova=None, access="read", pid=None, privileged=False) -> dict:
        """A side-effect-free translation of one request, every step shown."""
        iommu = self.iommu
        did = number(did, "did", bits=24)
        iova = number(iova, "iova")
        pid = None if pid is None else number(pid, "pid", bits=20)
        if access not in _ACCESS:
            raise CommandError(f"access={access!r}: want read, write or execute")
        if not isinstance(privileged, bool):
            raise CommandError("privileged must be true or false")
        report = probe_walk(iommu, Request(did, pid, iova, _ACCESS[access], privileged))
        out = report.as_dict()
        out["explain"] = report.explain()
        entry = _cached_translation(iommu, report)
        if entry is not None:
            out["iotlb"] = entry
        return out

    def query_caches(self, limit=None) -> dict:
        """Every cache's entries (at most `limit` each, default 64) with their tags."""
        iommu = self.iommu
        limit = count_arg(limit, 64)
        caches = iommu.caches
        out = {"mode": caches.mode, "limits": _limits(caches),
               "stats": {"hits": dict(caches.stats.hits),
                         "misses": dict(caches.stats.misses),
                         "walks": dict(caches.stats.walks)}}
        out["ddt"] = _lru(caches.ddt, limit, _dc_entry)
        out["pdt"] = _lru(caches.pdt, limit, _pc_entry)
        out["iotlb"] = _tlb(caches.iotlb, limit)
        out["gtlb"] = _tlb(caches.gtlb, limit)
        out["msi"] = _lru(caches.msi, limit, _msi_entry)
        negative = caches.negative
        if negative is not None:
            out["negative"] = {
                "ddt": _lru(negative.ddt, limit, lambda k, v: {"did": k}),
                "pdt": _lru(negative.pdt, limit, lambda k, v: {"did": k[0], "pid": k[1]}),
                "iotlb": _tlb(negative.iotlb, limit), "gtlb": _tlb(negative.gtlb, limit),
                "msi": _lru(negative.msi, limit, _msi_entry)}
        return out

    def query_faults(self, count=None) -> dict:
        """The last `count` fault records (default 32) and the fault queue's state."""
        iommu = self.iommu
        count = count_arg(count, 32)
        observer = self.function.observer
        recent = list(observer.recent_faults)[-count:]
        fq = iommu.regs.fq
        return {"faults": [dict(fault_dict(f), time=t) for t, f in recent],
                "total": sum(observer.fault_causes.values()),
                "by_cause": {str(c): {"name": cause_name(c), "count": n}
                             for c, n in sorted(observer.fault_causes.items())},
                "queue": _queue_state(fq, "fq")}

    def query_commands(self, count=None) -> dict:
        """The last `count` commands (default 32) the command queue executed."""
        iommu = self.iommu
        count = count_arg(count, 32)
        cq = iommu.regs.cq
        history = list(cq.history)[-count:]
        return {"commands": [command_dict(r) for r in history], "queue": _queue_state(cq, "cq")}

    def query_stats(self) -> dict:
        """Per endpoint: DMA, translations, walks, faults; per command kind; per cause."""
        out: dict = {"time": time.time(), "uptime": round(time.time() - self.started, 3)}
        if self.function is None:
            return out
        iommu = self.iommu
        observer = self.function.observer
        endpoints = {}
        for device_id, entry in observer.requester_stats().items():
            name = self.endpoint_name(device_id) or f"device {device_id:#x}"
            walked = entry.get("iotlb_miss", 0) + entry.get("ddt_walk", 0) + \
                entry.get("pdt_walk", 0)
            translations = entry.get("translations", 0)
            entry["device_id"] = device_id
            entry["hit_ratio"] = (None if not translations else
                                  round(max(0.0, 1 - walked / translations), 4))
            endpoints[name] = entry
        out["endpoints"] = endpoints
        out["caches"] = {"hits": dict(iommu.caches.stats.hits),
                         "misses": dict(iommu.caches.stats.misses)}
        out["commands"] = {}
        for name, n in sorted(observer.commands.items()):
            out["commands"][name] = {"count": n}
            if name in _INVALIDATIONS:
                out["commands"][name].update(removed=observer.command_removed[name],
                                             removed_nothing=observer.removed_nothing[name])
        checker = iommu.checker
        out["faults"] = {str(c): {"name": cause_name(c), "count": n}
                         for c, n in sorted(observer.fault_causes.items())}
        out["interrupts"] = {str(v): n for v, n in sorted(observer.interrupts.items())}
        out["stale_uses"] = 0 if checker is None else checker.uses
        return out

    def query_checker(self, count=None) -> dict:
        iommu = self.iommu
        checker = iommu.checker
        if checker is None:
            return {"check": False}
        out = checker.as_dict()
        out["stale_uses"] = out["stale_uses"][-count_arg(count, 32):]
        out["check"] = True
        return out

    def query_mode(self) -> dict:
        return modes_of(self.iommu).as_dict()

    def set_mode(self, check=None, cache=None, negative=None) -> dict:
        """Switch the checker, the cache mode and negative caching (caches start empty)."""
        iommu = self.iommu
        for name, value in (("check", check), ("negative", negative)):
            if value is not None and not isinstance(value, bool):
                raise CommandError(f"{name} must be true or false")
        if cache is not None and not isinstance(cache, str):
            raise CommandError("cache must be spec, max or none")
        try:
            modes = set_modes(iommu, check=check, cache=cache, negative=negative)
        except ValueError as e:
            raise CommandError(str(e)) from None
        return modes.as_dict()


# -- helpers -------------------------------------------------------------------------------
def _register_value(regs, reg) -> int:
    """A register's value without the side effects a guest read has (a guest's cqh and
    cqcsr reads also run pending commands)."""
    if reg.name == "cqh":
        return regs.cq.head
    if reg.name == "cqcsr":
        return regs.cq.csr
    return reg.read()


def _layout(name: str):
    if name in LAYOUTS:
        return LAYOUTS[name]
    if name in _LAYOUT_OF:
        return LAYOUTS[_LAYOUT_OF[name]]
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return LAYOUTS[prefix.rstrip("_")]
    return None


def _queue_state(queue, prefix: str) -> dict:
    base = queue.base
    return {"base": (base >> 10 & ((1 << 44) - 1)) << 12, "entries": queue.entries,
            "head": queue.head, "tail": queue.tail, "csr": queue.csr,
            "csr_fields": {k: v for k, v in queue.csr_layout.decode(queue.csr).items()}}


def _limits(caches) -> dict:
    return {name: (getattr(caches, name).limit if getattr(caches, name).limit < 1 << 62
                   else "unbounded") for name in ("ddt", "pdt", "iotlb", "gtlb", "msi")}


def _lru(cache, limit: int, entry: Callable) -> dict:
    items = []
    for k, v in cache.items():
        if len(items) == limit:
            break
        items.append(entry(k, v))
    return {"count": len(cache), "entries": items}


def _dc_entry(did: int, dc) -> dict:
    return {"did": did, "tc": dc.tc, "iohgatp": dc.iohgatp, "ta": dc.ta, "fsc": dc.fsc,
            "msiptp": dc.msiptp, "pscid": dc.pscid,
            "gscid": dc.gscid if dc.iohgatp_mode != BARE else None}


def _pc_entry(key, pc) -> dict:
    return {"did": key[0], "pid": key[1], "ta": pc.ta, "fsc": pc.fsc, "pscid": pc.pscid}


def _msi_entry(key, value) -> dict:
    return {"gscid": key[0], "msipt": key[1] << 12, "index": key[2],
            "file_gpa": None if value[2] is None else value[2] << 12,
            "dw0": value[0], "dw1": value[1]}


def _permissions(entry) -> str:
    fs = entry.fs_flags if entry.fs_flags is not None else 0xFF
    gs = entry.gs_flags if entry.gs_flags is not None else 0xFF
    flags = fs & gs
    return "".join(c if flags & bit else "-" for c, bit in (("r", 2), ("w", 4), ("x", 8)))


def _tlb_entry(space, entry) -> dict:
    return {"gscid": entry.gscid, "pscid": entry.pscid, "iova": entry.va_base,
            "size": entry.size, "spa": entry.out_base, "gpa": entry.gpa_base,
            "permissions": _permissions(entry), "global": entry.is_global,
            "pbmt": entry.pbmt}


def _tlb(tlb: Tlb, limit: int) -> dict:
    items = []
    for (space, _shift, _page), entry in tlb.entries.items():
        if len(items) == limit:
            break
        items.append(_tlb_entry(space, entry))
    return {"count": len(tlb), "entries": items}


def _cached_translation(iommu, report) -> dict | None:
    """What the IOTLB holds for the walked request, if anything, and whether it agrees
    with the tables in memory (the space is the context's GSCID/PSCID)."""
    dcs = [s for s in report.steps if s.structure == steps.DC]
    if not dcs:
        return None
    dc = DeviceContext.from_words(list(dcs[-1].words))
    gscid = dc.gscid if dc.iohgatp_mode != BARE else None
    pscid = None
    pcs = [s for s in report.steps if s.structure == steps.PC]
    if pcs:
        pc = ProcessContext(*pcs[-1].words)
        pscid = pc.pscid if pc.fsc_mode != BARE else None
    elif not dc.pdtv and dc.fsc_mode != BARE:
        pscid = dc.pscid
    if gscid is None and pscid is None:
        return None
    entry = iommu.caches.iotlb.peek((gscid, pscid), report.request.iova)
    if entry is None:
        return {"cached": False}
    out = dict(_tlb_entry(None, entry), cached=True)
    iova = report.request.iova
    cached_address = entry.out_base | (iova & (entry.size - 1))
    out["matches_memory"] = (report.translation is not None
                             and report.translation.address == cached_address)
    return out
