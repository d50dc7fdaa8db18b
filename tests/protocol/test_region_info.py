"""DEVICE_GET_REGION_INFO: sizes, flags, bad indices and argsz."""

import errno

from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import (
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
)

RW = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE


def test_regions_of_the_testdev(dev):
    _, _, client = dev
    assert client.region_info(0) == (RW, 0x1000, 0)
    for index in (1, 2, 3, 4, 5, 6, 8):
        assert client.region_info(index) == (0, 0, 0)
    assert client.region_info(7) == (RW, 256, 0)


def test_reply_fits_what_qemu_reserved(dev):
    _, _, client = dev
    for argsz in (32, 64):
        reply = client.request(Command.DEVICE_GET_REGION_INFO,
                               wire.REGION_INFO.pack(argsz, 0, 0, 0, 0, 0))
        assert wire.HEADER_SIZE + len(reply.payload) <= wire.HEADER_SIZE + argsz
        assert wire.REGION_INFO.unpack(reply.payload)[0] == 32


def test_bar_sizes_are_powers_of_two(dev):
    _, _, client = dev
    for index in range(6):
        size = client.region_info(index)[1]
        assert size & (size - 1) == 0


def test_bad_region_info(dev):
    _, _, client = dev
    assert client.errno_of(Command.DEVICE_GET_REGION_INFO,
                           wire.REGION_INFO.pack(32, 0, 9, 0, 0, 0)) == errno.EINVAL
    assert client.errno_of(Command.DEVICE_GET_REGION_INFO,
                           wire.REGION_INFO.pack(31, 0, 0, 0, 0, 0)) == errno.EINVAL
    assert client.errno_of(Command.DEVICE_GET_REGION_INFO, b"\0" * 16) == errno.EINVAL
