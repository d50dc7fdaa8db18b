"""Endpoint device models served as PCI functions, and the registry of their kinds.

`ENDPOINTS` maps a kind, as written in a function spec (`KIND@SS.F[,opt=val...]`), to a
builder taking the spec's options.
"""

from __future__ import annotations

from collections.abc import Callable

from ..pci.function import PciFunction
from . import testdev, virtio

ENDPOINTS: dict[str, Callable[[dict[str, str]], PciFunction]] = {
    "iommu-testdev": testdev.build,
    "virtio-blk": virtio.build_blk,
    "virtio-rng": virtio.build_rng,
    "virtio-net": virtio.build_net,
}


def build_endpoint(kind: str, options: dict[str, str]) -> PciFunction:
    """The endpoint of kind `kind`; ValueError for an unknown kind or option."""
    try:
        builder = ENDPOINTS[kind]
    except KeyError:
        raise ValueError(f"unknown endpoint {kind!r} (known: {', '.join(ENDPOINTS)})") from None
    return builder(options)
