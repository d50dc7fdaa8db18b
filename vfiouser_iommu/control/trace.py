"""`serve --trace FILE.json`: a Chrome trace-event file of what the IOMMU did.

The file is in the trace-event JSON Array Format, which ui.perfetto.dev and
chrome://tracing open:

- every command the command queue executed is a complete event ("X") with its duration
  on the "command queue" track (arguments: the decoded command, its outcome, the cache
  entries it removed);
- faults, invalidations (with what they removed), interrupts and stale-use warnings are
  instant events ("i") on tracks of their own;
- DMA throughput (MB/s read and written), translation rate and cache hit ratio of each
  endpoint are counter tracks ("C"), sampled every `interval` seconds.

It is written as it goes, one event per line, each followed by a comma: a clean stop
(SIGTERM, Ctrl-C) ends the array with "]" and the file is strict JSON; a killed server
leaves complete lines up to the last flush (at most `interval` seconds old) and no "]".
The trace viewers accept that: catapult's importer (chrome://tracing) drops a trailing
comma and adds the missing "]" ("some tracing implementations cannot guarantee that a
']' gets written"). Lines are only ever written whole (one os.write per flush), so a
kill never leaves half an event.
"""

from __future__ import annotations

import json
import os
import threading
import time

#: Track (thread) ids and names.
TRACKS = {"command queue": 1, "faults": 2, "invalidations": 3, "interrupts": 4,
          "invalidation checker": 5}
_INVALIDATIONS = ("IOTINVAL.VMA", "IOTINVAL.GVMA", "IODIR.INVAL_DDT", "IODIR.INVAL_PDT")
FLUSH_EVENTS = 512


class TraceWriter:
    """Writes the trace of one IOMMU function (and its endpoints' counters)."""

    def __init__(self, path: str | os.PathLike, server, iommu_function, endpoints=(),
                 interval: float = 0.5) -> None:
        self.path = path
        self.server = server
        self.function = iommu_function
        self.names = {spec.requester_id: f"{spec.kind}@{spec.addr}" for spec, _ in endpoints}
        self.interval = interval
        self.pid = os.getpid()
        self.t0 = time.perf_counter()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.pending: list[str] = []
        self.events = 0
        self.closed = False
        self._previous: dict[int, dict] = {}
        self._counters: dict[str, dict] = {}   # last value of each counter track
        self._previous_time = self.t0
        self._write_raw("[\n")
        self._metadata()
        self.flush()
        iommu_function.iommu.regs.cq.listeners.append(self._on_command)
        iommu_function.observer.listeners.append(self._on_event)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_thread, name="trace-ticker",
                                        daemon=True)
        self._ticker.start()

    # -- events ---------------------------------------------------------------------------
    def _ts(self, perf: float | None = None) -> float:
        return round(((time.perf_counter() if perf is None else perf) - self.t0) * 1e6, 3)

    def _add(self, event: dict) -> None:
        event.setdefault("pid", self.pid)
        self.pending.append(json.dumps(event, separators=(",", ":"), default=str) + ",\n")
        self.events += 1
        if len(self.pending) >= FLUSH_EVENTS:
            self.flush()

    def _metadata(self) -> None:
        self._add({"name": "process_name", "ph": "M", "tid": 0,
                   "args": {"name": "vfiouser-iommu"}})
        for name, tid in TRACKS.items():
            self._add({"name": "thread_name", "ph": "M", "tid": tid, "args": {"name": name}})
            self._add({"name": "thread_sort_index", "ph": "M", "tid": tid,
                       "args": {"sort_index": tid}})

    def _instant(self, track: str, name: str, args: dict, scope: str = "t") -> None:
        self._add({"name": name, "ph": "i", "s": scope, "ts": self._ts(),
                   "tid": TRACKS[track], "cat": track.replace(" ", "_"), "args": args})

    def _on_command(self, record) -> None:
        name = record.name
        args = {"command": record.describe(), "outcome": record.outcome.value,
                "cq_index": record.index}
        if record.removed is not None:
            args["removed"] = record.removed
        self._add({"name": name, "ph": "X", "ts": self._ts(record.started),
                   "dur": round(record.duration * 1e6, 3), "tid": TRACKS["command queue"],
                   "cat": "command", "args": args})
        if name in _INVALIDATIONS:
            label = f"{name} removed {record.removed}" if record.removed is not None else name
            self._instant("invalidations", label, args)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "FAULT":
            self._instant("faults", f"fault {data['cause']} {data['name']}", data)
        elif kind == "INTERRUPT":
            self._instant("interrupts", f"interrupt vector {data['vector']}", data)
        elif kind == "STALE_USE":
            self._instant("invalidation checker", f"stale use: {data['structure']}",
                          data, scope="g")

    # -- counters -------------------------------------------------------------------------
    def _tick_thread(self) -> None:
        while not self._stop.wait(self.interval):
            self.server.call_soon(self.tick)

    def tick(self) -> None:
        """Sample the counters and flush (on the loop, every `interval` seconds)."""
        if self.closed:
            return
        now = time.perf_counter()
        dt = max(now - self._previous_time, 1e-6)
        ts = self._ts(now)
        for device_id, stats in self.function.observer.requester_stats().items():
            before = self._previous.get(device_id, {})

            def delta(key, stats=stats, before=before):
                return stats.get(key, 0) - before.get(key, 0)

            name = self.names.get(device_id, f"device {device_id:#x}")
            translations = delta("translations")
            walks = delta("iotlb_miss") + delta("ddt_walk") + delta("pdt_walk")
            self._counter(f"{name} DMA MB/s", ts, {
                "read": round(delta("bytes_read") / dt / 1e6, 3),
                "write": round(delta("bytes_written") / dt / 1e6, 3)})
            self._counter(f"{name} translations/s", ts,
                          {"translations": round(translations / dt, 1)})
            if translations:
                self._counter(f"{name} cache hit %", ts,
                              {"hit": round(100 * max(0.0, 1 - walks / translations), 2)})
            self._previous[device_id] = stats
        self._previous_time = now
        self.flush()

    def _counter(self, name: str, ts: float, values: dict) -> None:
        """A counter sample, written only when it changed (a track holds its value)."""
        if self._counters.get(name) != values:
            self._counters[name] = values
            self._add({"name": name, "ph": "C", "ts": ts, "args": values})

    # -- file -----------------------------------------------------------------------------
    def _write_raw(self, text: str) -> None:
        data = text.encode()
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def flush(self) -> None:
        if self.pending and not self.closed:
            text, self.pending = "".join(self.pending), []
            self._write_raw(text)

    def close(self) -> None:
        """End the array (the file is then strict JSON) and stop sampling."""
        if self.closed:
            return
        self._stop.set()
        self.tick()
        self.flush()
        self._write_raw(json.dumps({"name": "trace end", "ph": "i", "s": "g", "ts": self._ts(),
                                    "pid": self.pid, "tid": 0}) + "\n]\n")
        self.closed = True
        os.close(self.fd)
        cq = self.function.iommu.regs.cq
        if self._on_command in cq.listeners:
            cq.listeners.remove(self._on_command)
        if self._on_event in self.function.observer.listeners:
            self.function.observer.listeners.remove(self._on_event)


def read_trace(path: str | os.PathLike) -> list[dict]:
    """The events of a trace file, also one a killed server left (no closing "]")."""
    text = open(path).read().rstrip()
    if not text.endswith("]"):
        text = text.rstrip(",") + "]"
    return json.loads(text)
