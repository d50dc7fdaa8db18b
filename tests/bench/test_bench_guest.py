"""Benchmark: a Linux guest on our IOMMU vs on QEMU's built-in one, side by side.

Same lab, same kernel, same guest script; the reference is QEMU's riscv-iommu-pci with
its own virtio-blk-pci behind it, ours is the vfio-user stack (our IOMMU translating
every DMA of our virtio-blk). Both in one run, alternating stacks `REPEATS` times
(`BENCH_REPEATS`, default 3); each row reports the median of each stack and the median
ratio with its spread (lowest-highest ratio of one repetition): the machines are shared
and noisy, absolute numbers mean little.

Each repetition boots each stack once and runs, in the guest, `iobench`
(vfiouser_iommu/lab/guest/iobench.c) on O_DIRECT /dev/vda:

- seq: 1 MiB sequential reads, queue depth 1 (MB/s);
- rand QD1 / QD8 x 2 jobs: 4 KiB reads at random offsets (IOPS);
- write: 4 KiB random writes each followed by fdatasync, i.e. a FLUSH (IOPS);
- mix QD1 / QD8 x 2: 4 KiB random reads and writes, half and half (IOPS);

and "boot" is the seconds from QEMU's start to the guest's init, in the same boots.

Setup, so that the comparison is fair:
- guest RAM: ours needs a shared memfd (DMA_MAP hands us its fd); the reference uses
  the same memfd backend by default (`BENCH_REFERENCE_RAM=default` for QEMU's own
  anonymous RAM). docs/performance.md has both.
- disk: a sparse raw image on the same file system; QEMU's drive is cache=writeback
  (host page cache, flushes honoured), as ours is (pread/pwrite + fdatasync on FLUSH).
- our virtio-blk has one request queue per guest vCPU, as QEMU's has by default.

Through a paging domain (`test_dma_through_a_paging_domain`): stock Linux gives every
riscv endpoint an identity domain (no IOMMU_DMA on riscv; `iommu.passthrough=0` changes
nothing), so virtio-blk cannot be measured behind real page tables. The project's test
kernel module (vfiouser_iommu/lab/kmod, `checks=bench`) makes Linux's driver build a
first-stage domain for the iommu-testdev, maps 1 MiB as 256 separate 4 KiB leaves, and
times testdev DMAs through it: 4 KiB ones (a different page each, one translation) and
1 MiB ones (256 translations each). QEMU's riscv-iommu-pci has no mode property: the
driver picks Sv57 there, so ours is compared in Sv57 (and shown in Sv48 and Sv39).
Our paging domains need `svpbmt=off` with Linux 7.2 (docs/svpbmt.md).

Nothing here fails on time; it fails only if a guest does not complete its work.
`BENCH_OUT=FILE` also writes the table (markdown) to FILE.

Run: .venv/bin/python -m pytest tests/bench/test_bench_guest.py -s -m bench
"""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfiouser_iommu.lab import kmod
from vfiouser_iommu.lab.boot import boot_ours, boot_reference
from vfiouser_iommu.lab.stack import Topology
from vfiouser_iommu.lab.tools import guest_tool

pytestmark = pytest.mark.bench

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
REFERENCE_RAM = os.environ.get("BENCH_REFERENCE_RAM", "memfd")
DISK = 600 << 20
SEQ_BYTES = 256 << 20
BENCH_RE = re.compile(r"@@BENCH (\w+) block=(\d+) ops=(\d+) bytes=(\d+) ns=(\d+) qd=(\d+) "
                      r"jobs=(\d+)")


@dataclass(frozen=True)
class Workload:
    key: tuple[str, int, int]   # (iobench mode, queue depth, jobs), as iobench reports it
    label: str
    amount: int                 # iobench AMOUNT: bytes for seq, requests otherwise
    throughput: bool = False    # MB/s rather than IOPS

    @property
    def command(self) -> str:
        mode, qd, jobs = self.key
        block = 1 << 20 if mode == "seq" else 4096
        return f"/bin/iobench {mode} /dev/vda {block} {self.amount} {qd} {jobs}"

    def value(self, nbytes: int, ops: int, ns: int) -> float:
        seconds = ns / 1e9
        return nbytes / seconds / 1e6 if self.throughput else ops / seconds


WORKLOADS = [
    Workload(("seq", 1, 1), "seq read 1 MiB, QD1 (MB/s)", SEQ_BYTES, throughput=True),
    Workload(("rand", 1, 1), "rand read 4 KiB, QD1 (IOPS)", 3000),
    Workload(("rand", 8, 2), "rand read 4 KiB, QD8 x 2 jobs (IOPS)", 6000),
    Workload(("write", 1, 1), "rand write 4 KiB + fdatasync, QD1 (IOPS)", 300),
    Workload(("mix", 1, 1), "50/50 rand read/write 4 KiB, QD1 (IOPS)", 2000),
    Workload(("mix", 8, 2), "50/50 rand read/write 4 KiB, QD8 x 2 jobs (IOPS)", 4000),
]
SCRIPT = "".join(w.command + "\n" for w in WORKLOADS) + "pass iobench done\n"

STACKS = {
    "qemu": lambda lab, script, **kw: boot_reference(lab, script, 900, echo=None,
                                                     cache="writeback",
                                                     memfd=REFERENCE_RAM == "memfd", **kw),
    "ours": lambda lab, script, **kw: boot_ours(lab, script, 900, echo=None, verbose=0, **kw),
}


def _results(run) -> dict[tuple[str, int, int], float]:
    found = {}
    by_key = {w.key: w for w in WORKLOADS}
    for line in run.console:
        m = BENCH_RE.search(line)
        if m:
            mode, _block, ops, nbytes, ns, qd, jobs = m.groups()
            key = (mode, int(qd), int(jobs))
            found[key] = by_key[key].value(int(nbytes), int(ops), int(ns))
    return found


