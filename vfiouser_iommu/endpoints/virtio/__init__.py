"""virtio devices behind the IOMMU, served as modern virtio-pci functions.

`build_blk` and `build_rng` build them from function-spec options
(`virtio-blk@SS.F,disk=PATH[,readonly=on]`, `virtio-rng@SS.F`).
"""

from __future__ import annotations

from .blk import VirtioBlk
from .pci import VirtioPciFunction
from .rng import VirtioRng

_SWITCH = {"on": True, "off": False}


def build_blk(options: dict[str, str]) -> VirtioPciFunction:
    """virtio-blk over the raw image `disk=PATH`; `readonly=on|off` (default off)."""
    unknown = set(options) - {"disk", "readonly"}
    if unknown:
        raise ValueError(f"virtio-blk: unknown options {sorted(unknown)}")
    if not options.get("disk"):
        raise ValueError("virtio-blk: disk=PATH is required")
    readonly = _SWITCH.get(options.get("readonly", "off"))
    if readonly is None:
        raise ValueError("virtio-blk: readonly=on|off")
    try:
        device = VirtioBlk(options["disk"], readonly=readonly)
    except OSError as e:
        raise ValueError(f"virtio-blk: cannot open {options['disk']}: {e.strerror}") from None
    return VirtioPciFunction(device)


def build_rng(options: dict[str, str]) -> VirtioPciFunction:
    """virtio-rng; it takes no options."""
    if options:
        raise ValueError(f"virtio-rng: unknown options {sorted(options)}")
    return VirtioPciFunction(VirtioRng())


__all__ = ["VirtioBlk", "VirtioPciFunction", "VirtioRng", "build_blk", "build_rng"]
