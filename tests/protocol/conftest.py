"""Protocol tests: our vfio-user server in a thread, driven by the test client.

Each test gets a fresh server with an `iommu-testdev` function (and more on request),
a client connected to it, and a memfd standing in for guest RAM. Tests assert exact
errnos and that the server keeps serving afterwards.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest

from vfiouser_iommu.endpoints.testdev import IommuTestDev
from vfiouser_iommu.memory import GuestMemory
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


@pytest.fixture
def served(tmp_path):
    instances = []

    def start(functions: dict[str, PciFunction] | None = None, **kwargs) -> Served:
        s = Served(tmp_path, functions or {"dev": IommuTestDev()}, **kwargs)
        instances.append(s)
        return s

    yield start
    for s in instances:
        s.stop()


@pytest.fixture
def ram():
    """A memfd of RAM_SIZE bytes, with a GuestMemory over a mapping of it."""
    import mmap

    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM_SIZE)
    mm = mmap.mmap(fd, RAM_SIZE, flags=mmap.MAP_SHARED)
    memory = GuestMemory()
    memory.add_region(RAM_BASE, memoryview(mm))
    yield fd, memory
    memory.clear()[0].buffer.release()
    mm.close()
    os.close(fd)


@pytest.fixture
def dev(served):
    """(served, function, negotiated client) for one iommu-testdev."""
    s = served()
    client = s.connect()
    client.negotiate()
    yield s, s.functions["dev"], client
    client.close()
