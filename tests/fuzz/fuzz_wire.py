"""Coverage-guided fuzzing of the vfio-user wire with atheris (libFuzzer).

    python tests/fuzz/fuzz_wire.py --target=TARGET [libFuzzer options] [CORPUS_DIR...]

TARGET is a command handler (version, dma_map, dma_unmap, device_get_info,
get_region_info, get_irq_info, set_irqs, region_read, region_write, device_reset,
unknown) whose messages all carry that command, or `sequence`: whole sequences of any
messages, framing included, over a real socket pair. `make fuzz` runs every target
from its seed corpus in tests/fuzz/corpus/TARGET; see wire_harness.py for what an
input means and which invariants a run checks. A broken invariant is a crash: libFuzzer
writes the input to crash-<sha1> (turn it into a regression test in
tests/fuzz/regressions/).

At exit it prints `@@FUZZ target=... inputs=N messages=M handled=H`: M messages the
inputs carried, H messages the server handled (with each input's VERSION and sentinel).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports(include=["vfiouser_iommu"]):
    from wire_harness import TARGETS, WireHarness

    import vfiouser_iommu.vfio_user.server  # noqa: F401  (instrumented for coverage)



_keep: list[object] = []


def at_exit(callback) -> None:
    """Run `callback` when the process exits: libFuzzer ends with C exit(), which skips
    Python's atexit handlers but not libc's."""
    handler = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: callback())
    _keep.append(handler)
    ctypes.CDLL(None).__cxa_atexit(handler, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--target", choices=sorted(TARGETS), default="sequence")
    ours, rest = parser.parse_known_args()
    command = TARGETS[ours.target]
    harness = WireHarness()

    def report() -> None:
        print(f"@@FUZZ target={ours.target} inputs={harness.inputs} "
              f"messages={harness.fuzzed} handled={harness.messages}", flush=True)

    at_exit(report)

    def one_input(data: bytes) -> None:
        harness.run(data, command)

    atheris.Setup([sys.argv[0], *rest], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
