"""cffi build script of the translation fast path (`vfiouser_iommu._fastpath`).

setup.py names it in `cffi_modules`, so `pip install .` and `pip install -e .` compile
c_ext/fastpath.c; fastpath.h is both the cdef and the C header.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _relative(path: Path) -> str:
    # setuptools wants sources relative to the project root (the current directory).
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef((HERE / "fastpath.h").read_text())
ffibuilder.set_source(
    "vfiouser_iommu._fastpath",
    '#include <stdint.h>\n#include "fastpath.h"\n',
    sources=[_relative(HERE / "fastpath.c")],
    include_dirs=[_relative(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
