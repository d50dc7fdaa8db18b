"""The control socket of `vfiouser-iommu serve` and its client (docs/introspection.md).

`start_control(server, path, iommu_function, endpoints)` serves the commands of
`commands.py` on `path` from the vfio-user loop and forwards the IOMMU's events to the
clients that asked for them; `client.ControlConnection` is the other end (used by
`vfiouser-iommu inspect` and by tests).
"""

from __future__ import annotations

import os

from vfiouser_iommu import __version__
from vfiouser_iommu.control.commands import ControlContext
from vfiouser_iommu.control.server import ControlServer

CONTROL_SOCKET = "control.sock"


def start_control(server, path: str | os.PathLike, iommu_function=None, endpoints=(),
                  trace=None) -> ControlServer:
    """Serve the control socket at `path` on `server`'s loop (a vfio_user.Server)."""
    context = ControlContext(iommu_function, endpoints, trace)
    greeting = {"version": {"package": "vfiouser-iommu", "version": __version__},
                "capabilities": ["events"]}
    control = ControlServer(server, path, context.commands(), greeting)
    if iommu_function is not None:
        iommu_function.observer.listeners.append(control.event)
    return control
