"""Coverage of what the fuzzers found: replay corpora under coverage.py.

    python tests/fuzz/replay_coverage.py [WORKDIR]

Replays the seed corpus of every target, plus WORKDIR/TARGET (the working corpora a
`make fuzz` run leaves in build/fuzz) when given, through the same harnesses the
fuzzers use, and prints line and branch coverage of vfiouser_iommu/vfio_user and
vfiouser_iommu/iommu. libFuzzer keeps every input that reached new code, so replaying
the corpus covers what the whole run covered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import coverage

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
PACKAGES = ("vfio_user", "iommu")


def report(cov: coverage.Coverage) -> dict[str, tuple[int, int, int, int]]:
    """{package: (lines hit, lines, branches hit, branches)}."""
    totals = {p: [0, 0, 0, 0] for p in PACKAGES}
    for path in cov.get_data().measured_files():
        for package in PACKAGES:
            if f"/vfiouser_iommu/{package}/" in path:
                n = cov._analyze(path).numbers
                t = totals[package]
                t[0] += n.n_statements - n.n_missing
                t[1] += n.n_statements
                t[2] += n.n_branches - n.n_missing_branches
                t[3] += n.n_branches
    for package, (lh, lt, bh, bt) in totals.items():
        print(f"{package:10s} lines {lh}/{lt} ({100 * lh / max(lt, 1):.1f}%), "
              f"branches {bh}/{bt} ({100 * bh / max(bt, 1):.1f}%)")
    return {p: tuple(t) for p, t in totals.items()}


def main() -> None:
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    cov = coverage.Coverage(branch=True, data_file=None,
                            source=[f"vfiouser_iommu/{p}" for p in PACKAGES])
    cov.start()
    from iommu_harness import IommuHarness
    from run_fuzz import ALL_TARGETS, IOMMU_TARGETS
    from wire_harness import TARGETS, WireHarness

    wire, iommu, inputs = WireHarness(), IommuHarness(), 0
    for target in ALL_TARGETS:
        folders = [HERE / "corpus" / target] + ([workdir / target] if workdir else [])
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if target in IOMMU_TARGETS:
                    iommu.run(path.read_bytes())
                else:
                    wire.run(path.read_bytes(), TARGETS[target])
                inputs += 1
    wire.close()
    iommu.close()
    cov.stop()
    print(f"{inputs} corpus inputs replayed")
    report(cov)


if __name__ == "__main__":
    main()
