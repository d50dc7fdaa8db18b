"""Protocol tests: our vfio-user server in a thread, driven by the test client.

Each test gets a fresh server with an `iommu-testdev` function (and more on request),
a client connected to it, and a memfd standing in for guest RAM. Tests assert exact
errnos and that the server keeps serving afterwards.
"""

from __future__ import annotations

import os

import pytest
from served import RAM_BASE, RAM_SIZE, Served

from vfiouser_iommu.endpoints.testdev import IommuTestDev
from vfiouser_iommu.memory import GuestMemory
from vfiouser_iommu.pci.function import PciFunction


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
