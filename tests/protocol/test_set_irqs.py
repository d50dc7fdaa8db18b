"""DEVICE_SET_IRQS: MSI-X eventfds as QEMU assigns them, triggers, masks, bad input."""

import errno
import os
import select

from served import open_fds

from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.vfio_user import wire
from vfiouser_iommu.vfio_user.wire import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    Command,
    PciIrq,
)

EVENTFD_TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER
MSIX_ENABLE = b"\x03\x80"  # control word: enable, table size 4 (read-only part)


def _fired(fd, timeout=1.0) -> bool:
    if not select.select([fd], [], [], timeout)[0]:
        return False
    return os.eventfd_read(fd) > 0


def _set(client, index, start, count, flags, fds=(), data=b"", argsz=None):
    payload = wire.IRQ_SET.pack(argsz or 20 + len(data), flags, index, start, count) + data
    return client.errno_of(Command.DEVICE_SET_IRQS, payload, fds=fds)


def _msix_on(client):
    cap = client.region_read(7, 0x34, 1)[0]
    while client.region_read(7, cap, 1)[0] != 0x11:
        cap = client.region_read(7, cap + 1, 1)[0]
    client.region_write(7, cap + 2, MSIX_ENABLE)


def test_qemu_sequence_then_completion_interrupt(dev):
    _, _, client = dev
    _msix_on(client)
    client.set_irqs(PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER)                 # enabled, no vectors
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 2, 1, EVENTFD_TRIGGER, fds=[efd])
    client.writel(0, testdev.DMA_MSIX, testdev.MSIX_ENABLE | 2)
    client.writel(0, testdev.DMA_DBELL, 1)
    client.readl(0, testdev.DMA_TRIGGER)                                 # bad length, still done
    assert _fired(efd)
    os.close(efd)


def test_trigger_action_signals_the_eventfd(dev):
    _, _, client = dev
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    client.set_irqs(PciIrq.MSIX, 0, 4, EVENTFD_TRIGGER, fds=efds)
    client.set_irqs(PciIrq.MSIX, 1, 1, NONE_TRIGGER)
    client.set_irqs(PciIrq.MSIX, 0, 4, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                    data=b"\0\0\0\1")
    assert [_fired(fd, 0.2) for fd in efds] == [False, True, False, True]
    for fd in efds:
        os.close(fd)


def test_masked_vector_is_not_signalled(dev):
    _, _, client = dev
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER, fds=[efd])
    client.set_irqs(PciIrq.MSIX, 0, 1, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK)
    client.set_irqs(PciIrq.MSIX, 0, 1, NONE_TRIGGER)
    assert not _fired(efd, 0.1)
    client.set_irqs(PciIrq.MSIX, 0, 1, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK)
    client.set_irqs(PciIrq.MSIX, 0, 1, NONE_TRIGGER)
    assert _fired(efd)
    os.close(efd)


def test_vector_raised_before_its_eventfd_is_pending_then_delivered(dev):
    _, function, client = dev
    _msix_on(client)
    client.writel(0, testdev.DMA_MSIX, testdev.MSIX_ENABLE | 1)
    client.writel(0, testdev.DMA_DBELL, 1)
    client.readl(0, testdev.DMA_TRIGGER)
    assert client.region_read(0, 0xC00, 8) == (2).to_bytes(8, "little")   # PBA bit 1
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    client.set_irqs(PciIrq.MSIX, 1, 1, EVENTFD_TRIGGER, fds=[efd])
    assert _fired(efd)
    assert client.region_read(0, 0xC00, 8) == bytes(8)
    os.close(efd)


def test_disable_all_closes_the_eventfds(dev):
    s, _, client = dev
    before = open_fds()
    efds = [os.eventfd(0) for _ in range(4)]
    client.set_irqs(PciIrq.MSIX, 0, 4, EVENTFD_TRIGGER, fds=efds)
    for fd in efds:
        os.close(fd)
    s.sync()
    assert len(open_fds() - before) == 4
    client.set_irqs(PciIrq.MSIX, 0, 0, NONE_TRIGGER)
    s.sync()
    assert open_fds() <= before


def test_reassigning_a_vector_closes_the_old_eventfd(dev):
    s, _, client = dev
    before = open_fds()
    for _ in range(3):
        efd = os.eventfd(0)
        client.set_irqs(PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER, fds=[efd])
        os.close(efd)
    s.sync()
    assert len(open_fds() - before) == 1


