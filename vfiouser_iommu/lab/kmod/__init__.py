"""The project's guest test kernel module (GPL-2.0), built from source for a kbuild tree.

`vfiouser_iommu_test.c` makes Linux's riscv-iommu driver build paging domains for the
iommu-testdev and exercises MSI page tables and a second stage; each check prints one
`@@RESULT kmod-<check> pass|fail key=value ...` line on the kernel log. Module
parameters: `checks=alloc,paging,msi,nested` (or `all`), `testdev=DDDD:BB:SS.F`;
`checks=bench [bench_dmas=N]` times DMAs through a paging domain (the benchmark).

`build(kbuild)` returns the `.ko` for a `lab.kbuild.Kbuild` (the lab's:
`lab.kbuild_for_modules()`); builds are cached by the sources and the tree.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vfiouser_iommu.lab.kbuild import Kbuild, build_module

NAME = "vfiouser_iommu_test"
SOURCES = (f"{NAME}.c", "Kbuild")
CHECKS = ("alloc", "paging", "msi", "nested")


def sources() -> dict[str, bytes]:
    folder = resources.files(__name__)
    return {name: folder.joinpath(name).read_bytes() for name in SOURCES}


def build(kbuild: Kbuild, say=None) -> Path:
    """Build (or find the cached build of) the test module for `kbuild`."""
    return build_module(kbuild, NAME, sources(), say=say)
