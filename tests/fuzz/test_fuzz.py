"""The fuzzers in CI: seed corpora and found crashes replayed, and a short coverage-guided
pass of every target (a fixed number of inputs, so the time it takes is bounded).

Long runs are `make fuzz` (docs/robustness.md has their results). A crash found there
goes into tests/fuzz/regressions/TARGET/ and is replayed here for ever.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from iommu_harness import IommuHarness, seed_programs  # noqa: E402
from run_fuzz import ALL_TARGETS, IOMMU_TARGETS, command  # noqa: E402
from wire_harness import TARGETS, WireHarness  # noqa: E402

# Inputs per target in CI: seconds in all, on this project's 2-core machine.
SHORT_RUNS = {"sequence": 3000, "iommu": 2000}
SHORT_RUNS_DEFAULT = 300


def _inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def wire():
    harness = WireHarness()
    yield harness
    harness.close()


def test_run_fuzz_knows_every_wire_target():
    assert set(ALL_TARGETS) - set(IOMMU_TARGETS) == set(TARGETS)


def test_seed_corpus_is_what_make_corpus_writes(tmp_path):
    subprocess.run([sys.executable, str(HERE / "make_corpus.py"), str(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    for target in ALL_TARGETS:
        written = {p.name: p.read_bytes() for p in _inputs(tmp_path / target)}
        kept = {p.name: p.read_bytes() for p in _inputs(HERE / "corpus" / target)}
        assert written == kept, f"tests/fuzz/corpus/{target} is stale: rerun make_corpus.py"


@pytest.mark.parametrize("target", [t for t in ALL_TARGETS if t not in IOMMU_TARGETS])
def test_wire_seeds_and_regressions_replay_clean(wire, target):
    for path in _inputs(HERE / "corpus" / target) + _inputs(HERE / "regressions" / target):
        wire.run(path.read_bytes(), TARGETS[target])


def test_iommu_seeds_and_regressions_replay_clean():
    harness = IommuHarness()
    try:
        for data in seed_programs().values():
            harness.run(data)
        for path in _inputs(HERE / "regressions" / "iommu"):
            harness.run(path.read_bytes())
    finally:
        harness.close()


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_short_fuzz_pass(tmp_path, target):
    runs = SHORT_RUNS.get(target, SHORT_RUNS_DEFAULT)
    corpus = tmp_path / target
    corpus.mkdir()
    (tmp_path / "crashes").mkdir()
    argv = command(target, corpus, [f"-runs={runs}", "-seed=1"])
    out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "@@FUZZ" in out.stdout + out.stderr
