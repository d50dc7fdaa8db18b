"""DEVICE_RESET: header-only reply, device and config state back to power-on."""

import errno

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import Command


def test_reset_reply_is_header_only_and_state_is_reset(dev):
    _, _, client = dev
    client.writel(0, testdev.DMA_LEN, 64)
    client.writel(0, testdev.DMA_DBELL, 1)
    client.region_write(7, 4, b"\x06\x00")
    reply = client.wait_reply(client.send(Command.DEVICE_RESET))
    assert not reply.is_error
    assert reply.size == wire.HEADER_SIZE  # QEMU reserved 16 bytes
    assert client.readl(0, testdev.DMA_LEN) == 0
    assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert client.region_read(7, 4, 2) == bytes(2)


def test_reset_with_payload_is_einval(dev):
    _, _, client = dev
    assert client.errno_of(Command.DEVICE_RESET, b"\0" * 4) == errno.EINVAL