def test_bad_set_irqs(dev):
    s, _, client = dev
    efd = os.eventfd(0)
    cases = [
        (dict(index=2, start=0, count=1, flags=IRQ_SET_DATA_EVENTFD), errno.EINVAL),  # no action
        (dict(index=2, start=0, count=1, flags=IRQ_SET_ACTION_TRIGGER), errno.EINVAL),  # no data
        (dict(index=2, start=0, count=1,
              flags=EVENTFD_TRIGGER | IRQ_SET_DATA_BOOL), errno.EINVAL),               # two types
        (dict(index=2, start=0, count=1,
              flags=NONE_TRIGGER | IRQ_SET_ACTION_MASK), errno.EINVAL),                # two actions
        (dict(index=2, start=0, count=1, flags=EVENTFD_TRIGGER | 0x40), errno.EINVAL),
        (dict(index=5, start=0, count=1, flags=NONE_TRIGGER), errno.EINVAL),           # index
        (dict(index=2, start=4, count=1, flags=NONE_TRIGGER), errno.EINVAL),           # start
        (dict(index=2, start=3, count=2, flags=NONE_TRIGGER), errno.EINVAL),           # overrun
        (dict(index=2, start=1, count=0xFFFFFFFF, flags=NONE_TRIGGER), errno.EINVAL),  # wraps
        (dict(index=2, start=1, count=0, flags=NONE_TRIGGER), errno.EINVAL),           # count 0
        (dict(index=2, start=0, count=0, flags=EVENTFD_TRIGGER), errno.EINVAL),
        (dict(index=0, start=0, count=1, flags=NONE_TRIGGER), errno.EINVAL),           # no INTx
        (dict(index=3, start=0, count=1, flags=NONE_TRIGGER), errno.EINVAL),           # no ERR
        (dict(index=2, start=0, count=2, flags=EVENTFD_TRIGGER, fds=[efd]), errno.EINVAL),
        (dict(index=2, start=0, count=1, flags=NONE_TRIGGER, fds=[efd]), errno.EINVAL),
        (dict(index=2, start=0, count=1,
              flags=IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_MASK, fds=[efd]), errno.EINVAL),
        (dict(index=2, start=0, count=2,
              flags=IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, data=b"\1"), errno.EINVAL),
        (dict(index=2, start=0, count=1, flags=NONE_TRIGGER, data=b"\1"), errno.EINVAL),
        (dict(index=2, start=0, count=1, flags=NONE_TRIGGER, argsz=19), errno.EINVAL),
    ]
    before = open_fds()
    for kwargs, expected in cases:
        assert _set(client, **kwargs) == expected, kwargs
    s.sync()
    assert open_fds() <= before
    assert client.errno_of(Command.DEVICE_SET_IRQS, b"\0" * 16) == errno.EINVAL
    os.close(efd)


def test_fd_that_is_not_an_eventfd_is_refused_and_closed(dev):
    """A pipe as an "eventfd" would block the loop once full: EINVAL, nothing kept."""
    s, _, client = dev
    efd = os.eventfd(0)
    r, w = os.pipe()
    before = open_fds()
    assert _set(client, PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER, fds=[w]) == errno.EINVAL
    assert _set(client, PciIrq.MSIX, 0, 2, EVENTFD_TRIGGER, fds=[efd, w]) == errno.EINVAL
    s.sync()
    assert open_fds() <= before
    client.set_irqs(PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER, fds=[efd])     # still serving
    client.set_irqs(PciIrq.MSIX, 0, 1, NONE_TRIGGER)
    assert _fired(efd)
    for fd in (efd, r, w):
        os.close(fd)


def test_saturated_eventfd_never_blocks_the_loop(dev):
    """A counter at its maximum means "already pending": the signal is not waited for."""
    s, _, client = dev
    efd = os.eventfd(0)                                     # blocking, as a hostile client's
    os.eventfd_write(efd, (1 << 64) - 2)                    # the largest value it can hold
    client.set_irqs(PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER, fds=[efd])
    try:
        for _ in range(3):
            client.send(Command.DEVICE_SET_IRQS,
                        wire.IRQ_SET.pack(20, NONE_TRIGGER, PciIrq.MSIX, 0, 1),
                        flags=wire.FLAG_NO_REPLY)
        s.sync()
        assert _set(client, PciIrq.MSIX, 0, 1, NONE_TRIGGER) == 0
    finally:
        os.set_blocking(efd, False)
        os.eventfd_read(efd)                                # unblocks a stuck server
        os.close(efd)
