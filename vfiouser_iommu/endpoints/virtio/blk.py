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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ...memory import DmaError, DmaView
from .device import DeviceNeedsReset, VirtioDevice
from .layouts import VIRTIO_BLK_REQ, virtio_blk_config
from .virtqueue import DescriptorChain, pieces

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
CLASS_STORAGE_SCSI = 0x010000  # what QEMU's virtio-blk-pci reports

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
QUEUE_SIZE = 128
SEG_MAX = QUEUE_SIZE - 2  # header and status take two descriptors
SIZE_MAX = 1 << 20
MAX_REQUEST = SEG_MAX * SIZE_MAX
HEADER_SIZE = VIRTIO_BLK_REQ.size


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

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.readonly = readonly
        self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        self.capacity = os.fstat(self.fd).st_size // SECTOR_SIZE
        self.serial = os.path.basename(self.path).encode()[:VIRTIO_BLK_ID_BYTES]
        self._config = _config(self.capacity)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def device_features(self) -> int:
        features = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
                    | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH)
        return features | (1 << VIRTIO_BLK_F_RO if self.readonly else 0)

    def config(self) -> bytes:
        return self._config

    # -- requests (section 5.2.6) -------------------------------------------------------------
    def handle(self, queue: int, chain: DescriptorChain, dma: DmaView) -> int:
        data_room = chain.writable_length - 1
        if data_room < 0:
            raise DeviceNeedsReset(f"request {chain.head} has no status byte")
        try:
            req_type, sector = self._header(chain, dma)
            serve = _REQUESTS.get(req_type)
            if serve is None:
                status, written = VIRTIO_BLK_S_UNSUPP, 0
            else:
                status, written = VIRTIO_BLK_S_OK, serve(self, sector, chain, dma)
        except _RequestError as e:
            log.info("%s: request %d failed: %s", self.name, chain.head, e)
            status, written = VIRTIO_BLK_S_IOERR, e.written
        self._write_status(chain, dma, data_room, status)
        return written + 1

    def _header(self, chain: DescriptorChain, dma: DmaView) -> tuple[int, int]:
        if chain.readable_length < HEADER_SIZE:
            raise _RequestError("header shorter than 16 bytes")
        raw = _gather(chain, dma, 0, HEADER_SIZE)
        req_type, _reserved, sector = VIRTIO_BLK_REQ.unpack(raw)
        return req_type, sector

    def _write_status(self, chain: DescriptorChain, dma: DmaView, at: int, status: int) -> None:
        ((addr, _),) = pieces(chain.writable, at, 1)
        try:
            dma.write(addr, bytes([status]))
        except DmaError as e:
            raise DeviceNeedsReset(f"status of request {chain.head}: {e}") from None

    def _range(self, sector: int, length: int) -> int:
        """The file offset of a data transfer, once it is known to fit the disk."""
        if length % SECTOR_SIZE or length > MAX_REQUEST:
            raise _RequestError(f"data length {length:#x}")
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            raise _RequestError(f"sectors {sector}+{length // SECTOR_SIZE} past {self.capacity}")
        return sector * SECTOR_SIZE

    def _in(self, sector: int, chain: DescriptorChain, dma: DmaView) -> int:
        length = chain.writable_length - 1
        pos = self._range(sector, length)
        done = 0
        for addr, n in _chunks(pieces(chain.writable, 0, length)):
            try:
                data = os.pread(self.fd, n, pos + done)
                if len(data) != n:
                    raise _RequestError("image file shorter than its capacity", done)
                dma.write(addr, data)
            except (OSError, DmaError) as e:
                raise _RequestError(str(e), done) from None
            done += n
        return done

    def _out(self, sector: int, chain: DescriptorChain, dma: DmaView) -> int:
        if self.readonly:
            raise _RequestError("write to a read-only disk")
        length = chain.readable_length - HEADER_SIZE
        pos = self._range(sector, length)
        done = 0
        for addr, n in _chunks(pieces(chain.readable, HEADER_SIZE, length)):
            try:
                os.pwrite(self.fd, dma.read(addr, n), pos + done)
            except (OSError, DmaError) as e:
                raise _RequestError(str(e)) from None
            done += n
        if not self.driver_features >> VIRTIO_BLK_F_FLUSH & 1:
            self._flush(sector, chain, dma)
        return 0

    def _flush(self, sector: int, chain: DescriptorChain, dma: DmaView) -> int:
        if not self.readonly:
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                raise _RequestError(f"fdatasync: {e}") from None
        return 0

    def _get_id(self, sector: int, chain: DescriptorChain, dma: DmaView) -> int:
        ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:chain.writable_length - 1]
        done = 0
        for addr, n in pieces(chain.writable, 0, len(ident)):
            try:
                dma.write(addr, ident[done:done + n])
            except DmaError as e:
                raise _RequestError(str(e), done) from None
            done += n
        return done


_REQUESTS: dict[int, Callable[[VirtioBlk, int, DescriptorChain, DmaView], int]] = {
    VIRTIO_BLK_T_IN: VirtioBlk._in,
    VIRTIO_BLK_T_OUT: VirtioBlk._out,
    VIRTIO_BLK_T_FLUSH: VirtioBlk._flush,
    VIRTIO_BLK_T_GET_ID: VirtioBlk._get_id,
}


def _gather(chain: DescriptorChain, dma: DmaView, start: int, length: int) -> bytes:
    try:
        return b"".join(dma.read(a, n) for a, n in pieces(chain.readable, start, length))
    except DmaError as e:
        raise _RequestError(f"header: {e}") from None


def _chunks(spans, limit: int = SIZE_MAX):
    """Cut (addr, length) spans to at most `limit` bytes, to bound each copy's memory."""
    for addr, n in spans:
        for off in range(0, n, limit):
            yield addr + off, min(limit, n - off)


def _config(capacity: int) -> bytes:
    values = {sc.name: 0 for sc in virtio_blk_config.subcons if sc.name}
    values.update(capacity=capacity, size_max=SIZE_MAX, seg_max=SEG_MAX,
                  geometry=dict(cylinders=0, heads=0, sectors=0), blk_size=SECTOR_SIZE,
                  topology=dict(physical_block_exp=0, alignment_offset=0, min_io_size=0,
                                opt_io_size=0),
                  num_queues=1)
    return virtio_blk_config.build(values)
