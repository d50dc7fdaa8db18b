"""virtio devices behind the IOMMU, served as modern virtio-pci functions.

`build_blk`, `build_rng` and `build_net` build them from function-spec options
(`virtio-blk@SS.F,disk=PATH[,readonly=on][,queues=N]`, `virtio-rng@SS.F`,
`virtio-net@SS.F,tap=NAME[,netns=NAME][,mac=XX:XX:XX:XX:XX:XX][,offload=off]`).
"""

from __future__ import annotations

import hashlib
import re

from .blk import DEFAULT_QUEUES, MAX_QUEUES, VirtioBlk
from .net import MAX_MTU, VirtioNet
from .pci import VirtioPciFunction
from .rng import VirtioRng
from .tap import open_tap, set_offload

_SWITCH = {"on": True, "off": False}


def build_blk(options: dict[str, str]) -> VirtioPciFunction:
    """virtio-blk over the raw image `disk=PATH`; `readonly=on|off` (default off);
    `queues=N` request queues (default 4; Linux uses one per vCPU)."""
    unknown = set(options) - {"disk", "readonly", "queues"}
    if unknown:
        raise ValueError(f"virtio-blk: unknown options {sorted(unknown)}")
    if not options.get("disk"):
        raise ValueError("virtio-blk: disk=PATH is required")
    readonly = _SWITCH.get(options.get("readonly", "off"))
    if readonly is None:
        raise ValueError("virtio-blk: readonly=on|off")
    queues = options.get("queues", str(DEFAULT_QUEUES))
    if not queues.isdigit() or not 1 <= int(queues) <= MAX_QUEUES:
        raise ValueError(f"virtio-blk: queues=N with N in 1..{MAX_QUEUES}")
    try:
        device = VirtioBlk(options["disk"], readonly=readonly, queues=int(queues))
    except OSError as e:
        raise ValueError(f"virtio-blk: cannot open {options['disk']}: {e.strerror}") from None
    return VirtioPciFunction(device)


def build_rng(options: dict[str, str]) -> VirtioPciFunction:
    """virtio-rng; it takes no options."""
    if options:
        raise ValueError(f"virtio-rng: unknown options {sorted(options)}")
    return VirtioPciFunction(VirtioRng())


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """`52:54:00:12:34:56` -> 6 bytes; a unicast address is required."""
    if not _MAC.match(text):
        raise ValueError(f"virtio-net: bad mac {text!r}: want XX:XX:XX:XX:XX:XX")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ValueError(f"virtio-net: mac {text} is a multicast address")
    return mac


def default_mac(tap: str, netns: str | None) -> bytes:
    """A locally administered address in QEMU's 52:54:00 range, stable for one tap (so
    two virtio-nets of one server differ, and a guest sees the same MAC every boot)."""
    return bytes.fromhex("525400") + hashlib.sha256(f"{netns or ''}/{tap}".encode()).digest()[:3]


def build_net(options: dict[str, str]) -> VirtioPciFunction:
    """virtio-net on the existing tap `tap=NAME`, in network namespace `netns=NAME` if
    given; `mac=` (default: derived from the tap's name and namespace); `offload=off`
    offers no checksum/segmentation offload and no mergeable buffers (default on)."""
    unknown = set(options) - {"tap", "netns", "mac", "offload"}
    if unknown:
        raise ValueError(f"virtio-net: unknown options {sorted(unknown)}")
    tap, netns = options.get("tap"), options.get("netns") or None
    if not tap:
        raise ValueError("virtio-net: tap=NAME is required (an existing tap device)")
    mac = parse_mac(options["mac"]) if "mac" in options else default_mac(tap, netns)
    offload = _SWITCH.get(options.get("offload", "on"))
    if offload is None:
        raise ValueError("virtio-net: offload=on|off")
    try:
        fd, mtu = open_tap(tap, netns)
    except ValueError as e:
        raise ValueError(f"virtio-net: {e}") from None
    label = f"virtio-net[{netns}/{tap}]" if netns else f"virtio-net[{tap}]"
    device = VirtioNet(fd, mac, min(mtu, MAX_MTU), label=label, offload=offload,
                       set_offload=lambda flags: set_offload(fd, flags))
    return VirtioPciFunction(device)


__all__ = ["VirtioBlk", "VirtioNet", "VirtioPciFunction", "VirtioRng", "build_blk", "build_net",
           "build_rng", "default_mac", "parse_mac"]
