"""virtio-blk over a raw image file: IN/OUT/FLUSH/GET_ID, bounds and length checks,
read-only disks, flush reaching the file, and faulting DMA reported as the spec says."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from vfiouser_iommu.endpoints import build_endpoint
from vfiouser_iommu.endpoints.virtio import VirtioBlk, VirtioPciFunction
from vfiouser_iommu.endpoints.virtio.blk import (
    SEG_MAX,
    SLOW_WRITE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vfiouser_iommu.endpoints.virtio.layouts import VIRTIO_BLK_REQ, virtio_blk_config
from vfiouser_iommu.endpoints.virtio.pci import DEVICE_CFG, DEVICE_NEEDS_RESET
from vfiouser_iommu.endpoints.virtio.testing import FakeHost, VirtioPciDriver
from vfiouser_iommu.memory import DmaError, DmaView
from vfiouser_iommu.pci.function import IRQ_MSIX

RAM = 0x8000_0000
HDR = RAM + 0x10000
STATUS = RAM + 0x10100
DATA = RAM + 0x20000
SECTORS = 64


class FaultingView(DmaView):
    """Identity, except that [lo, hi) faults like an IOMMU would."""

    def __init__(self, memory, lo: int, hi: int):
        super().__init__(memory)
        self.lo, self.hi = lo, hi

    def pieces(self, addr, length, write, attrs):
        if addr < self.hi and self.lo < addr + length:
            raise DmaError(addr, length, write, "translation fault")
        return [(addr, length, None)]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2) + b"tail")  # partial sector ignored
    return path


def make(image, *, readonly=False, features=None):
    fn = VirtioPciFunction(VirtioBlk(image, readonly=readonly))
    fn.memory.add_region(RAM, bytearray(0x80000))
    host = FakeHost()
    fn.attach(host)
    drv = VirtioPciDriver(fn, fn.memory, RAM)
    assert drv.negotiate(features)
    drv.setup_queue(0)
    drv.driver_ok()
    return fn, host, drv


def request(host, drv, req_type, sector=0, *, out=b"", in_len=0):
    """Submit one request with its header, data and status; (status, used len)."""
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(req_type, 0, sector))
    drv.mem.write_u8(STATUS, 0xFF)
    bufs = [(HDR, 16, False)]
    if out:
        drv.mem.write(DATA, out)
        bufs.append((DATA, len(out), False))
    if in_len:
        bufs.append((DATA, in_len, True))
    bufs.append((STATUS, 1, True))
    before = drv.used_idx(0)
    drv.add_chain(0, bufs)
    drv.notify(0)
    host.run()
    if drv.used_idx(0) == before:
        return None, None
    _, used_len = drv.used(0)[before]
    return drv.mem.read_u8(STATUS), used_len


def test_config_reports_capacity_in_sectors(image):
    fn, _, _ = make(image)
    raw = fn.region_read(0, DEVICE_CFG, virtio_blk_config.sizeof())
    cfg = virtio_blk_config.parse(raw)
    assert cfg.capacity == SECTORS
    assert cfg.blk_size == 512 and cfg.seg_max == SEG_MAX


def test_read(image):
    fn, host, drv = make(image)
    status, used = request(host, drv, VIRTIO_BLK_T_IN, 2, in_len=1024)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1025)
    assert drv.mem.read(DATA, 1024) == image.read_bytes()[1024:2048]


def test_write_then_flush_reaches_the_file(image, monkeypatch):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    fn, host, drv = make(image)
    payload = os.urandom(1536)
    assert request(host, drv, VIRTIO_BLK_T_OUT, 5, out=payload) == (VIRTIO_BLK_S_OK, 1)
    assert synced == []  # FLUSH negotiated: the write stays in the page cache
    assert request(host, drv, VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [fn.device.fd]
    assert image.read_bytes()[5 * 512:8 * 512] == payload


def test_without_flush_negotiated_writes_are_write_through(image, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    fn, host, drv = make(image)
    assert drv.negotiate(drv.device_features() & ~(1 << VIRTIO_BLK_F_FLUSH))
    drv.setup_queue(0)
    drv.driver_ok()
    assert request(host, drv, VIRTIO_BLK_T_OUT, 0, out=bytes(512)) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [fn.device.fd]


def test_get_id_is_the_image_name(image):
    fn, host, drv = make(image)
    assert request(host, drv, VIRTIO_BLK_T_GET_ID, in_len=20) == (VIRTIO_BLK_S_OK, 21)
    assert drv.mem.read(DATA, 20) == b"disk.img".ljust(20, b"\0")


@pytest.mark.parametrize("req_type", [2, 10, 11, 13, 14, 0xFFFFFFFF])
def test_other_types_are_unsupported(image, req_type):
    fn, host, drv = make(image)
    assert request(host, drv, req_type, in_len=512) == (VIRTIO_BLK_S_UNSUPP, 1)


@pytest.mark.parametrize("sector, length", [(SECTORS, 512), (SECTORS - 1, 1024),
                                            (1 << 63, 512), (0, 100)])
def test_reads_outside_the_disk_or_misaligned_fail(image, sector, length):
    fn, host, drv = make(image)
    assert request(host, drv, VIRTIO_BLK_T_IN, sector, in_len=length) == (VIRTIO_BLK_S_IOERR, 1)


def test_write_past_the_end_fails_and_leaves_the_file(image):
    before = image.read_bytes()
    fn, host, drv = make(image)
    status, _ = request(host, drv, VIRTIO_BLK_T_OUT, SECTORS - 1, out=bytes(1024))
    assert status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before


def test_short_header_fails(image):
    fn, host, drv = make(image)
    drv.add_chain(0, [(HDR, 8, False), (STATUS, 1, True)])
    drv.notify(0)
    host.run()
    assert drv.mem.read_u8(STATUS) == VIRTIO_BLK_S_IOERR


def test_header_split_across_descriptors(image):
    fn, host, drv = make(image)
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_IN, 0, 1))
    drv.add_chain(0, [(HDR, 5, False), (HDR + 5, 11, False), (DATA, 300, True),
                      (DATA + 300, 213, True)])
    drv.notify(0)
    host.run()
    assert drv.used(0) == [(0, 513)]
    assert drv.mem.read(DATA + 512, 1) == bytes([VIRTIO_BLK_S_OK])
    assert drv.mem.read(DATA, 512) == image.read_bytes()[512:1024]


def test_read_only_disk(image):
    before = image.read_bytes()
    fn, host, drv = make(image, readonly=True)
    assert drv.device_features() >> VIRTIO_BLK_F_RO & 1
    assert request(host, drv, VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    assert request(host, drv, VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert request(host, drv, VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes() == before


def test_faulting_data_buffer_gives_ioerr_and_the_device_goes_on(image):
    fn, host, drv = make(image)
    fn.set_dma_view(FaultingView(fn.memory, DATA, DATA + 0x1000))
    assert request(host, drv, VIRTIO_BLK_T_IN, 0, in_len=512) == (VIRTIO_BLK_S_IOERR, 1)
    assert request(host, drv, VIRTIO_BLK_T_OUT, 0, out=bytes(512))[0] == VIRTIO_BLK_S_IOERR
    fn.set_dma_view(DmaView(fn.memory))
    assert request(host, drv, VIRTIO_BLK_T_IN, 0, in_len=512) == (VIRTIO_BLK_S_OK, 513)
    assert not drv.status & DEVICE_NEEDS_RESET


def test_faulting_status_byte_needs_reset(image):
    fn, host, drv = make(image)
    drv.write("config_msix_vector", 2, 0)
    fn.set_dma_view(FaultingView(fn.memory, STATUS, STATUS + 1))
    status, used = request(host, drv, VIRTIO_BLK_T_FLUSH)
    assert used is None
    assert drv.status & DEVICE_NEEDS_RESET


def test_faulting_ring_needs_reset_then_reset_recovers(image):
    fn, host, drv = make(image)
    fn.set_dma_view(FaultingView(fn.memory, drv.queues[0].used, drv.queues[0].used + 8))
    request(host, drv, VIRTIO_BLK_T_FLUSH)
    assert drv.status & DEVICE_NEEDS_RESET
    fn.set_dma_view(DmaView(fn.memory))
    assert drv.negotiate()
    drv.setup_queue(0)
    drv.driver_ok()
    assert request(host, drv, VIRTIO_BLK_T_IN, 0, in_len=512) == (VIRTIO_BLK_S_OK, 513)


def test_chain_without_status_byte_needs_reset(image):
    fn, host, drv = make(image)
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.add_chain(0, [(HDR, 16, False)])
    drv.notify(0)
    host.run()
    assert drv.status & DEVICE_NEEDS_RESET


def test_build_from_options(image):
    fn = build_endpoint("virtio-blk", {"disk": str(image), "readonly": "on"})
    assert fn.device.readonly and fn.config.read_int(2, 2) == 0x1042
    for bad in ({}, {"disk": str(image), "readonly": "yes"}, {"disk": str(image), "x": "1"},
                {"disk": str(image) + ".missing"}):
        with pytest.raises(ValueError):
            build_endpoint("virtio-blk", bad)


# -- how the data moves: zero-copy, off the loop when it could block ------------------------------
class NoViews(DmaView):
    """Identity DMA whose buffers are never plain RAM (like MSI pages): bounce copies."""

    def map_sg(self, buffers, *, write, attrs=None):
        return None


def test_reads_go_straight_into_guest_memory(image, monkeypatch):
    monkeypatch.setattr(os, "pread", None)  # no copy through Python bytes
    fn, host, drv = make(image)
    assert request(host, drv, VIRTIO_BLK_T_IN, 3, in_len=2048) == (VIRTIO_BLK_S_OK, 2049)
    assert drv.mem.read(DATA, 2048) == image.read_bytes()[3 * 512:7 * 512]


def test_buffers_outside_plain_ram_are_copied(image):
    fn, host, drv = make(image)
    fn.set_dma_view(NoViews(fn.memory))
    assert request(host, drv, VIRTIO_BLK_T_IN, 1, in_len=1024) == (VIRTIO_BLK_S_OK, 1025)
    assert drv.mem.read(DATA, 1024) == image.read_bytes()[512:1536]
    payload = os.urandom(512)
    assert request(host, drv, VIRTIO_BLK_T_OUT, 9, out=payload) == (VIRTIO_BLK_S_OK, 1)
    assert request(host, drv, VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[9 * 512:10 * 512] == payload


def _blocking_when_nowait(real, served=0):
    """os.preadv/pwritev that would block with RWF_NOWAIT after `served` bytes."""
    def call(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            if not served:
                raise BlockingIOError
            first = memoryview(buffers[0])[:served]
            return real(fd, [first], offset)
        return real(fd, buffers, offset)
    return call


@pytest.mark.parametrize("served", [0, 512])
def test_a_read_that_would_block_finishes_in_the_worker(image, monkeypatch, served):
    threads = []
    real = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        threads.append(threading.current_thread())
        return _blocking_when_nowait(real, served)(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    fn, host, drv = make(image)
    assert request(host, drv, VIRTIO_BLK_T_IN, 4, in_len=1536) == (VIRTIO_BLK_S_OK, 1537)
    assert drv.mem.read(DATA, 1536) == image.read_bytes()[4 * 512:7 * 512]
    assert threads[0] is threading.main_thread() and threads[-1] is not threads[0]


def test_writes_run_inline_where_no_wait_is_refused_until_one_is_slow(image, monkeypatch):
    """RWF_NOWAIT refused (EOPNOTSUPP): buffered writes run on the loop, until one takes
    longer than SLOW_WRITE; the writes after it go to the worker."""
    calls = []
    real = os.pwritev

    def pwritev(fd, buffers, offset, flags=0):
        calls.append((threading.current_thread() is threading.main_thread(), flags))
        if flags & os.RWF_NOWAIT:
            raise OSError(errno.EOPNOTSUPP, "no")
        if len(calls) == 3:
            time.sleep(2 * SLOW_WRITE)  # the kernel throttled this one
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    fn, host, drv = make(image)
    for sector in (2, 3, 4):
        assert request(host, drv, VIRTIO_BLK_T_OUT, sector, out=bytes([sector]) * 512) == \
            (VIRTIO_BLK_S_OK, 1)
    assert calls == [(True, os.RWF_NOWAIT), (True, 0), (True, 0), (False, 0)]
    assert image.read_bytes()[1024:2560] == bytes([2]) * 512 + bytes([3]) * 512 + \
        bytes([4]) * 512


def test_flush_waits_in_the_worker_for_the_writes_before_it(image, monkeypatch):
    """A write the worker has not finished when FLUSH arrives is on the file before
    fdatasync runs (jobs run in order), and FLUSH completes only after fdatasync."""
    order = []
    gate = threading.Event()
    real_pwritev = os.pwritev

    def pwritev(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError
        gate.wait(5)
        order.append("write")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", lambda fd: order.append("sync"))
    fn, host, drv = make(image)
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_OUT, 0, 1))
    drv.mem.write(DATA, b"w" * 512)
    drv.mem.write_u8(STATUS, 0xFF)
    drv.add_chain(0, [(HDR, 16, False), (DATA, 512, False), (STATUS, 1, True)])
    flush_hdr, flush_status = HDR + 0x40, STATUS + 0x40
    drv.mem.write(flush_hdr, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.mem.write_u8(flush_status, 0xFF)
    drv.add_chain(0, [(flush_hdr, 16, False), (flush_status, 1, True)])
    drv.notify(0)
    host.soon.popleft()()  # one step: both requests are now with the worker
    assert drv.used_idx(0) == 0 and drv.mem.read_u8(flush_status) == 0xFF
    gate.set()
    host.run()
    assert order == ["write", "sync"]
    assert drv.used_idx(0) == 2 and drv.mem.read_u8(flush_status) == VIRTIO_BLK_S_OK
    assert image.read_bytes()[512:1024] == b"w" * 512


def test_reset_waits_for_work_in_flight_and_drops_its_completion(image, monkeypatch):
    gate = threading.Event()
    monkeypatch.setattr(os, "fdatasync", lambda fd: gate.wait(5))
    fn, host, drv = make(image)
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.mem.write_u8(STATUS, 0xFF)
    drv.add_chain(0, [(HDR, 16, False), (STATUS, 1, True)])
    drv.notify(0)
    host.soon.popleft()()
    assert fn.device.worker.busy
    threading.Timer(0.2, gate.set).start()
    drv.set_status(0)  # returns once the flush is done
    assert not fn.device.worker.busy
    host.run()
    assert drv.mem.read_u8(STATUS) == 0xFF and drv.used_idx(0) == 0


def test_queues_option_and_multiqueue(image):
    fn = build_endpoint("virtio-blk", {"disk": str(image), "queues": "2"})
    fn.memory.add_region(RAM, bytearray(0x80000))
    host = FakeHost()
    fn.attach(host)
    drv = VirtioPciDriver(fn, fn.memory, RAM)
    assert drv.device_features() >> VIRTIO_BLK_F_MQ & 1
    cfg = virtio_blk_config.parse(fn.region_read(0, DEVICE_CFG, virtio_blk_config.sizeof()))
    assert cfg.num_queues == 2 and drv.read("num_queues", 2) == 2
    assert drv.negotiate()
    drv.enable_msix()
    for q in (0, 1):
        assert drv.setup_queue(q, vector=1 + q) == 1 + q
    drv.driver_ok()
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_IN, 0, 0))
    drv.add_chain(1, [(HDR, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    drv.notify(1)
    host.run()
    assert drv.used(1) == [(0, 513)] and drv.used_idx(0) == 0
    assert host.irqs == [(IRQ_MSIX, 2)]
    for bad in ("0", "65", "two"):
        with pytest.raises(ValueError):
            build_endpoint("virtio-blk", {"disk": str(image), "queues": bad})


def test_a_notify_serves_only_its_queue(image):
    """With one queue per vCPU, a notify of one queue must not cost a look at the
    rings of the others."""
    class Recording(DmaView):
        def __init__(self, memory):
            super().__init__(memory)
            self.translated = []

        def pieces(self, addr, length, write, attrs):
            self.translated.append(addr)
            return super().pieces(addr, length, write, attrs)

    fn = build_endpoint("virtio-blk", {"disk": str(image), "queues": "2"})
    fn.memory.add_region(RAM, bytearray(0x80000))
    host = FakeHost()
    fn.attach(host)
    drv = VirtioPciDriver(fn, fn.memory, RAM)
    assert drv.negotiate()
    for q in (0, 1):
        drv.setup_queue(q)
    drv.driver_ok()
    host.run()
    view = Recording(fn.memory)
    fn.set_dma_view(view)
    drv.mem.write(HDR, VIRTIO_BLK_REQ.pack(VIRTIO_BLK_T_IN, 0, 0))
    drv.add_chain(1, [(HDR, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    drv.notify(1)
    host.run()
    assert drv.used(1) == [(0, 513)]
    q0 = drv.queues[0]
    assert not {q0.desc, q0.avail, q0.used} & set(view.translated)


@pytest.mark.parametrize("second_half_blocks", [False, True])
def test_a_large_read_is_split_between_worker_and_loop(image, monkeypatch, second_half_blocks):
    """Both halves run at once, on two threads; the request completes once both are in."""
    from vfiouser_iommu.endpoints.virtio import blk

    monkeypatch.setattr(blk, "SPLIT_READ", 2048)
    threads = []
    real = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        threads.append((threading.current_thread() is threading.main_thread(), offset))
        if flags & os.RWF_NOWAIT and second_half_blocks:
            raise BlockingIOError
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    fn, host, drv = make(image)
    assert request(host, drv, VIRTIO_BLK_T_IN, 8, in_len=4096) == (VIRTIO_BLK_S_OK, 4097)
    assert drv.mem.read(DATA, 4096) == image.read_bytes()[8 * 512:16 * 512]
    assert (False, 8 * 512) in threads  # the first half, in the worker
    second = 8 * 512 + 2048
    assert ((False, second) if second_half_blocks else (True, second)) in threads


def test_a_split_read_that_fails_in_its_first_half_fails(image, monkeypatch):
    from vfiouser_iommu.endpoints.virtio import blk

    monkeypatch.setattr(blk, "SPLIT_READ", 2048)
    real = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        if offset == 8 * 512:
            raise OSError(errno.EIO, "bad sector")
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    fn, host, drv = make(image)
    status, _ = request(host, drv, VIRTIO_BLK_T_IN, 8, in_len=4096)
    assert status == VIRTIO_BLK_S_IOERR
