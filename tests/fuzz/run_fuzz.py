"""Run the fuzz targets one after another and summarise: what `make fuzz` calls.

    python tests/fuzz/run_fuzz.py [--seconds S | --runs N] [--targets a,b,...]
                                  [--workdir build/fuzz] [--jobs J]

Wire targets (fuzz_wire.py) and the IOMMU target (fuzz_iommu.py) each run from their
seed corpus (tests/fuzz/corpus/TARGET, read-only) plus a working corpus of their own
under WORKDIR, so that a later run goes on where this one stopped. A crash leaves its
input in WORKDIR/crashes/TARGET-crash-<sha1>; replay it with
`python tests/fuzz/fuzz_wire.py --target=TARGET FILE` and make it a regression test
(tests/fuzz/regressions/, see test_fuzz.py). Exit status 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
WIRE_TARGETS = ("version", "dma_map", "dma_unmap", "device_get_info", "get_region_info",
                "get_irq_info", "set_irqs", "region_read", "region_write", "device_reset",
                "unknown", "sequence")   # wire_harness.TARGETS
IOMMU_TARGETS = ("iommu",)
ALL_TARGETS = WIRE_TARGETS + IOMMU_TARGETS
SUMMARY = re.compile(r"@@FUZZ (.*)")


def command(target: str, corpus: Path, budget: list[str]) -> list[str]:
    script = "fuzz_iommu.py" if target in IOMMU_TARGETS else "fuzz_wire.py"
    argv = [sys.executable, str(HERE / script)]
    if target in WIRE_TARGETS:
        argv.append(f"--target={target}")
    seeds = HERE / "corpus" / target
    return argv + budget + ["-use_value_profile=1", "-print_final_stats=1", "-max_len=4096",
                            "-artifact_prefix=" + str(corpus.parent / "crashes" / f"{target}-"),
                            str(corpus)] + ([str(seeds)] if seeds.is_dir() else [])


def run(target: str, workdir: Path, budget: list[str]) -> tuple[bool, dict[str, str], float]:
    corpus = workdir / target
    corpus.mkdir(parents=True, exist_ok=True)
    (workdir / "crashes").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log = workdir / f"{target}.log"
    with open(log, "w") as out:
        proc = subprocess.run(command(target, corpus, budget), stdout=out,
                              stderr=subprocess.STDOUT, cwd=workdir)
    stats: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = SUMMARY.match(line)
        if m:
            stats = dict(kv.split("=", 1) for kv in m[1].split())
    return proc.returncode == 0, stats, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, help="time per target")
    budget.add_argument("--runs", type=int, help="inputs per target")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help="comma-separated (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("build/fuzz"))
    args = parser.parse_args(argv)
    if args.runs is not None:
        limits = [f"-runs={args.runs}"]
    else:
        limits = [f"-max_total_time={args.seconds or 60}"]
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)} (known: {', '.join(ALL_TARGETS)})")
    workdir = args.workdir.resolve()
    failed = []
    totals: dict[str, int] = {}
    for target in targets:
        print(f"== fuzzing {target} ({' '.join(limits)})", flush=True)
        ok, stats, seconds = run(target, workdir, limits)
        print(f"   {'ok' if ok else 'CRASH'} in {seconds:.0f}s: "
              + " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)
        for key in ("inputs", "messages", "programs"):
            if key in stats:
                totals[key] = totals.get(key, 0) + int(stats[key])
        if not ok:
            failed.append(target)
            print(f"   see {workdir / (target + '.log')} and {workdir / 'crashes'}")
    print("== total: " + " ".join(f"{k}={v}" for k, v in totals.items())
          + (f"; CRASHED: {', '.join(failed)}" if failed else "; no crash"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
