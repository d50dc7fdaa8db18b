"""DMA_WRITE / DMA_READ from us to the client, for addresses outside the DMA maps."""

import errno
import os
import select
import threading

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.endpoints.testdev import IommuTestDev
from vfiouser_iommu.memory import GuestMemory
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import HEADER, TYPE_REPLY, Command, DmaLayout, PciIrq

DOORBELL = 0x2800_0000  # an address the client never maps (an interrupt controller's page)


def _arm(client, addr, length, msix_vector=None):
    client.writel(0, testdev.DMA_GVA_LO, addr & 0xFFFFFFFF)
    client.writel(0, testdev.DMA_GVA_HI, addr >> 32)
    client.writel(0, testdev.DMA_GPA_LO, addr & 0xFFFFFFFF)
    client.writel(0, testdev.DMA_GPA_HI, addr >> 32)
    client.writel(0, testdev.DMA_LEN, length)
    if msix_vector is not None:
        client.writel(0, testdev.DMA_MSIX, testdev.MSIX_ENABLE | msix_vector)
    client.writel(0, testdev.DMA_DBELL, 1)


def _connect(s, layout=DmaLayout.SPEC):
    client = s.connect(memory=GuestMemory.ram(DOORBELL, 0x1000), dma_layout=layout)
    client.negotiate()
    return client


def test_write_outside_the_maps_becomes_a_dma_write_message(served):
    for layout in DmaLayout:
        s = served(dma_layout=layout)
        client = _connect(s, layout)
        _arm(client, DOORBELL, 8)
        client.readl(0, testdev.DMA_TRIGGER)   # serves the DMA_WRITE while waiting
        [request] = client.dma_requests
        assert request.cmd == Command.DMA_WRITE
        if layout is DmaLayout.PACKED:
            assert request.size == 32 + 8      # the packed struct's count <= size - 32
        assert client.memory.read(DOORBELL, 8) == testdev.pattern(8)
        # The write was posted; the physical read-back of an unmapped address fails.
        assert client.readl(0, testdev.DMA_RESULT) == testdev.ERR_RD_FAIL
        client.close()
        s.stop()


def test_interrupt_waits_for_the_dma_write_reply(served):
    s = served()
    client = _connect(s)
    cap = 0x48  # PM at 0x40, MSI-X next
    assert client.region_read(7, cap, 1) == b"\x11"
    client.region_write(7, cap + 2, b"\x03\x80")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 0, 1, wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER,
                    fds=[efd])
    _arm(client, DOORBELL, 4, msix_vector=0)
    read_id = client.send(Command.REGION_READ, wire.REGION_ACCESS.pack(0, 0, 4))
    request = client.recv_message()
    assert request.cmd == Command.DMA_WRITE
    reply = client.recv_message()
    assert reply.msg_id == read_id            # the device answered without waiting for us
    assert not select.select([efd], [], [], 0.2)[0], "interrupt before the data landed"
    client.send_raw(HEADER.pack(request.msg_id, Command.DMA_WRITE, 16, TYPE_REPLY, 0))
    assert select.select([efd], [], [], 2)[0]
    os.close(efd)


def test_dma_read_message_round_trip(served):
    for layout in DmaLayout:
        s = served(dma_layout=layout)
        client = _connect(s, layout)
        client.memory.write(DOORBELL + 8, b"doorbell")
        session = s.server.ports[s.paths["dev"]].session
        got = []
        done = threading.Event()

        def start(session=session, got=got, done=done):
            session.dma_read(DOORBELL + 8, 8, lambda e, d: (got.append((e, d)), done.set()))

        s.server.call_soon(start)
        assert client.poll(2) == 1
        assert done.wait(2)
        assert got == [(0, b"doorbell")]
        client.close()
        s.stop()


def test_failed_dma_read_reports_the_errno(served):
    s = served()
    client = _connect(s)
    session = s.server.ports[s.paths["dev"]].session
    got = []
    s.server.call_soon(lambda: session.dma_read(0x10, 4, lambda e, d: got.append(e)))
    assert client.poll(2) == 1
    s.sync()
    assert got == [errno.EFAULT]


def test_device_read_of_unmapped_memory_fails_without_blocking(served):
    s = served({"dev": IommuTestDev()})
    client = _connect(s)
    client.writel(0, testdev.DMA_CTRL, testdev.DIR_READ << 1)
    _arm(client, DOORBELL, 4)
    client.readl(0, testdev.DMA_TRIGGER)
    assert client.readl(0, testdev.DMA_RESULT) == testdev.ERR_TX_FAIL
    assert not client.dma_requests


