"""Benchmark: what the introspection modes cost a Linux guest's I/O on our IOMMU.

The same guest and `iobench` reads as test_bench_guest.py, on our stack only, in one
run, alternating configurations (twice each, the better of two kept, since the machine
is shared):

- default: nothing on (the control socket is always served), the C fast path;
- default, pure Python (VFIOUSER_IOMMU_PURE=1): the reference path every mode below
  but --trace runs on, for the modes' own share of their cost;
- check=on: the invalidation checker re-reads every cached structure it uses;
- --trace: the trace-event file (commands, faults, interrupts, counters);
- strictest: check=on,cache=max,negative=on plus --trace.

Two measures, printed as ratios to the default configuration: the guest's throughput
(wall clock, noisy on a shared machine) and the server's CPU time per unit of work
(user+system seconds of the `serve` process between markers the guest prints, read
from /proc through the pid the control socket reports), which contention on the
machine disturbs much less. Nothing here fails on time.

Run: .venv/bin/python -m pytest tests/bench/test_bench_introspection.py -s -m bench
"""

from __future__ import annotations

import contextlib
import os
import re

import pytest

from vfiouser_iommu.control.client import ControlConnection
from vfiouser_iommu.lab.boot import boot_ours
from vfiouser_iommu.lab.stack import Topology
from vfiouser_iommu.lab.tools import guest_tool

pytestmark = pytest.mark.bench

SEQ_BYTES = 128 << 20
RAND_OPS = 1500
DISK = 160 << 20
# More rounds for a quieter estimate: VFIOUSER_IOMMU_BENCH_ROUNDS=5.
ROUNDS = int(os.environ.get("VFIOUSER_IOMMU_BENCH_ROUNDS", "2"))
SCRIPT = f"""
echo "@@MARK start"
/bin/iobench seq /dev/vda 1048576 {SEQ_BYTES}
echo "@@MARK seq"
/bin/iobench rand /dev/vda 4096 {RAND_OPS}
echo "@@MARK rand"
pass iobench done
"""
BENCH_RE = re.compile(r"@@BENCH (\w+) block=(\d+) ops=(\d+) bytes=(\d+) ns=(\d+)")
CONFIGS = {  # name: (--iommu options, --trace, pure Python)
    "default": ("", False, False),
    "default, pure Python": ("", False, True),
    "check=on": ("check=on", False, False),
    "--trace": ("", True, False),
    "check=on,cache=max,negative=on + --trace": ("check=on,cache=max,negative=on", True,
                                                 False),
}


def _io(run) -> dict[str, float]:
    found = {}
    for line in run.console:
        m = BENCH_RE.search(line)
        if m:
            mode, _, ops, nbytes, ns = m.groups()
            seconds = int(ns) / 1e9
            found[mode] = int(nbytes) / seconds / 1e6 if mode == "seq" else int(ops) / seconds
    return found


@contextlib.contextmanager
def _pure_python(on: bool):
    """The server (a child process) without the C fast path when `on`."""
    old = os.environ.get("VFIOUSER_IOMMU_PURE")
    if on:
        os.environ["VFIOUSER_IOMMU_PURE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VFIOUSER_IOMMU_PURE", None)
        else:
            os.environ["VFIOUSER_IOMMU_PURE"] = old


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """Reads the server's CPU time at each @@MARK line of the console."""

    def __init__(self, control):
        self.control = control
        self.pid = None
        self.marks: dict[str, float] = {}

    def on_line(self, line: str) -> None:
        if line.startswith("@@MARK "):
            if self.pid is None:
                with ControlConnection(self.control) as c:
                    self.pid = c.execute("query-version")["pid"]
            self.marks[line.split()[1]] = _cpu_seconds(self.pid)

    def per_work(self) -> dict[str, float]:
        """CPU ms per MiB of sequential reads, per 100 random 4 KiB reads."""
        m = self.marks
        return {"seq_cpu": (m["seq"] - m["start"]) * 1e3 / (SEQ_BYTES >> 20),
                "rand_cpu": (m["rand"] - m["seq"]) * 1e3 / (RAND_OPS / 100)}


def test_introspection_overhead_on_guest_io(lab, tmp_path):
    tool = {"bin/iobench": guest_tool(lab, "iobench").read_bytes()}
    best: dict[str, dict[str, float]] = {name: {} for name in CONFIGS}
    for round_ in range(ROUNDS):
        for name, (options, trace, pure) in CONFIGS.items():
            workdir = tmp_path / f"{round_}-{len(best[name])}-{abs(hash(name))}"
            serve_args = ["--trace", str(workdir / "trace.json")] if trace else []
            cpu = ServerCpu(workdir / "sockets" / "control.sock")
            with _pure_python(pure):
                run = boot_ours(lab, SCRIPT, 600, echo=None, verbose=0, disk_size=DISK,
                                files=tool, workdir=workdir,
                                topology=Topology(iommu_options=options),
                                serve_args=serve_args, on_line=cpu.on_line)
            assert run.verdict.passed, run.verdict.summary() + "\n" + \
                "\n".join(run.console[-20:])
            io = _io(run)
            assert set(io) == {"seq", "rand"}, run.console[-20:]
            for mode, value in io.items():
                best[name][mode] = max(best[name].get(mode, 0.0), value)
            for mode, value in cpu.per_work().items():
                best[name][mode] = min(best[name].get(mode, float("inf")), value)
    base = best["default"]
    print("\n| configuration | seq MB/s | ratio | server CPU ms/MiB | ratio | rand IOPS | "
          "ratio | server CPU ms/100 reads | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, io in best.items():
        print(f"| {name} | {io['seq']:.1f} | {io['seq'] / base['seq']:.2f} | "
              f"{io['seq_cpu']:.2f} | {io['seq_cpu'] / base['seq_cpu']:.2f} | "
              f"{io['rand']:.0f} | {io['rand'] / base['rand']:.2f} | "
              f"{io['rand_cpu']:.1f} | {io['rand_cpu'] / base['rand_cpu']:.2f} |")
