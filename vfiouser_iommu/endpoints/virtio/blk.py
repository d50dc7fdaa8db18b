"""virtio-blk (virtio 1.2 section 5.2) over a raw image file.

Capacity is the file's size in 512-byte sectors (a partial last sector is not part of
the disk). Requests IN, OUT, FLUSH and GET_ID are served; every other type is answered
VIRTIO_BLK_S_UNSUPP (section 5.2.6.1).

Choices where the spec leaves one:
- VIRTIO_BLK_F_FLUSH is offered; when the driver does not accept it the device is
  write-through (fdatasync after every OUT), so completed writes are always on the file
  when the driver believes they are.
- A request whose data length is not a multiple of 512, that reaches past the capacity,
  that is larger than SIZE_MAX * SEG_MAX, whose header is short, or whose data buffers
  fault (DmaError) completes with VIRTIO_BLK_S_IOERR; OUT on a read-only disk too.
- A request with no writable byte for its status, or whose status byte faults, cannot
  be completed honestly (the driver would read a stale status): the device needs a reset.
- GET_ID answers the image file's base name, cut to 20 bytes, NUL-padded.
- `queues=N` request queues (VIRTIO_BLK_F_MQ), default 4; Linux uses one per vCPU, up
  to N, each with its own MSI-X vector.

How data moves (docs/performance.md): the data buffers of a request are translated as
one scatter-gather list (`DmaView.map_sg`) into views of guest RAM, and the file is read
or written straight into or out of them with one `preadv`/`pwritev`: no copy through
Python bytes. The event loop first tries the call with RWF_NOWAIT (served from the page
cache, it cannot block); what would block and every fdatasync go to the device's
`IoWorker` thread, and the request completes when it is done
(`DeviceContext.complete_soon`). Where the file system refuses RWF_NOWAIT for buffered
writes, they run on the loop (measured: 1.5-2x the write+fsync and mixed IOPS of
handing each to the worker, docs/performance.md) until one takes longer than
`SLOW_WRITE`; writes then go to the worker for `WORKER_WRITES_FOR`. A read of
`SPLIT_READ` bytes or more is split: the worker reads the first half while the loop
reads the second, so that both cores copy. The worker runs
jobs in order, so a FLUSH covers every write that completed before it. A device reset
waits for the worker first. Buffers that are not plain guest RAM (an MSI page, say)
are copied through the `DmaView` instead, synchronously.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable

from ...memory import DmaError, DmaView
from .device import DetachedContext, DeviceNeedsReset, VirtioDevice
from .layouts import VIRTIO_BLK_REQ, virtio_blk_config
from .virtqueue import DescriptorChain, pieces
from .worker import IoWorker

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
CLASS_STORAGE_SCSI = 0x010000  # what QEMU's virtio-blk-pci reports

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
QUEUE_SIZE = 256  # as QEMU's virtio-blk: seg_max 254 lets Linux send 1 MiB in few requests
SEG_MAX = QUEUE_SIZE - 2  # header and status take two descriptors
SIZE_MAX = 1 << 20
MAX_REQUEST = SEG_MAX * SIZE_MAX
HEADER_SIZE = VIRTIO_BLK_REQ.size
DEFAULT_QUEUES = 4
SPLIT_READ = 256 << 10   # bytes: reads this large are split between loop and worker
SLOW_WRITE = 0.002        # seconds: an inline buffered write slower than this blocked
WORKER_WRITES_FOR = 1.0   # seconds writes then go to the worker
MAX_QUEUES = 64

# The worker's answer to a job: (status, data bytes moved)
Outcome = tuple[int, int]


class _Request:
    """Where a request completes: its queue and head, and its status byte (address, and
    a view of it once the data buffers were mapped with it)."""

    __slots__ = ("queue", "head", "status_addr", "status_view")

    def __init__(self, queue: int, head: int, status_addr: int) -> None:
        self.queue = queue
        self.head = head
        self.status_addr = status_addr
        self.status_view: memoryview | None = None

    def write_status(self, dma: DmaView, status: int) -> None:
        """The status byte, after the data (DeviceNeedsReset if it faults)."""
        view = self.status_view
        if view is not None:
            view[0] = status
            return
        try:
            dma.write(self.status_addr, bytes((status,)))
        except DmaError as e:
            raise DeviceNeedsReset(f"status of request {self.head}: {e}") from None


class _RequestError(Exception):
    """The request fails with VIRTIO_BLK_S_IOERR; `written` data bytes were written."""

    def __init__(self, why: str, written: int = 0):
        super().__init__(why)
        self.written = written


class VirtioBlk(VirtioDevice):
    """A block device backed by a raw image file."""

    device_id = VIRTIO_ID_BLOCK
    class_code = CLASS_STORAGE_SCSI
    queue_max_size = QUEUE_SIZE
    name = "virtio-blk"

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 queues: int = DEFAULT_QUEUES) -> None:
        super().__init__()
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"queues={queues}: 1..{MAX_QUEUES}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self.num_queues = queues
        self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        self.capacity = os.fstat(self.fd).st_size // SECTOR_SIZE
        self.serial = os.path.basename(self.path).encode()[:VIRTIO_BLK_ID_BYTES]
        self._config = _config(self.capacity, queues)
        self.worker = IoWorker(f"{self.name} {os.path.basename(self.path)}")
        self._generation = 0          # bumped by reset: completions from before are dropped
        self._nowait_writes = True    # until the file system refuses RWF_NOWAIT writes
        self._writes_to_worker_until = 0.0  # after a slow inline write (time.monotonic)

    def close(self) -> None:
        self.worker.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def device_features(self) -> int:
        features = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
                    | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
                    | 1 << VIRTIO_BLK_F_MQ)
        return features | (1 << VIRTIO_BLK_F_RO if self.readonly else 0)

    def config(self) -> bytes:
        return self._config

    def quiesce(self) -> None:
        self.worker.quiesce()

    def reset(self) -> None:
        self.quiesce()
        self._generation += 1
        super().reset()

    # -- requests (section 5.2.6) -------------------------------------------------------------
    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int | None:
        data_room = chain.writable_length - 1
        if data_room < 0:
            raise DeviceNeedsReset(f"request {chain.head} has no status byte")
        ((status_addr, _),) = pieces(chain.writable, data_room, 1)
        request = _Request(queue, chain.head, status_addr)
        try:
            req_type, sector = self._header(chain, dma)
            serve = _REQUESTS.get(req_type)
            if serve is None:
                status, written = VIRTIO_BLK_S_UNSUPP, 0
            else:
                written = serve(self, sector, chain, dma, request)
                if written is None:
                    return None
                status = VIRTIO_BLK_S_OK
        except _RequestError as e:
            log.info("%s: request %d failed: %s", self.name, chain.head, e)
            status, written = VIRTIO_BLK_S_IOERR, e.written
        request.write_status(dma, status)
        return written + 1

    def _header(self, chain: DescriptorChain, dma: DmaView) -> tuple[int, int]:
        readable = chain.readable
        try:
            if readable and readable[0][1] >= HEADER_SIZE:
                raw = dma.read(readable[0][0], HEADER_SIZE)
            elif chain.readable_length >= HEADER_SIZE:
                raw = b"".join(dma.read(a, n) for a, n in pieces(readable, 0, HEADER_SIZE))
            else:
                raise _RequestError("header shorter than 16 bytes")
        except DmaError as e:
            raise _RequestError(f"header: {e}") from None
        req_type, _reserved, sector = VIRTIO_BLK_REQ.unpack(raw)
        return req_type, sector

    def _range(self, sector: int, length: int) -> int:
        """The file offset of a data transfer, once it is known to fit the disk."""
        if length % SECTOR_SIZE or length > MAX_REQUEST:
            raise _RequestError(f"data length {length:#x}")
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            raise _RequestError(f"sectors {sector}+{length // SECTOR_SIZE} past {self.capacity}")
        return sector * SECTOR_SIZE

    # -- later completion ----------------------------------------------------------------------
    def _defer(self, job: Callable[[], Outcome], dma: DmaView, request: _Request) -> None:
        """Run `job` in the worker; complete the request on the loop with its outcome."""
        generation = self._generation
        if isinstance(self.context, DetachedContext):  # no transport: unit tests
            self._finish(request, dma, generation, job())
            return
        self.worker.submit(job, lambda outcome: self._finish(request, dma, generation, outcome),
                           self.context.call_soon)

    def _finish(self, request: _Request, dma: DmaView, generation: int,
                outcome: Outcome) -> None:
        """On the loop: status byte, then the chain back to the driver."""
        if generation != self._generation:
            return  # the device was reset meanwhile: the driver forgot this request
        status, written = outcome
        if status != VIRTIO_BLK_S_OK:
            log.info("%s: request %d failed", self.name, request.head)
        try:
            request.write_status(dma, status)
        except DeviceNeedsReset as e:
            self.context.needs_reset(str(e))
            return
        self.context.complete_soon(request.queue, request.head, written + 1)

    # -- IN / OUT / FLUSH / GET_ID --------------------------------------------------------------
    def _in(self, sector: int, chain: DescriptorChain, dma: DmaView,
            request: _Request) -> int | None:
        length = chain.writable_length - 1
        pos = self._range(sector, length)
        try:
            # the data and the status byte after it, in one translation call
            views = dma.map_sg(chain.writable, write=True)
        except DmaError as e:
            raise _RequestError(str(e)) from None
        if views is None:
            return self._in_copied(list(pieces(chain.writable, 0, length)), pos, dma)
        last = views.pop()
        request.status_view = last[len(last) - 1:]
        if len(last) > 1:
            views.append(last[:len(last) - 1])
        if length >= SPLIT_READ and not isinstance(self.context, DetachedContext):
            return self._in_split(views, pos, length, dma, request)
        try:
            done = _nowait(os.preadv, self.fd, views, pos)
        except OSError as e:
            raise _RequestError(str(e)) from None
        if done == length:
            return length
        rest = _advance(views, done)
        self._defer(lambda: _transfer(os.preadv, self.fd, rest, pos + done, done), dma,
                    request)
        return None

    def _in_split(self, views: list[memoryview], pos: int, length: int, dma: DmaView,
                  request: _Request) -> None:
        """A large read in two halves at once, each on its own core: the worker reads the
        first half while the loop reads the second (RWF_NOWAIT; what would block goes
        to the worker after the first half). The request completes with the last."""
        half = length // 2 & ~(SECTOR_SIZE - 1)
        first, second = _take(views, half), _advance(views, half)
        fd, generation, call_soon = self.fd, self._generation, self.context.call_soon
        first_outcome: list[Outcome] = []
        second_pending = [False]

        def first_done(outcome: Outcome) -> None:  # on the loop, after this method
            if second_pending[0]:
                first_outcome.append(outcome)
            else:
                self._finish(request, dma, generation,
                             outcome if outcome[0] != VIRTIO_BLK_S_OK else (outcome[0], length))

        self.worker.submit(lambda: _transfer(os.preadv, fd, first, pos, 0), first_done,
                           call_soon)
        try:
            done = _nowait(os.preadv, fd, second, pos + half)
        except OSError:
            done = 0  # the worker meets the error again and reports it
        if done == length - half:
            return None
        second_pending[0] = True
        rest = _advance(second, done)

        def second_done(outcome: Outcome) -> None:
            status, moved = outcome
            if first_outcome[0][0] != VIRTIO_BLK_S_OK:
                outcome = first_outcome[0]
            elif status == VIRTIO_BLK_S_OK:
                outcome = (status, length)
            else:
                outcome = (status, half + moved)
            self._finish(request, dma, generation, outcome)

        self.worker.submit(lambda: _transfer(os.preadv, fd, rest, pos + half + done, done),
                           second_done, call_soon)
        return None

    def _in_copied(self, spans: list[tuple[int, int]], pos: int, dma: DmaView) -> int:
        """IN into buffers that are not plain RAM: through the DmaView, synchronously."""
        done = 0
        for addr, n in spans:
            try:
                data = os.pread(self.fd, n, pos + done)
                if len(data) != n:
                    raise _RequestError("image file shorter than its capacity", done)
                dma.write(addr, data)
            except (OSError, DmaError) as e:
                raise _RequestError(str(e), done) from None
            done += n
        return done

    def _out(self, sector: int, chain: DescriptorChain, dma: DmaView,
             request: _Request) -> int | None:
        if self.readonly:
            raise _RequestError("write to a read-only disk")
        length = chain.readable_length - HEADER_SIZE
        pos = self._range(sector, length)
        spans = list(pieces(chain.readable, HEADER_SIZE, length))
        try:
            views = dma.map_sg(spans, write=False)
            if views is None:  # not plain RAM: copy it out through the DmaView
                views = [memoryview(b"".join(dma.read(a, n) for a, n in spans))]
        except DmaError as e:
            raise _RequestError(str(e)) from None
        write_through = not self.driver_features >> VIRTIO_BLK_F_FLUSH & 1
        done = 0
        if self._nowait_writes and not write_through:
            try:
                done = _nowait(os.pwritev, self.fd, views, pos)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise _RequestError(str(e)) from None
                self._nowait_writes = False
            if done == length:
                return 0
        if not (self._nowait_writes or write_through or done) \
                and time.monotonic() >= self._writes_to_worker_until:
            return self._out_inline(views, pos)
        rest = _advance(views, done)

        def job() -> Outcome:
            status, _ = _transfer(os.pwritev, self.fd, rest, pos + done, done)
            if status == VIRTIO_BLK_S_OK and write_through:
                status, _ = _sync(self.fd)
            return status, 0

        self._defer(job, dma, request)
        return None

    def _out_inline(self, views: list[memoryview], pos: int) -> int:
        """A buffered write on the loop, where the file system cannot say whether it
        would block: it lands in the page cache in microseconds. One that takes longer
        (the kernel throttling dirty pages) sends writes to the worker for a while."""
        started = time.monotonic()
        status, done = _transfer(os.pwritev, self.fd, views, pos, 0)
        took = time.monotonic() - started
        if took > SLOW_WRITE:
            log.info("%s: a write took %.1f ms: writes go to the worker for %.0f s",
                     self.name, took * 1e3, WORKER_WRITES_FOR)
            self._writes_to_worker_until = started + took + WORKER_WRITES_FOR
        if status != VIRTIO_BLK_S_OK:
            raise _RequestError(f"write at {pos:#x} failed", 0)
        return 0

    def _flush(self, sector: int, chain: DescriptorChain, dma: DmaView,
               request: _Request) -> int | None:
        if self.readonly:
            return 0
        fd = self.fd
        self._defer(lambda: _sync(fd), dma, request)
        return None

    def _get_id(self, sector: int, chain: DescriptorChain, dma: DmaView,
                request: _Request) -> int:
        ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:chain.writable_length - 1]
        done = 0
        for addr, n in pieces(chain.writable, 0, len(ident)):
            try:
                dma.write(addr, ident[done:done + n])
            except DmaError as e:
                raise _RequestError(str(e), done) from None
            done += n
        return done


_REQUESTS: dict[int, Callable[..., int | None]] = {
    VIRTIO_BLK_T_IN: VirtioBlk._in,
    VIRTIO_BLK_T_OUT: VirtioBlk._out,
    VIRTIO_BLK_T_FLUSH: VirtioBlk._flush,
    VIRTIO_BLK_T_GET_ID: VirtioBlk._get_id,
}


def _nowait(call, fd: int, views: list[memoryview], pos: int) -> int:
    """`call(fd, views, pos, RWF_NOWAIT)`: the bytes it moved without blocking (0 when
    it would block)."""
    try:
        return call(fd, views, pos, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views after their first `n` bytes."""
    if n == 0:
        return views
    for i, view in enumerate(views):
        if n < len(view):
            return [view[n:], *views[i + 1:]]
        n -= len(view)
    return []