def _row(label: str, qemu: list[float], ours: list[float], digits: int = 0) -> str:
    ratios = [o / q for o, q in zip(ours, qemu, strict=True)]
    return (f"| {label} | {statistics.median(qemu):.{digits}f} | "
            f"{statistics.median(ours):.{digits}f} | {statistics.median(ratios):.2f} | "
            f"{min(ratios):.2f}-{max(ratios):.2f} |")


def test_guest_io_and_boot_ours_vs_qemu(lab):
    tool = {"bin/iobench": guest_tool(lab, "iobench").read_bytes()}
    values: dict[str, dict[tuple, list[float]]] = {name: {} for name in STACKS}
    boots: dict[str, list[float]] = {name: [] for name in STACKS}
    for rep in range(REPEATS):
        order = list(STACKS) if rep % 2 == 0 else list(reversed(STACKS))
        for name in order:
            run = STACKS[name](lab, SCRIPT, disk_size=DISK, files=tool)
            assert run.verdict.passed and run.init_seconds, \
                f"{name}: {run.verdict.summary()}\n" + "\n".join(run.console[-20:])
            found = _results(run)
            assert set(found) == {w.key for w in WORKLOADS}, run.console[-20:]
            for key, value in found.items():
                values[name].setdefault(key, []).append(value)
            boots[name].append(run.init_seconds)
    lines = [
        f"{REPEATS} repetitions, stacks alternating; guest RAM: ours memfd (shared), "
        f"QEMU built-in {REFERENCE_RAM}; QEMU drive cache=writeback.",
        "",
        "| measure | QEMU riscv-iommu-pci + virtio-blk-pci | ours (vfio-user) "
        "| ours/QEMU (median) | spread |",
        "|---|---:|---:|---:|---|",
        _row("boot to init (s)", boots["qemu"], boots["ours"], 2),
    ]
    lines += [_row(w.label, values["qemu"][w.key], values["ours"][w.key]) for w in WORKLOADS]
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("BENCH_OUT"):
        Path(os.environ["BENCH_OUT"]).write_text(table + "\n")


# -- DMA through a paging domain (the test kernel module's `bench` check) --------------------
KMOD_KO = "/kmod/vfiouser_iommu_test.ko"
KMOD_DMAS = 200
KMOD_RE = re.compile(r"@@RESULT kmod-bench pass mode=(\w+) dmas-4k=(\d+) ns-4k=(\d+) "
                     r"dmas-1m=(\d+) ns-1m=(\d+)")
PAGING_MODES = {"sv57": "svpbmt=off", "sv48": "svpbmt=off,sv57=off",
                "sv39": "svpbmt=off,sv57=off,sv48=off"}


def _kmod_bench(lab, ko: bytes, options: str | None) -> tuple[str, float, float]:
    """(mode, µs per 4 KiB DMA, MB/s of 1 MiB DMAs) on QEMU's stack (None) or ours."""
    script = f"kmod_run {KMOD_KO} checks=bench bench_dmas={KMOD_DMAS}\n"
    files = {KMOD_KO: ko}
    if options is None:
        run = boot_reference(lab, script, 900, echo=None, files=files, testdev=True)
    else:
        run = boot_ours(lab, script, 900, echo=None, verbose=0, files=files,
                        topology=Topology.parse(f"01.0,{options}", []))
    found = [KMOD_RE.search(line) for line in run.console]
    m = next((f for f in found if f), None)
    assert m, "no kmod-bench result\n" + "\n".join(run.console[-20:])
    mode, n4k, ns4k, n1m, ns1m = m.groups()
    return mode, int(ns4k) / int(n4k) / 1000, int(n1m) * (1 << 20) / (int(ns1m) / 1e9) / 1e6


def test_dma_through_a_paging_domain_ours_vs_qemu(lab):
    ko = kmod.build(lab.kbuild_for_modules()).read_bytes()
    runs: dict[str, list[tuple[float, float]]] = {"qemu": [], "sv57": []}
    for rep in range(REPEATS):
        order = ["qemu", "sv57"] if rep % 2 == 0 else ["sv57", "qemu"]
        for name in order:
            mode, us4k, mbs = _kmod_bench(lab, ko, None if name == "qemu" else PAGING_MODES[name])
            assert mode == "sv57", mode
            runs[name].append((us4k, mbs))
    others = {mode: _kmod_bench(lab, ko, PAGING_MODES[mode]) for mode in ("sv48", "sv39")}
    qemu4k = [r[0] for r in runs["qemu"]]
    qemu1m = [r[1] for r in runs["qemu"]]
    ours4k = [r[0] for r in runs["sv57"]]
    ours1m = [r[1] for r in runs["sv57"]]
    rate = [1e6 / us for us in ours4k], [1e6 / us for us in qemu4k]
    lines = [
        f"testdev DMA through a first-stage paging domain built by Linux's driver, 1 MiB "
        f"mapped as 256 4 KiB leaves; {REPEATS} repetitions.",
        "",
        "| measure | QEMU riscv-iommu-pci + iommu-testdev | ours (vfio-user) "
        "| ours/QEMU (median) | spread |",
        "|---|---:|---:|---:|---|",
        _row("4 KiB DMAs, Sv57 (DMAs/s)", rate[1], rate[0]),
        _row("1 MiB DMAs (256 translations each), Sv57 (MB/s)", qemu1m, ours1m),
    ]
    for mode, (_, us4k, mbs) in others.items():
        lines.append(f"| ours {mode}: 4 KiB DMAs {1e6 / us4k:.0f}/s, 1 MiB DMAs {mbs:.0f} MB/s "
                     "| | | | |")
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as out:
            out.write("\n" + table + "\n")
