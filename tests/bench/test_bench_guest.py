"""Benchmark: a Linux guest on our IOMMU vs on QEMU's built-in one, side by side.

Same lab, same kernel, same guest script; the reference is QEMU's riscv-iommu-pci with
its own virtio-blk-pci behind it, ours is the vfio-user stack (our IOMMU translating
every DMA of our virtio-blk). Measured in one run, alternating stacks, and reported as
ratios (the machines are noisy; absolute numbers mean little):

- boot: seconds from QEMU's start to the guest's init running (median of 3 boots);
- seq: 1 MiB O_DIRECT sequential reads of 512 MiB (MB/s);
- rand: 4 KiB O_DIRECT reads at random offsets (IOPS).

The reads run `iobench` (vfiouser_iommu/lab/guest/iobench.c) inside the guest.
Nothing here fails on time; it fails only if a guest does not complete its work.

Run: .venv/bin/python -m pytest tests/bench/test_bench_guest.py -s -m bench
"""

from __future__ import annotations

import re
import statistics

import pytest

from vfiouser_iommu.lab.boot import boot_ours, boot_reference
from vfiouser_iommu.lab.tools import guest_tool

pytestmark = pytest.mark.bench

SEQ_BYTES = 512 << 20
RAND_OPS = 5000
BOOTS = 3
DISK = 600 << 20
SCRIPT = f"""
/bin/iobench seq /dev/vda 1048576 {SEQ_BYTES}
/bin/iobench rand /dev/vda 4096 {RAND_OPS}
pass iobench done
"""
BENCH_RE = re.compile(r"@@BENCH (\w+) block=(\d+) ops=(\d+) bytes=(\d+) ns=(\d+)")

STACKS = {
    "qemu": lambda lab, script, **kw: boot_reference(lab, script, 600, echo=None, **kw),
    "ours": lambda lab, script, **kw: boot_ours(lab, script, 600, echo=None, verbose=0, **kw),
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


def test_guest_io_and_boot_ours_vs_qemu(lab):
    tool = {"bin/iobench": guest_tool(lab, "iobench").read_bytes()}
    boots: dict[str, list[float]] = {name: [] for name in STACKS}
    for _ in range(BOOTS):
        for name, boot in STACKS.items():
            run = boot(lab, "pass booted\n")
            assert run.verdict.passed and run.init_seconds, run.verdict.summary()
            boots[name].append(run.init_seconds)
    io = {}
    for name, boot in STACKS.items():
        run = boot(lab, SCRIPT, disk_size=DISK, files=tool)
        assert run.verdict.passed, run.verdict.summary() + "\n" + "\n".join(run.console[-20:])
        io[name] = _io(run)
        assert set(io[name]) == {"seq", "rand"}, run.console[-20:]
    boot = {name: statistics.median(v) for name, v in boots.items()}
    rows = [
        ("boot to init (s, median of 3)", boot["qemu"], boot["ours"], boot["ours"] / boot["qemu"]),
        ("seq read 1 MiB x 512 MiB (MB/s)", io["qemu"]["seq"], io["ours"]["seq"],
         io["ours"]["seq"] / io["qemu"]["seq"]),
        (f"rand read 4 KiB x {RAND_OPS} (IOPS)", io["qemu"]["rand"], io["ours"]["rand"],
         io["ours"]["rand"] / io["qemu"]["rand"]),
    ]
    print("\n| measure | QEMU riscv-iommu-pci + virtio-blk-pci | ours (vfio-user) | ours/QEMU |")
    print("|---|---:|---:|---:|")
    for label, qemu, ours, ratio in rows:
        print(f"| {label} | {qemu:.2f} | {ours:.2f} | {ratio:.2f} |")
