"""Message framing: bad headers, oversized and truncated messages, unknown commands."""

import errno
import os

from served import open_fds

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.session import MAX_MSG_SIZE
from vfiouser_iommu.vfio_user.wire import FLAG_NO_REPLY, HEADER, TYPE_REPLY, Command


def _closed(client) -> bool:
    client.sock.settimeout(2)
    try:
        return client.sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_unknown_and_unsupported_commands_are_enosys(dev):
    _, _, client = dev
    for cmd in (0, 6, 14, 15, 16, 17, 18, 99, 0xFFFF):
        assert client.errno_of(cmd, b"\0" * 8) == errno.ENOSYS, cmd
    assert client.device_info()[1] == 9


def test_unknown_command_with_no_reply_flag_gets_no_reply(dev):
    _, _, client = dev
    client.send(99, b"", flags=FLAG_NO_REPLY)
    client.expect_no_reply()


def test_header_size_below_16_closes_the_connection(dev):
    _, _, client = dev
    client.send_raw(HEADER.pack(1, Command.DEVICE_GET_INFO, 8, 0, 0))
    assert _closed(client)


def test_unknown_message_type_closes_the_connection(dev):
    _, _, client = dev
    client.send_raw(HEADER.pack(1, Command.DEVICE_GET_INFO, 16, 2, 0))
    assert _closed(client)


def test_oversized_message_is_drained_and_answered_e2big(dev):
    _, _, client = dev
    size = MAX_MSG_SIZE + 1
    msg_id = 77
    client.send_raw(HEADER.pack(msg_id, Command.REGION_WRITE, size, 0, 0) + b"\xa5" * (size - 16))
    reply = client.wait_reply(msg_id)
    assert reply.is_error and reply.error_no == errno.E2BIG
    assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE


def test_oversized_message_carrying_fds_closes_them(dev):
    s, _, client = dev
    before = open_fds()
    efd = os.eventfd(0)
    size = MAX_MSG_SIZE + 100
    client.send_raw(HEADER.pack(5, Command.DMA_MAP, size, 0, 0), fds=[efd])
    client.send_raw(b"\0" * (size - 16))
    os.close(efd)
    assert client.wait_reply(5).error_no == errno.E2BIG
    s.sync()
    assert open_fds() <= before


def test_message_split_across_many_sends(dev):
    _, _, client = dev
    msg = HEADER.pack(9, Command.REGION_READ, 32, 0, 0) + wire.REGION_ACCESS.pack(0x10, 0, 4)
    for b in msg:
        client.send_raw(bytes([b]))
    reply = client.wait_reply(9)
    assert not reply.is_error and reply.payload[16:] == (testdev.RESULT_IDLE).to_bytes(4, "little")


def test_many_messages_in_one_send(dev):
    _, _, client = dev
    msgs = b"".join(HEADER.pack(i, Command.REGION_READ, 32, 0, 0)
                    + wire.REGION_ACCESS.pack(0x10, 0, 4) for i in range(300))
    client.send_raw(msgs)
    for i in range(300):
        assert client.wait_reply(i).msg_id == i


def test_unsolicited_reply_is_dropped(dev):
    _, _, client = dev
    client.send_raw(HEADER.pack(1234, Command.DMA_WRITE, 16, TYPE_REPLY, 0))
    client.expect_no_reply()
    assert client.device_info()[1] == 9


def test_truncated_message_then_disconnect_leaves_nothing(served, ram):
    s = served()
    function = s.functions["dev"]
    before = open_fds()
    client = s.connect()
    client.negotiate()
    fd, _ = ram
    client.dma_map(0x8000_0000, 0x1000, fd)
    client.send_raw(HEADER.pack(3, Command.REGION_READ, 32, 0, 0) + b"\0" * 4)
    client.close()
    s.sync()
    s.sync()
    assert not function.memory.regions
    assert open_fds() <= before
    again = s.connect()
    again.negotiate()
    assert again.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    again.close()


def test_too_many_fds_closes_the_connection(dev):
    s, _, client = dev
    efds = [os.eventfd(0) for _ in range(20)]
    client.send_raw(wire.pack_header(1, Command.DEVICE_SET_IRQS, 36, 0)
                    + wire.IRQ_SET.pack(20, 0x24, 2, 0, 4), fds=efds)
    for fd in efds:
        os.close(fd)
    assert _closed(client)
