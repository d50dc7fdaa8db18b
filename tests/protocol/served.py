"""What the protocol tests share: a server in a thread, RAM constants, fd snapshots.

(A module of its own, not conftest.py: test files import from it, and several test
folders have a conftest.py.)
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

from vfiouser_iommu.pci.function import PciFunction
from vfiouser_iommu.vfio_user import Server
from vfiouser_iommu.vfio_user.client import Client

RAM_BASE = 0x8000_0000
RAM_SIZE = 1 << 20


class Served:
    """A running server and the paths of its functions' sockets."""

    def __init__(self, tmp_path: Path, functions: dict[str, PciFunction], **kwargs) -> None:
        self.server = Server(**kwargs)
        self.functions = functions
        self.paths = {}
        for name, function in functions.items():
            self.paths[name] = tmp_path / f"{name}.sock"
            self.server.add_function(function, self.paths[name])
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"handle_signals": False}, daemon=True)
        self.thread.start()

    def connect(self, name: str = "dev", **kwargs) -> Client:
        return Client(self.paths[name], **kwargs)

    def sync(self) -> None:
        """Wait until the loop has run everything queued so far."""
        done = threading.Event()
        self.server.call_soon(done.set)
        assert done.wait(5)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


def open_fds() -> set[int]:
    """This process's open fds, after closing the ones only garbage still holds (so
    that numbers are not reused between two snapshots)."""
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}
