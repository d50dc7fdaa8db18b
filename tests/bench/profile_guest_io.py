"""Where the server's time goes per guest I/O request (docs/performance.md).

Boots the lab guest on our stack and runs `iobench` twice per workload: once with no
requests and once with N, and takes the difference, so the boot's own messages and
DMA drop out. Each pair runs twice: under cProfile (`serve --profile`: exact call
counts, and a time breakdown inflated by the profiler) and plain (`serve --stats`:
the server's real CPU time). The counts come from the functions that do the work:
one call of `Session._region_write` is one REGION_WRITE message, one call of
`os.eventfd_write` one interrupt signalled, and so on. cProfile sees the event loop's
thread only: what a virtio-blk worker thread does is counted as the jobs handed to it.

Run: .venv/bin/python tests/bench/profile_guest_io.py [--quick] [--out FILE]
(`make profile`). Prints markdown tables; takes a few minutes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pstats
import re
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vfiouser_iommu.lab.boot import boot_ours, boot_reference
from vfiouser_iommu.lab.paths import load_lab
from vfiouser_iommu.lab.tools import guest_tool

BENCH_RE = re.compile(r"@@BENCH (\w+) block=(\d+) ops=(\d+) bytes=(\d+) ns=(\d+)")
DISK = 600 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    iobench: str          # iobench arguments after the device, with {n} for the amount
    requests: int         # guest requests in the measured run
    amount: int           # iobench's AMOUNT for them

    def script(self, amount: int) -> str:
        return f"/bin/iobench {self.iobench.format(n=amount)}\npass iobench done\n"


WORKLOADS = [
    Workload("4 KiB random read, QD1", "rand /dev/vda 4096 {n}", 2000, 2000),
    Workload("1 MiB sequential read, QD1", "seq /dev/vda 1048576 {n}", 256, 256 << 20),
    Workload("4 KiB random read, QD8 x 2 jobs", "rand /dev/vda 4096 {n} 8 2", 4000, 4000),
]

def _first_line(qualname: str) -> int | None:
    """The first line of function `module:Class.method` in the tree being profiled
    (several classes of one file have a `read`), None if it is not there."""
    module, _, attr = qualname.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj.__code__.co_firstlineno
    except (ImportError, AttributeError):
        return None


_MEM = "vfiouser_iommu.memory:"
_FAST = "vfiouser_iommu.iommu.fastpath:FastDmaView."

# (label, where to find it in the profile: (file suffix or "~" for built-ins, function
# name[, "module:qualname" to tell apart functions of one name in one file]))
MESSAGES = [
    ("REGION_WRITE messages", ("session.py", "_region_write")),
    ("REGION_READ messages", ("session.py", "_region_read")),
    ("DMA_MAP/UNMAP messages", ("session.py", "_dma_map"), ("session.py", "_dma_unmap")),
    ("SET_IRQS messages", ("session.py", "_set_irqs")),
    ("replies from QEMU to our DMA_READ/WRITE", ("session.py", "_on_reply")),
    ("replies we sent (the guest waited for each)",
     ("~", "<method 'send' of '_socket.socket' objects>"),
     ("~", "<method 'sendmsg' of '_socket.socket' objects>")),
    ("eventfd signals (interrupts)", ("~", "<built-in method posix.eventfd_write>")),
    ("event-loop wake-ups (select returns)", ("selectors.py", "select")),
    ("chains served", ("virtqueue.py", "pop")),
    ("DMA accesses through the DmaView (map_sg, read, write)",
     ("memory.py", "map_sg"), ("memory.py", "read_as", _MEM + "DmaView.read_as"),
     ("memory.py", "write_as", _MEM + "DmaView.write_as"),
     ("fastpath.py", "read_as", _FAST + "read_as"), ("fastpath.py", "write_as", _FAST + "write_as"),
     ("fastpath.py", "read_int", _FAST + "read_int"),
     ("fastpath.py", "write_int", _FAST + "write_int")),
    ("IOMMU translation calls (Python translate + C fp_dma)", ("core.py", "translate"),
     ("~", "<built-in method vfiouser_iommu._fastpath.fp_dma>"),
     ("~", "<built-in method vfiouser_iommu._fastpath.fp_dma_int>")),
    ("guest data copied through Python bytes (GuestMemory.read/write)",
     ("memory.py", "read", _MEM + "GuestMemory.read"),
     ("memory.py", "write", _MEM + "GuestMemory.write")),
    ("disk syscalls (pread/pwrite/preadv/pwritev)", ("~", "<built-in method posix.pread>"),
     ("~", "<built-in method posix.pwrite>"), ("~", "<built-in method posix.preadv>"),
     ("~", "<built-in method posix.pwritev>")),
    ("fdatasync calls", ("~", "<built-in method posix.fdatasync>")),
    ("jobs handed to the I/O worker thread (its syscalls are not in the rows above)",
     ("worker.py", "submit")),
]


def _calls(stats: dict, where: tuple) -> tuple[int, float]:
    """(calls, own seconds) of the functions matching `where`, summed."""
    suffix, name, *qualname = where
    line = _first_line(qualname[0]) if qualname else None
    calls, own = 0, 0.0
    for (filename, first, func), (_cc, nc, tt, _ct, _callers) in stats.items():
        if func == name and (filename == suffix if suffix == "~" else filename.endswith(suffix)) \
                and (line is None or first == line):
            calls += nc
            own += tt
    return calls, own


def _boot(lab, workload: Workload, amount: int, tool: dict, work: Path, mode: str) -> dict:
    out = work / f"{mode}-{amount}"
    args = ["--profile", str(out.with_suffix(".prof"))] if mode == "profile" else []
    args += ["--stats", str(out.with_suffix(".json"))]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = boot_ours(lab, workload.script(amount), 600, echo=None, verbose=0,
                    disk_size=DISK, files=tool, serve_args=args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not run.verdict.passed:
        sys.exit(f"{workload.name}: guest failed: {run.verdict.summary()}\n"
                 + "\n".join(run.console[-20:]))
    bench = next(BENCH_RE.search(line) for line in run.console if BENCH_RE.search(line))
    result = json.loads(out.with_suffix(".json").read_text())
    result["ns"] = int(bench.group(5))
    result["children_cpu"] = (after.ru_utime - children.ru_utime
                              + after.ru_stime - children.ru_stime)
    if mode == "profile":
        result["stats"] = pstats.Stats(str(out.with_suffix(".prof"))).stats
    return result


def _reference(lab, workload: Workload, amount: int, tool: dict) -> tuple[int, float]:
    """(iobench ns, CPU seconds of QEMU) for QEMU's built-in stack."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = boot_reference(lab, workload.script(amount), 600, echo=None, disk_size=DISK,
                         files=tool)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not run.verdict.passed:
        sys.exit(f"{workload.name}: reference guest failed: {run.verdict.summary()}")
    bench = next(BENCH_RE.search(line) for line in run.console if BENCH_RE.search(line))
    return int(bench.group(5)), (after.ru_utime - children.ru_utime
                                 + after.ru_stime - children.ru_stime)


