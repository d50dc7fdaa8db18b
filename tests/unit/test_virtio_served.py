"""virtio-blk served over a real vfio-user socket by our server: guest RAM is a memfd
handed over with DMA_MAP, the notify is a posted region write, and completion arrives
as an MSI-X eventfd — the path QEMU's vfio-user-pci client takes."""

from __future__ import annotations

import mmap
import os
import select
import threading

import pytest

from vfiouser_iommu.endpoints import build_endpoint
from vfiouser_iommu.endpoints.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from vfiouser_iommu.endpoints.virtio.layouts import VIRTIO_BLK_REQ
from vfiouser_iommu.endpoints.virtio.pci import BAR_STRUCTURES, NOTIFY_CFG
from vfiouser_iommu.endpoints.virtio.testing import VirtioPciDriver
from vfiouser_iommu.memory import GuestMemory
from vfiouser_iommu.vfio_user import Server, wire
from vfiouser_iommu.vfio_user.client import Client

RAM, RAM_SIZE = 0x8000_0000, 1 << 20


class OverSocket:
    """The function as the driver double reaches it: through the client."""

    def __init__(self, client: Client, function):
        self.client = client
        self.config = function.config  # only to find the MSI-X capability's offset

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return self.client.region_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        posted = index == BAR_STRUCTURES and offset >= NOTIFY_CFG
        self.client.region_write(index, offset, data, posted=posted)


@pytest.fixture
def served(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(64 * 512))
    function = build_endpoint("virtio-blk", {"disk": str(image)})
    server = Server()
    server.add_function(function, tmp_path / "blk.sock")
    thread = threading.Thread(target=server.serve_forever, kwargs={"handle_signals": False},
                              daemon=True)
    thread.start()
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM_SIZE)
    mm = mmap.mmap(fd, RAM_SIZE, flags=mmap.MAP_SHARED)
    memory = GuestMemory()
    memory.add_region(RAM, memoryview(mm))
    client = Client(tmp_path / "blk.sock")
    client.negotiate()
    client.dma_map(RAM, RAM_SIZE, fd)
    yield function, client, memory, image
    client.close()
    server.stop()
    thread.join(5)
    memory.clear()[0].buffer.release()
    mm.close()
    os.close(fd)


def test_read_request_completes_with_msix(served):
    function, client, memory, image = served
    drv = VirtioPciDriver(OverSocket(client, function), memory, RAM)
    assert drv.negotiate()
    drv.enable_msix()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(2, 1, 1, wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER,
                    fds=[efd])
    assert drv.setup_queue(0, vector=1) == 1
    drv.driver_ok()
    hdr, data, status = RAM + 0x10000, RAM + 0x20000, RAM + 0x10100
    memory.write(hdr, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_IN, 0, 3))
    drv.add_chain(0, [(hdr, 16, False), (data, 4096, True), (status, 1, True)])
    drv.notify(0)
    assert select.select([efd], [], [], 5)[0], "no MSI-X for the used buffer"
    os.close(efd)
    assert drv.used(0) == [(0, 4097)]
    assert memory.read_u8(status) == VIRTIO_BLK_S_OK
    assert memory.read(data, 4096) == image.read_bytes()[3 * 512:3 * 512 + 4096]
