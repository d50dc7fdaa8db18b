"""VERSION: negotiation, the capabilities JSON, and what must come first."""

import errno
import json

from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import Command

# The VERSION request QEMU 11.1 sends (seen live, 214 bytes with the header).
QEMU_CAPS = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
             b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
             b'"pgsize": 4096}, "write_multiple": true}}\0')


def _version(json_bytes=b"{}\0", major=0, minor=0):
    return wire.VERSION.pack(major, minor) + json_bytes


def test_qemu_request_gets_a_reply_no_larger_than_itself(served):
    client = served().connect()
    body = _version(QEMU_CAPS)
    reply = client.request(Command.VERSION, body)
    assert wire.HEADER_SIZE + len(reply.payload) <= wire.HEADER_SIZE + len(body)
    major, minor = wire.VERSION.unpack_from(reply.payload)
    assert (major, minor) == (0, 0)
    raw = reply.payload[4:]
    assert raw.endswith(b"\0")
    caps = json.loads(raw[:-1])["capabilities"]
    assert caps["max_msg_fds"] == 8
    assert caps["max_data_xfer_size"] == 1 << 20
    assert "write_multiple" not in caps


def test_short_request_gets_a_reply_that_fits(served):
    s = served()
    for body in (_version(b""), _version(b"{}\0")):
        with s.connect() as client:
            reply = client.request(Command.VERSION, body)
            assert len(reply.payload) <= len(body)


def test_commands_before_version_are_einval(served):
    client = served().connect()
    assert client.errno_of(Command.DEVICE_GET_INFO, wire.DEVICE_INFO.pack(16, 0, 0, 0)) \
        == errno.EINVAL
    client.negotiate()
    assert client.device_info()[1] == 9


def test_second_version_is_einval(dev):
    _, _, client = dev
    assert client.errno_of(Command.VERSION, _version()) == errno.EINVAL


def test_bad_versions(served):
    cases = [
        (b"\0\0", errno.EINVAL),                              # shorter than major/minor
        (_version(major=1), errno.ENOTSUP),                  # another major
        (_version(b'{"capabilities":{}}'), errno.EINVAL),    # JSON not NUL-terminated
        (_version(b"{nope\0"), errno.EINVAL),                 # not JSON
        (_version(b"[]\0"), errno.EINVAL),                    # not an object
        (_version(b'{"capabilities":{"max_msg_fds":-1}}\0'), errno.EINVAL),
        (_version(b'{"capabilities":{"max_data_xfer_size":"1M"}}\0'), errno.EINVAL),
    ]
    s = served()
    for body, expected in cases:
        client = s.connect()
        assert client.errno_of(Command.VERSION, body) == expected, body
        client.negotiate()  # a failed VERSION leaves the connection usable
        client.close()


def test_version_with_fds_is_einval(served):
    import os

    client = served().connect()
    r, w = os.pipe()
    try:
        assert client.errno_of(Command.VERSION, _version(), fds=[r]) == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_deeply_nested_json_is_einval_not_eio(served):
    """Issue 14 item 2: json.loads raised RecursionError, which became EIO and a
    traceback ("bug handling command VERSION")."""
    s = served()
    client = s.connect()
    nested = b"[" * 1000 + b"]" * 1000 + b"\0"
    assert client.errno_of(Command.VERSION, _version(nested)) == errno.EINVAL
    nested_objects = b'{"a":' * 100000 + b"1" + b"}" * 100000 + b"\0"
    assert client.errno_of(Command.VERSION, _version(nested_objects)) == errno.EINVAL
    client.negotiate()
