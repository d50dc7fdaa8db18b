"""Where the lab lives and what it holds.

The lab is a cache folder (default `~/.cache/vfiouser-iommu`, or `VFIOUSER_IOMMU_LAB`)
with a `lab.json` manifest that `lab provision` writes last: a lab without a manifest,
or whose manifest names files that are gone, is not a lab.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "lab.json"


def lab_dir() -> Path:
    env = os.environ.get("VFIOUSER_IOMMU_LAB")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "vfiouser-iommu"


@dataclass
class Lab:
    """The manifest of a provisioned lab. Paths are absolute."""

    root: str
    qemu: str                    # executable: <lab>/bin/qemu-system-riscv64
    qemu_version: str
    qemu_source: str             # "system" or "debian unstable <version>"
    kernel: str
    kernel_version: str          # uname -r of the kernel
    kernel_source: str
    modules: dict[str, str] = field(default_factory=dict)  # name -> decompressed .ko path
    module_order: list[str] = field(default_factory=list)  # load order (dependencies first)
    busybox: str = ""
    busybox_version: str = ""
    # Kernel-module builds (lab/kbuild.py): the tree for `make -C`, the make arguments
    # it needs, and the cross-compiler prefix. Empty kbuild: the lab cannot build modules.
    kbuild: str = ""
    kbuild_make_args: list[str] = field(default_factory=list)
    cross_compile: str = ""

    def save(self) -> None:
        path = Path(self.root) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    def missing(self) -> list[str]:
        files = [self.qemu, self.kernel, self.busybox, *self.modules.values()]
        if self.kbuild:
            files.append(str(Path(self.kbuild) / "Makefile"))
        return [f for f in files if not Path(f).exists()]

    def kbuild_for_modules(self):
        """The lab's `Kbuild` (lab/kbuild.py), its builds cached under <lab>/kmod."""
        from vfiouser_iommu.lab.kbuild import Kbuild, LabError

        if not self.kbuild:
            raise LabError(f"the lab at {self.root} cannot build kernel modules: run "
                           "`vfiouser-iommu lab provision` (with --kbuild DIR for your "
                           "own kernel)")
        return Kbuild(Path(self.kbuild), tuple(self.kbuild_make_args),
                      Path(self.root) / "kmod")


class NoLab(Exception):
    """No usable lab: run `vfiouser-iommu lab provision`."""


def load_lab(root: Path | None = None) -> Lab:
    root = root or lab_dir()
    path = root / MANIFEST
    if not path.exists():
        raise NoLab(f"no lab at {root}: run `vfiouser-iommu lab provision` (or `make lab`)")
    try:
        lab = Lab(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise NoLab(f"the lab manifest {path} is unreadable ({e}): provision again") from None
    gone = lab.missing()
    if gone:
        raise NoLab(f"the lab at {root} is incomplete ({gone[0]} is gone): provision again")
    return lab