def test_disconnect_with_dma_in_flight_leaves_nothing(served):
    s = served()
    client = _connect(s)
    _arm(client, DOORBELL, 4)
    client.send(Command.REGION_READ, wire.REGION_ACCESS.pack(0, 0, 4))
    assert client.recv_message().cmd == Command.DMA_WRITE
    client.close()
    s.sync()
    port = s.server.ports[s.paths["dev"]]
    assert port.session is None
    assert s.functions["dev"].memory.fallback is None


def test_endpoint_interrupt_waits_for_its_dma_write_on_the_iommus_connection(served):
    """Issue 14 item 3. Behind the IOMMU, an endpoint's DMA goes through the IOMMU's
    GuestMemory, so outside the maps it leaves as a DMA_WRITE on the IOMMU's
    connection, while the endpoint's MSI-X eventfd belongs to its own connection. The
    interrupt must still wait for that DMA_WRITE's reply (PCI ordering)."""
    from vfiouser_iommu.iommu_pci import IommuFunction

    iommu = IommuFunction()
    dev = IommuTestDev()
    dev.set_dma_view(iommu.iommu.dma_view(0x10))
    s = served({"iommu": iommu, "dev": dev})
    iommu_client = s.connect("iommu", memory=GuestMemory.ram(DOORBELL, 0x1000))
    iommu_client.negotiate()
    iommu_client.region_write(0, 0x10, (1).to_bytes(8, "little"))   # ddtp: Bare
    client = _connect(s)
    cap = 0x48
    assert client.region_read(7, cap, 1) == b"\x11"
    client.region_write(7, cap + 2, b"\x03\x80")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 0, 1, wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER,
                    fds=[efd])
    _arm(client, DOORBELL, 4, msix_vector=0)
    client.readl(0, testdev.DMA_TRIGGER)
    request = iommu_client.recv_message()        # the testdev's data, on the IOMMU's socket
    assert request.cmd == Command.DMA_WRITE
    assert not client.dma_requests
    assert not select.select([efd], [], [], 0.3)[0], "interrupt before the data landed"
    iommu_client.send_raw(HEADER.pack(request.msg_id, Command.DMA_WRITE, 16, TYPE_REPLY, 0))
    assert select.select([efd], [], [], 2)[0]
    os.close(efd)


def test_interrupt_does_not_wait_for_dma_writes_issued_after_it(served):
    """The hold covers the writes issued before the interrupt, not later ones: under a
    steady stream of DMA writes the interrupt must not be held for ever."""
    s = served()
    client = _connect(s)
    cap = 0x48
    client.region_write(7, cap + 2, b"\x03\x80")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 0, 1, wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER,
                    fds=[efd])
    _arm(client, DOORBELL, 4, msix_vector=0)
    client.send(Command.REGION_READ, wire.REGION_ACCESS.pack(0, 0, 4))
    first = client.recv_message()
    assert first.cmd == Command.DMA_WRITE
    client.recv_message()                          # the REGION_READ's reply
    client.writel(0, testdev.DMA_MSIX, 0)          # the next DMA raises no interrupt
    _arm(client, DOORBELL, 4)
    client.send(Command.REGION_READ, wire.REGION_ACCESS.pack(0, 0, 4))
    second = client.recv_message()
    assert second.cmd == Command.DMA_WRITE
    client.recv_message()
    client.send_raw(HEADER.pack(first.msg_id, Command.DMA_WRITE, 16, TYPE_REPLY, 0))
    assert select.select([efd], [], [], 2)[0], "held behind a write issued after it"
    client.send_raw(HEADER.pack(second.msg_id, Command.DMA_WRITE, 16, TYPE_REPLY, 0))
    os.close(efd)


def test_interrupt_held_for_a_write_that_never_lands_is_dropped(served):
    """The IOMMU's client leaves with the endpoint's DMA_WRITE unanswered: that data is
    not in guest memory, so the endpoint's completion interrupt must not fire."""
    from vfiouser_iommu.iommu_pci import IommuFunction

    iommu = IommuFunction()
    dev = IommuTestDev()
    dev.set_dma_view(iommu.iommu.dma_view(0x10))
    s = served({"iommu": iommu, "dev": dev})
    iommu_client = s.connect("iommu", memory=GuestMemory.ram(DOORBELL, 0x1000))
    iommu_client.negotiate()
    iommu_client.region_write(0, 0x10, (1).to_bytes(8, "little"))   # ddtp: Bare
    client = _connect(s)
    client.region_write(7, 0x48 + 2, b"\x03\x80")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 0, 1, wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER,
                    fds=[efd])
    _arm(client, DOORBELL, 4, msix_vector=0)
    client.readl(0, testdev.DMA_TRIGGER)
    assert iommu_client.recv_message().cmd == Command.DMA_WRITE
    iommu_client.close()
    s.sync()
    s.sync()
    assert not select.select([efd], [], [], 0.3)[0]
    assert client.readl(0, testdev.DMA_RESULT) is not None   # the endpoint still serves
    os.close(efd)
