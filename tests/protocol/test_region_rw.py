"""REGION_READ / REGION_WRITE: config space, BAR registers, posted writes in order."""

import errno
import struct

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.session import MAX_DATA_XFER_SIZE
from vfiouser_iommu.vfio_user.wire import FLAG_NO_REPLY, Command


def _access(offset, index, count, data=b""):
    return wire.REGION_ACCESS.pack(offset, index, count) + data


def test_whole_config_space_in_one_read(dev):
    _, _, client = dev
    reply = client.request(Command.REGION_READ, _access(0, 7, 256))
    assert wire.HEADER_SIZE + len(reply.payload) <= 32 + 256
    config = reply.payload[16:]
    assert struct.unpack_from("<HH", config) == (0x1B36, 0x0005)
    assert config[0x0A:0x0C] == b"\xff\x00"  # class as QEMU's testdev: subclass 0xff, base 0


def test_config_write_is_filtered_by_masks(dev):
    _, _, client = dev
    client.region_write(7, 0, b"\xff\xff\xff\xff")          # IDs are read-only
    assert client.region_read(7, 0, 4) == bytes.fromhex("361b0500")
    client.region_write(7, 4, b"\x06\x00")                   # MEM | MASTER
    assert client.region_read(7, 4, 2) == b"\x06\x00"
    client.region_write(7, 0x30, b"\xff\xff\xff\xff")      # no ROM: reads back 0
    assert client.region_read(7, 0x30, 4) == bytes(4)


def test_bar_registers_round_trip(dev):
    _, _, client = dev
    client.writel(0, testdev.DMA_GVA_LO, 0x1234_5000)
    client.writel(0, testdev.DMA_LEN, 64)
    assert client.readl(0, testdev.DMA_GVA_LO) == 0x1234_5000
    assert client.readl(0, testdev.DMA_LEN) == 64
    assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE


def test_posted_writes_are_applied_in_order_before_later_reads(dev):
    _, _, client = dev
    for value in range(1, 200):
        client.writel(0, testdev.DMA_LEN, value, posted=True)
    client.expect_no_reply(0.05)
    assert client.readl(0, testdev.DMA_LEN) == 199


def test_zero_count_succeeds(dev):
    _, _, client = dev
    assert client.region_read(0, 0x2000, 0) == b""


def test_bad_accesses(dev):
    _, _, client = dev
    cases = [
        (Command.REGION_READ, _access(0, 9, 4), errno.EINVAL),            # no region 9
        (Command.REGION_READ, _access(0, 1, 4), errno.EINVAL),            # empty BAR1
        (Command.REGION_READ, _access(0xFFC, 0, 8), errno.EINVAL),        # runs off BAR0
        (Command.REGION_READ, _access(0x1000, 0, 4), errno.EINVAL),       # starts past it
        (Command.REGION_READ, _access(2**64 - 4, 0, 8), errno.EINVAL),    # wraps
        (Command.REGION_READ, _access(0, 7, 257), errno.EINVAL),          # past config
        (Command.REGION_READ, _access(0, 0, 4, b"xx"), errno.EINVAL),     # read with data
        (Command.REGION_READ, b"\0" * 12, errno.EINVAL),                  # short
        (Command.REGION_READ, _access(0, 0, MAX_DATA_XFER_SIZE + 1), errno.E2BIG),
        (Command.REGION_WRITE, _access(0, 0, 4, b"\0" * 3), errno.EINVAL),  # short data
        (Command.REGION_WRITE, _access(0, 0, 4, b"\0" * 5), errno.EINVAL),  # long data
        (Command.REGION_WRITE, _access(0x1000, 0, 4, b"\0" * 4), errno.EINVAL),
    ]
    for cmd, payload, expected in cases:
        assert client.errno_of(cmd, payload) == expected, payload[:16].hex()
    assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE


def test_failed_posted_write_gets_no_reply(dev):
    _, _, client = dev
    client.send(Command.REGION_WRITE, _access(0x1000, 0, 4, bytes(4)), flags=FLAG_NO_REPLY)
    client.expect_no_reply()
    assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE


def test_odd_sized_bar_accesses_are_split(dev):
    _, function, client = dev
    client.writel(0, testdev.DMA_LEN, 0x11223344)
    assert client.region_read(0, testdev.DMA_LEN, 4) == bytes.fromhex("44332211")
    # 1-, 2- and 8-byte accesses reach the testdev's 4-byte-only registers as QEMU's
    # would: ignored writes, zero reads.
    assert client.region_read(0, testdev.DMA_LEN, 2) == bytes(2)
    client.region_write(0, testdev.DMA_LEN, b"\0")
    assert client.readl(0, testdev.DMA_LEN) == 0x11223344
