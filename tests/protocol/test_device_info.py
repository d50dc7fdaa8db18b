"""DEVICE_GET_INFO: what QEMU requires (PCI flag, >= 9 regions, >= 3 IRQs), bad sizes."""

import errno

from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, Command


def test_device_info(dev):
    _, _, client = dev
    reply = client.request(Command.DEVICE_GET_INFO, wire.DEVICE_INFO.pack(16, 0, 0, 0))
    assert wire.HEADER_SIZE + len(reply.payload) <= 32
    argsz, flags, regions, irqs = wire.DEVICE_INFO.unpack(reply.payload)
    assert (argsz, flags, regions, irqs) == (16, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, 9, 5)


def test_bad_device_info(dev):
    _, _, client = dev
    assert client.errno_of(Command.DEVICE_GET_INFO, b"\0" * 12) == errno.EINVAL
    assert client.errno_of(Command.DEVICE_GET_INFO, wire.DEVICE_INFO.pack(15, 0, 0, 0)) \
        == errno.EINVAL
