"""DEVICE_GET_IRQ_INFO: counts per index, eventfd flags, bad indices."""

import errno

from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import IRQ_INFO_EVENTFD, Command, PciIrq


def test_irq_info_of_the_testdev(dev):
    _, _, client = dev
    assert client.irq_info(PciIrq.INTX)[1] == 0     # interrupt pin 0, like QEMU's
    assert client.irq_info(PciIrq.MSI)[1] == 0
    assert client.irq_info(PciIrq.MSIX) == (IRQ_INFO_EVENTFD, 4)
    assert client.irq_info(PciIrq.ERR)[1] == 0      # signalling ERR would stop the VM
    assert client.irq_info(PciIrq.REQ)[1] == 0


def test_bad_irq_info(dev):
    _, _, client = dev
    assert client.errno_of(Command.DEVICE_GET_IRQ_INFO, wire.IRQ_INFO.pack(16, 0, 5, 0)) \
        == errno.EINVAL
    assert client.errno_of(Command.DEVICE_GET_IRQ_INFO, wire.IRQ_INFO.pack(8, 0, 0, 0)) \
        == errno.EINVAL
    assert client.errno_of(Command.DEVICE_GET_IRQ_INFO, b"\0" * 8) == errno.EINVAL