def _take(views: list[memoryview], n: int) -> list[memoryview]:
    """The views of the first `n` bytes."""
    taken = []
    for view in views:
        if n <= 0:
            break
        taken.append(view[:n] if n < len(view) else view)
        n -= len(view)
    return taken


def _transfer(call, fd: int, views: list[memoryview], pos: int, done: int) -> Outcome:
    """In the worker: `call` (os.preadv or os.pwritev) until every view is moved."""
    while views:
        try:
            n = call(fd, views, pos)
        except OSError as e:
            log.info("virtio-blk: I/O at %#x failed: %s", pos, e)
            return VIRTIO_BLK_S_IOERR, done
        if n <= 0:
            log.info("virtio-blk: image file shorter than its capacity at %#x", pos)
            return VIRTIO_BLK_S_IOERR, done
        views = _advance(views, n)
        pos += n
        done += n
    return VIRTIO_BLK_S_OK, done


def _sync(fd: int) -> Outcome:
    try:
        os.fdatasync(fd)
    except OSError as e:
        log.info("virtio-blk: fdatasync failed: %s", e)
        return VIRTIO_BLK_S_IOERR, 0
    return VIRTIO_BLK_S_OK, 0


def _config(capacity: int, queues: int) -> bytes:
    values = {sc.name: 0 for sc in virtio_blk_config.subcons if sc.name}
    values.update(capacity=capacity, size_max=SIZE_MAX, seg_max=SEG_MAX,
                  geometry=dict(cylinders=0, heads=0, sectors=0), blk_size=SECTOR_SIZE,
                  topology=dict(physical_block_exp=0, alignment_offset=0, min_io_size=0,
                                opt_io_size=0),
                  num_queues=queues)
    return virtio_blk_config.build(values)
