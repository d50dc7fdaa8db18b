"""INTx over SET_IRQS: level-triggered, automasked, re-signalled after UNMASK."""

import os
import select

from vfiouser_iommu.pci.config import BarSpec, PciIdentity
from vfiouser_iommu.pci.function import PciFunction
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import PciIrq


class LineDevice(PciFunction):
    """Writing BAR0 offset 0 sets the INTx line to the value written."""

    def __init__(self):
        super().__init__(PciIdentity(0x1234, 0x0001, 0xFF0000), {0: BarSpec(0x100)},
                         interrupt_pin=1)

    def mmio_write(self, bar, offset, size, value):
        if offset == 0:
            self.set_intx(bool(value))


def _fired(fd, timeout=0.5) -> bool:
    if not select.select([fd], [], [], timeout)[0]:
        return False
    return os.eventfd_read(fd) > 0


def test_intx_is_automasked_until_unmask(served):
    s = served({"dev": LineDevice()})
    client = s.connect()
    client.negotiate()
    assert client.irq_info(PciIrq.INTX)[1] == 1
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.INTX, 0, 1,
                    wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER, fds=[efd])
    client.writel(0, 0, 1)
    assert _fired(efd)
    client.writel(0, 0, 1)                      # still masked: no second edge
    assert not _fired(efd, 0.1)
    client.set_irqs(PciIrq.INTX, 0, 1, wire.IRQ_SET_DATA_NONE | wire.IRQ_SET_ACTION_UNMASK)
    assert _fired(efd)                          # still asserted: signalled again
    client.writel(0, 0, 0)
    client.set_irqs(PciIrq.INTX, 0, 1, wire.IRQ_SET_DATA_NONE | wire.IRQ_SET_ACTION_UNMASK)
    assert not _fired(efd, 0.1)                 # deasserted: nothing
    assert client.region_read(7, 0x06, 1)[0] & 0x08 == 0
    os.close(efd)


def test_interrupt_disable_suppresses_intx(served):
    s = served({"dev": LineDevice()})
    client = s.connect()
    client.negotiate()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.INTX, 0, 1,
                    wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER, fds=[efd])
    client.region_write(7, 0x04, b"\x00\x04")
    client.writel(0, 0, 1)
    assert not _fired(efd, 0.1)
    assert client.region_read(7, 0x06, 1)[0] & 0x08    # status still shows the line
    os.close(efd)
