"""Guest tools: small riscv64 programs built from the project's sources for lab guests.

They are freestanding (raw system calls, no C library), so Debian's cross compiler
`gcc-riscv64-linux-gnu` is all they need. Built on first use into `<lab>/tools`,
named by a hash of their source so an edited source is rebuilt.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from vfiouser_iommu.lab.debian import LabError
from vfiouser_iommu.lab.paths import Lab

CROSS_CC = "riscv64-linux-gnu-gcc"
CFLAGS = ["-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin",
          "-fno-stack-protector", "-fno-pic", "-no-pie", "-Wall", "-Werror"]


def guest_tool(lab: Lab, name: str) -> Path:
    """The built tool `name` (from vfiouser_iommu/lab/guest/NAME.c)."""
    source = resources.files("vfiouser_iommu.lab").joinpath("guest", f"{name}.c").read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:12]
    out = Path(lab.root) / "tools" / f"{name}-{digest}"
    if out.exists():
        return out
    if shutil.which(CROSS_CC) is None:
        raise LabError(f"{CROSS_CC} is missing (apt-get install gcc-riscv64-linux-gnu)")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".c")
    src.write_bytes(source)
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run([CROSS_CC, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise LabError(f"building {name} failed: {proc.stderr.strip()[-500:]}")
    tmp.replace(out)
    return out
