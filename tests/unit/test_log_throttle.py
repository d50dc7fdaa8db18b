"""LogThrottle: a burst per kind per interval, then counts (issue 14 item 5)."""

import logging

from vfiouser_iommu.vfio_user.logthrottle import MAX_KINDS, LogThrottle


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _throttle(caplog, **kwargs):
    caplog.set_level(logging.INFO, logger="throttle-test")
    clock = Clock()
    return LogThrottle(logging.getLogger("throttle-test"), "dev", clock=clock, **kwargs), clock


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "throttle-test"]


def test_burst_then_counted_then_summarised_when_the_window_ends(caplog):
    throttle, clock = _throttle(caplog, burst=3, interval=60)
    for i in range(100):
        throttle.log("bad maps", logging.WARNING, "map %d failed", i)
    lines = _lines(caplog)
    assert lines[:2] == ["map 0 failed", "map 1 failed"]
    assert lines[2].startswith("map 2 failed (more like this suppressed for 60s)")
    assert len(lines) == 3
    assert throttle.suppressed() == 97
    clock.now = 61
    throttle.log("bad maps", logging.WARNING, "map %d failed", 100)
    assert _lines(caplog)[3:] == ["dev: 97 more bad maps suppressed", "map 100 failed"]


def test_kinds_are_counted_apart_and_flush_reports_them(caplog):
    throttle, _ = _throttle(caplog, burst=1)
    for _ in range(5):
        throttle.log("a", logging.WARNING, "a")
        throttle.log("b", logging.WARNING, "b")
    assert len(_lines(caplog)) == 2
    throttle.flush()
    assert _lines(caplog)[2:] == ["dev: 4 more a suppressed", "dev: 4 more b suppressed"]
    throttle.flush()
    assert len(_lines(caplog)) == 4
    # Flushing does not hand out a new burst: the window still runs.
    throttle.log("a", logging.WARNING, "a")
    assert len(_lines(caplog)) == 4


def test_distinct_kinds_are_bounded(caplog):
    throttle, _ = _throttle(caplog, burst=1)
    for i in range(10 * MAX_KINDS):
        throttle.log(f"kind {i}", logging.WARNING, "x")
    assert len(_lines(caplog)) == MAX_KINDS
