"""Coverage-guided fuzzing of the IOMMU core with atheris (libFuzzer).

    python tests/fuzz/fuzz_iommu.py [libFuzzer options] [CORPUS_DIR...]

Each input is a program of register accesses, table and queue writes, commands,
requests and DMA (iommu_harness.py has the format and the invariants checked after
every step). `make fuzz` runs it from tests/fuzz/corpus/iommu. At exit it prints
`@@FUZZ target=iommu programs=N steps=M`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports(include=["vfiouser_iommu"]):
    from iommu_harness import IommuHarness

    import vfiouser_iommu.iommu  # noqa: F401  (instrumented for coverage)

from fuzz_wire import at_exit  # noqa: E402


def main() -> None:
    harness = IommuHarness()
    at_exit(lambda: print(f"@@FUZZ target=iommu programs={harness.programs} "
                          f"steps={harness.steps}", flush=True))
    atheris.Setup(sys.argv, harness.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