def profile(lab, workload: Workload, tool: dict, work: Path) -> dict:
    runs = {(mode, amount): _boot(lab, workload, amount, tool, work, mode)
            for mode in ("profile", "plain") for amount in (0, workload.amount)}
    ref0 = _reference(lab, workload, 0, tool)
    ref = _reference(lab, workload, workload.amount, tool)
    n = workload.requests
    base, full = runs[("profile", 0)]["stats"], runs[("profile", workload.amount)]["stats"]
    rows = []
    for label, *wheres in MESSAGES:
        count = sum(_calls(full, w)[0] - _calls(base, w)[0] for w in wheres)
        rows.append((label, count / n))
    plain0, plain = runs[("plain", 0)], runs[("plain", workload.amount)]
    server_cpu = (plain["user_seconds"] + plain["system_seconds"]
                  - plain0["user_seconds"] - plain0["system_seconds"])
    server_user = plain["user_seconds"] - plain0["user_seconds"]
    qemu_cpu = (plain["children_cpu"] - plain0["children_cpu"]) - server_cpu
    per_request_us = plain["ns"] / 1000 / n
    timing = [
        ("guest-visible time per request (µs, iobench)", per_request_us),
        ("server CPU per request (µs, no profiler)", server_cpu / n * 1e6),
        ("  of which user (Python) (µs)", server_user / n * 1e6),
        ("QEMU CPU per request (µs, vCPUs + main loop)", qemu_cpu / n * 1e6),
        ("QEMU built-in stack: time per request (µs)", ref[0] / 1000 / n),
        ("QEMU built-in stack: QEMU CPU per request (µs)", (ref[1] - ref0[1]) / n * 1e6),
    ]
    top = _top(base, full, n)
    return {"name": workload.name, "counts": rows, "timing": timing, "top": top}


def _top(base: dict, full: dict, n: int, limit: int = 15) -> list[tuple[str, float, float]]:
    """The functions with the most own time per request (profiled: inflated)."""
    diff = []
    for key, (_cc, nc, tt, _ct, _callers) in full.items():
        b = base.get(key)
        calls = nc - (b[1] if b else 0)
        own = tt - (b[2] if b else 0.0)
        if calls > 0:
            filename, line, func = key
            where = func if filename == "~" else f"{Path(filename).name}:{line} {func}"
            diff.append((where, calls / n, own / n * 1e6))
    diff.sort(key=lambda row: -row[2])
    return diff[:limit]


def render(results: list[dict]) -> str:
    lines = []
    names = [r["name"] for r in results]
    lines.append("| per request | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for i, (label, _) in enumerate(results[0]["timing"]):
        lines.append(f"| {label} | " + " | ".join(f"{r['timing'][i][1]:.0f}" for r in results)
                     + " |")
    for i, (label, _) in enumerate(results[0]["counts"]):
        lines.append(f"| {label} | " + " | ".join(f"{r['counts'][i][1]:.2f}" for r in results)
                     + " |")
    for r in results:
        lines.append("")
        lines.append(f"Top own time per request under cProfile, {r['name']}:")
        lines.append("")
        lines.append("| function | calls/request | µs/request (profiled) |")
        lines.append("|---|---:|---:|")
        for where, calls, us in r["top"]:
            lines.append(f"| `{where}` | {calls:.2f} | {us:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 4 KiB QD1 workload")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    lab = load_lab()
    tool = {"bin/iobench": guest_tool(lab, "iobench").read_bytes()}
    workloads = WORKLOADS[:1] if args.quick else WORKLOADS
    results = []
    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-profile-") as tmp:
        for workload in workloads:
            print(f"== {workload.name}", file=sys.stderr, flush=True)
            results.append(profile(lab, workload, tool, Path(tmp)))
    text = render(results)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
