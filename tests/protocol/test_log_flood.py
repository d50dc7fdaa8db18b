"""A client sending only bad messages cannot fill the disk (issue 14 item 5).

Before the throttle, every rejected message logged a WARNING: 384 k lines for 1 M
fuzzed messages.
"""

import errno
import logging
import re

from vfiouser_iommu.vfio_user.logthrottle import LOG_BURST
from vfiouser_iommu.vfio_user.wire import HEADER, TYPE_REPLY, Command

N = 1000


def _warnings(caplog):
    return [r for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("vfiouser_iommu")]


def test_rejected_messages_are_logged_a_burst_at_a_time(served, caplog):
    caplog.set_level(logging.WARNING)
    s = served()
    client = s.connect()
    client.negotiate()
    for i in range(N):
        # three kinds: a short DEVICE_GET_INFO, an unknown command, an unsolicited reply
        client.send(Command.DEVICE_GET_INFO, b"\0" * 4, msg_id=i)
        client.send(0x7000 + i, b"", msg_id=i)
        client.send_raw(HEADER.pack(i, Command.DMA_WRITE, 16, TYPE_REPLY, 0))
    for i in range(N):
        assert client.wait_reply(i).error_no == errno.EINVAL
        assert client.wait_reply(i).error_no == errno.ENOSYS
    assert client.device_info()[1] == 9
    assert len(_warnings(caplog)) <= 3 * LOG_BURST
    client.close()
    s.sync()
    s.sync()
    summaries = [re.match(r".*: (\d+) more .* suppressed$", r.getMessage())
                 for r in _warnings(caplog)]
    counted = sum(int(m[1]) for m in summaries if m)
    assert counted == 3 * (N - LOG_BURST), summaries


def test_a_reconnecting_client_gets_no_fresh_burst(served, caplog):
    caplog.set_level(logging.WARNING)
    s = served()
    for _ in range(5):
        with s.connect() as client:
            for _i in range(LOG_BURST):
                assert client.errno_of(Command.DEVICE_GET_INFO, b"") == errno.EINVAL
    s.sync()
    failures = [r for r in _warnings(caplog) if "failed" in r.getMessage()]
    assert len(failures) == LOG_BURST
