"""atheris or hypothesis for the wire? Coverage of vfio_user/ reached by each, same time.

    python tests/fuzz/compare_coverage.py [--seconds 120] [--workdir build/fuzz-compare]

1. atheris: fuzz_wire.py --target=sequence for SECONDS from the seed corpus; then its
   corpus (every input that found new coverage, plus the seeds) is replayed through
   the same harness under coverage.py (libFuzzer's corpus is exactly what covers what
   the run reached).
2. hypothesis: the same harness fed by strategies that build the same inputs
   structurally (functions, commands, flags, fds, payloads from the message layouts
   with fuzzed fields, raw framing), generating for SECONDS under coverage.py, seeds
   replayed first.

Prints line and branch coverage of vfiouser_iommu/vfio_user for each (and of the
functions' code they reach). docs/robustness.md has the numbers and the choice.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import coverage

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
SOURCE = ["vfiouser_iommu/vfio_user", "vfiouser_iommu/pci", "vfiouser_iommu/endpoints",
          "vfiouser_iommu/iommu"]


def _report(cov: coverage.Coverage, label: str) -> None:
    data = cov.get_data()
    for folder in ("vfio_user", "pci", "endpoints", "iommu"):
        lines = branches = lines_hit = branches_hit = 0
        for path in data.measured_files():
            if f"/vfiouser_iommu/{folder}/" not in path:
                continue
            analysis = cov._analyze(path)
            numbers = analysis.numbers
            lines += numbers.n_statements
            lines_hit += numbers.n_statements - numbers.n_missing
            branches += numbers.n_branches
            branches_hit += numbers.n_branches - numbers.n_missing_branches
        if lines:
            print(f"{label:10s} {folder:10s} lines {lines_hit}/{lines} "
                  f"({100 * lines_hit / lines:.1f}%), branches {branches_hit}/{branches} "
                  f"({100 * branches_hit / max(branches, 1):.1f}%)", flush=True)


def replay(corpus_dirs: list[Path]) -> None:
    cov = coverage.Coverage(branch=True, source=SOURCE, data_file=None)
    cov.start()
    from wire_harness import WireHarness

    harness = WireHarness()
    n = 0
    for folder in corpus_dirs:
        for path in sorted(folder.iterdir()):
            harness.run(path.read_bytes())
            n += 1
    harness.close()
    cov.stop()
    print(f"atheris corpus: {n} inputs replayed")
    _report(cov, "atheris")


def run_atheris(seconds: int, workdir: Path) -> None:
    corpus = workdir / "atheris-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "fuzz_wire.py"), "--target=sequence",
                    f"-max_total_time={seconds}", "-use_value_profile=1",
                    str(corpus), str(HERE / "corpus" / "sequence")],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, __file__, "--replay", str(corpus),
                    str(HERE / "corpus" / "sequence")], check=True)


def run_hypothesis(seconds: int) -> None:
    cov = coverage.Coverage(branch=True, source=SOURCE, data_file=None)
    cov.start()
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from wire_harness import (
        CONTROL_NO_REPLY,
        CONTROL_RAW,
        CONTROL_REPLY_TYPE,
        CONTROL_SPLIT,
        FD_KINDS,
        FUNCTIONS,
        Input,
        Message,
        WireHarness,
    )

    from vfiouser_iommu.vfio_user import wire
    from vfiouser_iommu.vfio_user.wire import Command

    u64 = st.integers(0, (1 << 64) - 1)
    small = st.integers(0, 16)
    offsets = st.one_of(st.integers(0, 0x4000), u64)
    payloads = {
        Command.VERSION: st.builds(lambda ma, mi, j: wire.VERSION.pack(ma, mi) + j,
                                   st.integers(0, 2), st.integers(0, 2), st.one_of(
                                       st.just(b'{"capabilities":{"max_msg_fds":8}}\0'),
                                       st.binary(max_size=64))),
        Command.DMA_MAP: st.builds(wire.DMA_MAP.pack, st.sampled_from([32, 0, 64]),
                                   st.integers(0, 7), st.sampled_from([0, 0x1000, 0x800]),
                                   st.one_of(st.sampled_from([0x8000_0000, 0]), u64),
                                   st.one_of(st.sampled_from([0x1000, 1 << 20]), u64)),
        Command.DMA_UNMAP: st.builds(wire.DMA_UNMAP.pack, st.sampled_from([24, 0]),
                                     st.integers(0, 3), st.sampled_from([0x8000_0000, 0]),
                                     st.sampled_from([0x1000, 1 << 20, 0])),
        Command.DEVICE_GET_INFO: st.builds(wire.DEVICE_INFO.pack, st.sampled_from([16, 0]),
                                           small, small, small),
        Command.DEVICE_GET_REGION_INFO: st.builds(wire.REGION_INFO.pack,
                                                  st.sampled_from([32, 16, 64]), small,
                                                  st.integers(0, 10), small, u64, u64),
        Command.DEVICE_GET_IRQ_INFO: st.builds(wire.IRQ_INFO.pack, st.sampled_from([16, 0]),
                                               small, st.integers(0, 6), small),
        Command.DEVICE_SET_IRQS: st.builds(lambda a, f, i, s, c, d: wire.IRQ_SET.pack(
            a, f, i, s, c) + d, st.sampled_from([20, 21, 0]), st.integers(0, 63),
            st.integers(0, 5), st.integers(0, 4), st.integers(0, 5), st.binary(max_size=4)),
        Command.REGION_READ: st.builds(wire.REGION_ACCESS.pack, offsets,
                                       st.integers(0, 9), st.sampled_from([1, 2, 4, 8, 256])),
        Command.REGION_WRITE: st.builds(lambda o, r, d: wire.REGION_ACCESS.pack(
            o, r, len(d)) + d, offsets, st.integers(0, 9), st.binary(max_size=16)),
        Command.DEVICE_RESET: st.just(b""),
    }
    @st.composite
    def messages(draw):
        if draw(st.integers(0, 5)) == 0:
            return Message(CONTROL_RAW, 0, 0, draw(st.binary(max_size=64)))
        cmd = draw(st.sampled_from(list(payloads)))
        payload = draw(st.one_of(payloads[cmd], st.binary(max_size=40)))
        control = draw(st.sampled_from([0, CONTROL_NO_REPLY, CONTROL_SPLIT,
                                        CONTROL_REPLY_TYPE]))
        fds = draw(st.lists(st.integers(0, len(FD_KINDS) - 1), max_size=3))
        return Message(control, cmd, draw(st.integers(0, 0xFFFF)), payload, fds)

    inputs = st.builds(Input, st.integers(0, len(FUNCTIONS) - 1), st.booleans(),
                       st.lists(messages(), max_size=12))
    harness = WireHarness()
    deadline = time.monotonic() + seconds
    count = [0]

    class TimeUp(Exception):
        pass

    @settings(max_examples=10 ** 9, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs)
    def fuzz(inp):
        if time.monotonic() > deadline:
            raise TimeUp
        count[0] += 1
        harness.run_input(inp)

    for path in sorted((HERE / "corpus" / "sequence").iterdir()):
        harness.run(path.read_bytes())
    try:
        fuzz()
    except TimeUp:
        pass
    cov.stop()
    print(f"hypothesis: {count[0]} inputs generated")
    _report(cov, "hypothesis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--workdir", type=Path, default=Path("build/fuzz-compare"))
    parser.add_argument("--replay", nargs="+", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hypothesis-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        replay(args.replay)
        return
    if args.hypothesis_only:
        run_hypothesis(args.seconds)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_atheris(args.seconds, args.workdir.resolve())
    # Its own process too, so that coverage starts before the project is imported.
    subprocess.run([sys.executable, __file__, "--hypothesis-only",
                    f"--seconds={args.seconds}"], check=True)


if __name__ == "__main__":
    main()
