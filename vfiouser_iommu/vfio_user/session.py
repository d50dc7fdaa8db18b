"""One vfio-user connection: framing, command dispatch, DMA maps, IRQ eventfds.

Implements the server side of the vfio-user protocol (QEMU `docs/interop/vfio-user.rst`)
for one PCI function, as QEMU's `vfio-user-pci` client drives it (see docs/vfio-user.md
for what was checked against a live QEMU).

Rules this module keeps:

* Messages are processed strictly in arrival order, one at a time, so a posted
  (NO_REPLY) region write is applied before any later read.
* A reply never exceeds what QEMU reserved for it (the request's size, or the table in
  docs/vfio-user.md); a NO_REPLY command never gets a reply, not even an error.
* We never wait for the client. Our own requests (DMA_WRITE/DMA_READ) are sent and their
  replies matched by id later. An interrupt is held until every DMA_WRITE issued before
  it has been acknowledged, on whichever connection carried it (an endpoint behind the
  IOMMU writes through the IOMMU's memory, hence on the IOMMU's connection), so the
  guest never sees an interrupt before its data (PCI ordering); writes issued after the
  interrupt do not hold it.
* Bad input is an errno reply and a log line. Only framing we cannot resynchronise from
  (a header shorter than 16 bytes, an unknown message type, truncated fds) closes the
  connection; oversized messages are drained and answered E2BIG.
* Every fd a message brings is either owned by what it was for or closed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections import OrderedDict, deque
from collections.abc import Callable

from ..memory import MemoryAccessError
from ..pci.function import (
    NUM_IRQS,
    NUM_REGIONS,
    PciFunction,
    RegionAccessError,
    check_region_access,
)
from . import wire
from .dma import DmaMapBudget, DmaMapError, DmaMapTable
from .limits import (
    BATCH,
    MAX_DATA_XFER_SIZE,
    MAX_DMA_MAPS_PER_CLIENT,
    MAX_MSG_FDS,
    MAX_MSG_SIZE,
    OUT_BACKLOG,
    RECV_MAX_FDS,
)
from .logthrottle import LogThrottle
from .wire import HEADER, HEADER_SIZE, Command, DmaLayout

log = logging.getLogger(__name__)

__all__ = ["BATCH", "MAX_DATA_XFER_SIZE", "MAX_MSG_FDS", "MAX_MSG_SIZE", "OUT_BACKLOG",
           "RECV_MAX_FDS", "MessageDma", "ProtocolError", "Session"]


class ProtocolError(Exception):
    """A client error answered with an errno."""

    def __init__(self, error: int, why: str):
        super().__init__(why)
        self.errno = error


class FatalProtocolError(Exception):
    """Framing we cannot recover from: the connection is closed."""


Reply = tuple[bytes, list[int]] | bytes


class Session:
    """The server end of one client connection to one function."""

    def __init__(self, sock: socket.socket, function: PciFunction, *,
                 call_soon: Callable[[Callable[[], None]], None],
                 want_write: Callable[[Session, bool], None],
                 dma_layout: DmaLayout = DmaLayout.SPEC,
                 max_dma_maps: int = MAX_DMA_MAPS_PER_CLIENT,
                 dma_budget: DmaMapBudget | None = None,
                 throttle: LogThrottle | None = None) -> None:
        self.sock = sock
        self.function = function
        self.name = function.name
        # What the client does wrong is logged a burst at a time (logthrottle.py).
        self.throttle = throttle or LogThrottle(log, self.name)
        self.call_soon = call_soon
        self._want_write = want_write
        self.dma_layout = dma_layout
        self.closed = False
        self.negotiated = False
        self.peer_max_data_xfer = MAX_DATA_XFER_SIZE
        self.dma_maps = DmaMapTable(function.memory, max_dma_maps, dma_budget)
        self.irq_fds: list[list[int | None]] = [
            [None] * function.irq_count(i) for i in range(NUM_IRQS)]
        self.irq_masked: list[list[bool]] = [
            [False] * function.irq_count(i) for i in range(NUM_IRQS)]
        self.messages_handled = 0
        # read state: header bytes, fds that came with them, body bytes, bytes to drain
        self._hdr = bytearray()
        self._fds: list[int] = []
        self._body = bytearray()
        self._drain = 0
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        # our requests to the client
        self._next_id = 0
        self._pending: dict[int, Callable[[int, bytes], None]] = {}
        # DMA_WRITE pieces by sequence number, unacknowledged ones in issue order, and
        # callbacks waiting for every write issued before them: (sequence, callback).
        self._write_seq = 0
        self._unacked_writes: OrderedDict[int, None] = OrderedDict()
        self._write_barriers: deque[tuple[int, Callable[[], None]]] = deque()
        function.memory.fallback = MessageDma(self)

    # -- reading ---------------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            for _ in range(BATCH):
                if self.closed or self.backlogged or not self._read_step():
                    return
        except FatalProtocolError as e:
            log.warning("%s: closing connection: %s", self.name, e)
            self.close()

    def _read_step(self) -> bool:
        """Read what is available towards the next message; False when nothing is."""
        try:
            if self._drain:
                return self._drain_step()
            if len(self._hdr) < HEADER_SIZE:
                return self._read_header()
            return self._read_body()
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionError as e:
            log.info("%s: client connection error: %s", self.name, e)
            self.close()
            return False

    def _read_header(self) -> bool:
        data, fds, flags, _ = socket.recv_fds(self.sock, HEADER_SIZE - len(self._hdr),
                                              RECV_MAX_FDS)
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise FatalProtocolError("too many fds in one message")
        if not data:
            self._eof()
            return False
        self._hdr += data
        if len(self._hdr) < HEADER_SIZE:
            return True
        msg_id, cmd, size, flags, _ = HEADER.unpack(self._hdr)
        if size < HEADER_SIZE:
            raise FatalProtocolError(f"message size {size} < header")
        if flags & wire.TYPE_MASK not in (wire.TYPE_COMMAND, wire.TYPE_REPLY):
            raise FatalProtocolError(f"message type {flags & wire.TYPE_MASK}")
        if size > MAX_MSG_SIZE:
            self._drain = size - HEADER_SIZE
            return True
        if size == HEADER_SIZE:
            self._complete()
        return True

    def _read_body(self) -> bool:
        size = HEADER.unpack_from(self._hdr)[2]
        want = size - HEADER_SIZE - len(self._body)
        data = self.sock.recv(want)
        if not data:
            self._eof()
            return False
        self._body += data
        if len(self._body) == size - HEADER_SIZE:
            self._complete()
        return True

    def _drain_step(self) -> bool:
        data = self.sock.recv(min(self._drain, 1 << 16))
        if not data:
            self._eof()
            return False
        self._drain -= len(data)
        if self._drain == 0:
            msg_id, cmd, size, flags, _ = HEADER.unpack(self._hdr)
            fds, self._fds, self._hdr = self._fds, [], bytearray()
            _close_fds(fds)
            self.throttle.log("oversized messages", logging.WARNING,
                              "%s: message %d (command %d) of %d bytes exceeds %d; drained",
                              self.name, msg_id, cmd, size, MAX_MSG_SIZE)
            if flags & wire.TYPE_MASK == wire.TYPE_COMMAND:
                self._send_error(msg_id, cmd, flags, errno.E2BIG)
        return True

    def _eof(self) -> None:
        if self._hdr or self._body:
            log.warning("%s: client closed mid-message", self.name)
        else:
            log.info("%s: client disconnected", self.name)
        self.close()

    def _complete(self) -> None:
        header, body, fds = bytes(self._hdr), bytes(self._body), self._fds
        self._hdr, self._body, self._fds = bytearray(), bytearray(), []
        msg_id, cmd, size, flags, error_no = HEADER.unpack(header)
        self.messages_handled += 1
        if flags & wire.TYPE_MASK == wire.TYPE_REPLY:
            _close_fds(fds)
            self._on_reply(msg_id, cmd, flags, error_no, body)
        else:
            self._on_command(msg_id, cmd, flags, body, fds)

    # -- commands ----------------------------------------------------------------------------
    def _on_command(self, msg_id: int, cmd: int, flags: int, body: bytes,
                    fds: list[int]) -> None:
        handler = _HANDLERS.get(cmd)
        try:
            if handler is None:
                raise ProtocolError(errno.ENOSYS, f"unsupported command {cmd}")
            if not self.negotiated and cmd != Command.VERSION:
                raise ProtocolError(errno.EINVAL, f"command {cmd} before VERSION")
            reply = handler(self, body, fds)
        except (ProtocolError, DmaMapError, RegionAccessError) as e:
            error = errno.errorcode.get(e.errno, str(e.errno))
            self.throttle.log(f"{_kind(cmd)} failures ({error})", logging.WARNING,
                              "%s: command %s failed (%s): %s", self.name, _cmd_name(cmd),
                              error, e)
            self._send_error(msg_id, cmd, flags, e.errno)
            return
        except Exception:
            self.throttle.log(f"{_kind(cmd)} internal errors", logging.ERROR,
                              "%s: bug handling command %s", self.name, _cmd_name(cmd),
                              exc_info=True)
            self._send_error(msg_id, cmd, flags, errno.EIO)
            return
        finally:
            _close_fds(fds)
        if not flags & wire.FLAG_NO_REPLY and not self.closed:
            self._send(wire.pack_header(msg_id, cmd, HEADER_SIZE + len(reply),
                                        wire.TYPE_REPLY) + reply)

    def _send_error(self, msg_id: int, cmd: int, flags: int, error: int) -> None:
        if flags & wire.FLAG_NO_REPLY or self.closed:
            return
        self._send(wire.pack_header(msg_id, cmd, HEADER_SIZE,
                                    wire.TYPE_REPLY | wire.FLAG_ERROR, error))

    def _version(self, body: bytes, fds: list[int]) -> bytes:
        if self.negotiated:
            raise ProtocolError(errno.EINVAL, "second VERSION")
        if fds:
            raise ProtocolError(errno.EINVAL, "VERSION carries fds")
        if len(body) < wire.VERSION.size:
            raise ProtocolError(errno.EINVAL, "VERSION payload too short")
        major, minor = wire.VERSION.unpack_from(body)
        if major != 0:
            raise ProtocolError(errno.ENOTSUP, f"client protocol version {major}.{minor}")
        caps = _parse_client_caps(body[wire.VERSION.size:])
        self.peer_max_data_xfer = min(caps.get("max_data_xfer_size", MAX_DATA_XFER_SIZE),
                                      MAX_DATA_XFER_SIZE)
        self.negotiated = True
        # QEMU receives the reply into its request's buffer: never answer longer.
        limit = HEADER_SIZE + len(body)
        for document in ({"capabilities": {"max_msg_fds": MAX_MSG_FDS,
                                           "max_data_xfer_size": MAX_DATA_XFER_SIZE,
                                           "pgsizes": 4096,
                                           "max_dma_maps": self.dma_maps.max_maps}},
                         {"capabilities": {"max_data_xfer_size": MAX_DATA_XFER_SIZE}},
                         {}):
            reply = wire.VERSION.pack(0, 0) + json.dumps(document, separators=(",", ":")
                                                         ).encode() + b"\0"
            if HEADER_SIZE + len(reply) <= limit:
                return reply
        return wire.VERSION.pack(0, 0)

    def _dma_map(self, body: bytes, fds: list[int]) -> bytes:
        argsz, flags, offset, addr, size = _unpack_arg(wire.DMA_MAP, body, "DMA_MAP")
        if len(fds) > 1:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
        fd = fds.pop() if fds else None
        self.dma_maps.map(addr, size, flags, fd, offset)
        log.debug("%s: DMA_MAP %#x+%#x flags %#x fd %s", self.name, addr, size, flags, fd)
        self.function.dma_mapped(addr, size)
        return b""

    def _dma_unmap(self, body: bytes, fds: list[int]) -> bytes:
        argsz, flags, addr, size = _unpack_arg(wire.DMA_UNMAP, body, "DMA_UNMAP")
        _no_fds(fds, "DMA_UNMAP")
        log.debug("%s: DMA_UNMAP %#x+%#x flags %#x", self.name, addr, size, flags)
        if flags == wire.DMA_UNMAP_ALL:
            if addr or size:
                raise ProtocolError(errno.EINVAL, "UNMAP_ALL with an address")
            for m in list(self.dma_maps.mappings.values()):
                self.function.dma_unmapped(m.addr, m.size)
            self.dma_maps.unmap_all()
        elif flags == 0:
            if addr not in self.dma_maps.mappings or self.dma_maps.mappings[addr].size != size:
                raise ProtocolError(errno.ENOENT, f"no DMA map {addr:#x}+{size:#x}")
            self.function.dma_unmapped(addr, size)
            self.dma_maps.unmap(addr, size)
        else:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}")
        return wire.DMA_UNMAP.pack(wire.DMA_UNMAP.size, flags, addr, size)

    def _device_get_info(self, body: bytes, fds: list[int]) -> bytes:
        _unpack_arg(wire.DEVICE_INFO, body, "DEVICE_GET_INFO")
        _no_fds(fds, "DEVICE_GET_INFO")
        return wire.DEVICE_INFO.pack(wire.DEVICE_INFO.size,
                                     wire.DEVICE_FLAGS_RESET | wire.DEVICE_FLAGS_PCI,
                                     NUM_REGIONS, NUM_IRQS)

    def _get_region_info(self, body: bytes, fds: list[int]) -> bytes:
        argsz, _, index, _, _, _ = _unpack_arg(wire.REGION_INFO, body, "GET_REGION_INFO")
        _no_fds(fds, "GET_REGION_INFO")
        if index >= NUM_REGIONS:
            raise ProtocolError(errno.EINVAL, f"no region {index}")
        size = self.function.region_size(index)
        flags = wire.REGION_INFO_FLAG_READ | wire.REGION_INFO_FLAG_WRITE if size else 0
        # No caps and no mmap: the reply is the base struct, which fits any argsz >= 32.
        return wire.REGION_INFO.pack(wire.REGION_INFO.size, flags, index, 0, size, 0)

    def _get_irq_info(self, body: bytes, fds: list[int]) -> bytes:
        argsz, _, index, _ = _unpack_arg(wire.IRQ_INFO, body, "GET_IRQ_INFO")
        _no_fds(fds, "GET_IRQ_INFO")
        if index >= NUM_IRQS:
            raise ProtocolError(errno.EINVAL, f"no IRQ index {index}")
        flags = wire.IRQ_INFO_EVENTFD
        if index == wire.PciIrq.INTX:
            flags |= wire.IRQ_INFO_MASKABLE | wire.IRQ_INFO_AUTOMASKED
        return wire.IRQ_INFO.pack(wire.IRQ_INFO.size, flags, index,
                                  self.function.irq_count(index))

    def _set_irqs(self, body: bytes, fds: list[int]) -> bytes:
        argsz, flags, index, start, count = _unpack_arg(wire.IRQ_SET, body, "SET_IRQS")
        data_type = flags & wire.IRQ_SET_DATA_TYPE_MASK
        action = flags & wire.IRQ_SET_ACTION_TYPE_MASK
        if (flags & ~(wire.IRQ_SET_DATA_TYPE_MASK | wire.IRQ_SET_ACTION_TYPE_MASK)
                or data_type.bit_count() != 1 or action.bit_count() != 1):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS flags {flags:#x}")
        if index >= NUM_IRQS:
            raise ProtocolError(errno.EINVAL, f"no IRQ index {index}")
        if fds and data_type != wire.IRQ_SET_DATA_EVENTFD:
            raise ProtocolError(errno.EINVAL, "SET_IRQS fds without DATA_EVENTFD")
        if count == 0:
            if (start or data_type != wire.IRQ_SET_DATA_NONE
                    or action != wire.IRQ_SET_ACTION_TRIGGER):
                raise ProtocolError(errno.EINVAL, "SET_IRQS count 0 is only disable-all")
            self._irq_assign(index, 0, [None] * len(self.irq_fds[index]))
            return b""
        n = len(self.irq_fds[index])
        if start >= n or count > n - start:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS {index}: {start}+{count} of {n}")
        data = body[wire.IRQ_SET.size:]
        _SET_IRQS_DATA[data_type](self, index, start, count, action, data, fds)
        return b""

    def _set_irqs_eventfd(self, index: int, start: int, count: int, action: int,
                          data: bytes, fds: list[int]) -> None:
        if action != wire.IRQ_SET_ACTION_TRIGGER:
            raise ProtocolError(errno.EINVAL, "DATA_EVENTFD only with ACTION_TRIGGER")
        if data or len(fds) not in (0, count):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS {count} vectors, {len(fds)} fds")
        for fd in fds:
            if not _is_eventfd(fd):
                raise ProtocolError(errno.EINVAL, f"SET_IRQS fd {fd} is not an eventfd")
        for fd in fds:
            # Shared with the client's copy (one open file description); QEMU's event
            # notifiers are non-blocking already.
            os.set_blocking(fd, False)
        new: list[int | None] = list(fds) if fds else [None] * count
        fds.clear()
        self._irq_assign(index, start, new)

    def _set_irqs_none(self, index: int, start: int, count: int, action: int,
                       data: bytes, fds: list[int]) -> None:
        if data:
            raise ProtocolError(errno.EINVAL, "DATA_NONE with data")
        self._irq_action(index, range(start, start + count), action)

    def _set_irqs_bool(self, index: int, start: int, count: int, action: int,
                       data: bytes, fds: list[int]) -> None:
        if len(data) != count:
            raise ProtocolError(errno.EINVAL, f"DATA_BOOL with {len(data)} bytes for {count}")
        self._irq_action(index, [start + i for i, b in enumerate(data) if b], action)

    def _irq_assign(self, index: int, start: int, new: list[int | None]) -> None:
        slots = self.irq_fds[index]
        for i, fd in enumerate(new):
            old = slots[start + i]
            if old is not None:
                os.close(old)
            slots[start + i] = fd
            self.irq_masked[index][start + i] = False
        for i, fd in enumerate(new):
            if fd is not None and index == wire.PciIrq.MSIX:
                self.function.msix_vector_ready(start + i)
            elif fd is not None and index == wire.PciIrq.INTX and self.function.intx_asserted:
                self.trigger(index, start + i)

    def _irq_action(self, index: int, vectors, action: int) -> None:
        for v in vectors:
            if action == wire.IRQ_SET_ACTION_TRIGGER:
                self.trigger(index, v)
            elif action == wire.IRQ_SET_ACTION_MASK:
                self.irq_masked[index][v] = True
            else:
                self.irq_masked[index][v] = False
                self._after_unmask(index, v)

    def _after_unmask(self, index: int, vector: int) -> None:
        if index == wire.PciIrq.INTX and self.function.intx_asserted:
            self.trigger(index, vector)
        elif index == wire.PciIrq.MSIX:
            self.function.msix_vector_ready(vector)

    def _region_read(self, body: bytes, fds: list[int]) -> bytes:
        offset, index, count = _region_access(body, fds, "REGION_READ")
        if len(body) != wire.REGION_ACCESS.size:
            raise ProtocolError(errno.EINVAL, "REGION_READ with data")
        data = self._region_io(index, offset, count, None)
        return wire.REGION_ACCESS.pack(offset, index, count) + data

    def _region_write(self, body: bytes, fds: list[int]) -> bytes:
        offset, index, count = _region_access(body, fds, "REGION_WRITE")
        if len(body) != wire.REGION_ACCESS.size + count:
            raise ProtocolError(errno.EINVAL,
                                f"REGION_WRITE of {count} bytes carries {len(body) - 16}")
        self._region_io(index, offset, count, body[wire.REGION_ACCESS.size:])
        return wire.REGION_ACCESS.pack(offset, index, count)

    def _region_io(self, index: int, offset: int, count: int, data: bytes | None) -> bytes:
        if count == 0:
            return b""
        check_region_access(self.function, index, offset, count)
        if data is None:
            return self.function.region_read(index, offset, count)
        self.function.region_write(index, offset, data)
        return b""

    def _device_reset(self, body: bytes, fds: list[int]) -> bytes:
        _no_fds(fds, "DEVICE_RESET")
        if body:
            raise ProtocolError(errno.EINVAL, "DEVICE_RESET with payload")
        log.info("%s: device reset", self.function.name)
        self.function.reset()
        return b""  # QEMU reserved a 16-byte reply: header only

    # -- our requests to the client -----------------------------------------------------
    def dma_write(self, addr: int, data: bytes,
                  done: Callable[[int], None] | None = None) -> None:
        """Post a DMA_WRITE (in chunks of the client's max transfer); never waits."""
        if not data:
            if done is not None:
                done(0)
            return
        chunk = max(1, self.peer_max_data_xfer)
        pieces = [(addr + i, data[i:i + chunk]) for i in range(0, len(data), chunk)]
        remaining = [len(pieces)]
        first_error = [0]

        def acknowledged(seq: int, error: int) -> None:
            first_error[0] = first_error[0] or error
            remaining[0] -= 1
            if remaining[0] == 0 and done is not None:
                done(first_error[0])
            self._write_acknowledged(seq)

        for gpa, piece in pieces:
            seq = self._write_seq
            self._write_seq += 1
            self._unacked_writes[seq] = None
            self._request(Command.DMA_WRITE,
                          wire.encode_dma_request(self.dma_layout, gpa, len(piece), piece),
                          lambda error, payload, seq=seq: acknowledged(seq, error))

    def dma_read(self, addr: int, count: int, done: Callable[[int, bytes], None]) -> None:
        """Ask the client for `count` bytes at `addr`; `done(errno, data)` gets them."""
        if count > self.peer_max_data_xfer:
            done(errno.E2BIG, b"")
            return
        layout = self.dma_layout

        def on_reply(error: int, payload: bytes) -> None:
            if error:
                done(error, b"")
                return
            try:
                r_addr, r_count, data = wire.decode_dma_payload(layout, payload)
            except ValueError as e:
                self.throttle.log("malformed DMA_READ replies", logging.WARNING,
                                  "%s: bad DMA_READ reply: %s", self.name, e)
                done(errno.EPROTO, b"")
                return
            if (r_addr, r_count) != (addr, count):
                done(errno.EPROTO, b"")
                return
            done(0, data)

        self._request(Command.DMA_READ, wire.encode_dma_request(layout, addr, count), on_reply)

    def writes_pending(self) -> bool:
        """Whether some DMA_WRITE we sent is still unacknowledged."""
        return bool(self._unacked_writes)

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every DMA_WRITE sent so far is acknowledged (now if
        none is pending); never if the connection closes first: that data never
        became visible."""
        if not self._unacked_writes:
            callback()
        else:
            self._write_barriers.append((self._write_seq, callback))

    def _write_acknowledged(self, seq: int) -> None:
        self._unacked_writes.pop(seq, None)
        oldest = next(iter(self._unacked_writes), self._write_seq)
        while self._write_barriers and self._write_barriers[0][0] <= oldest:
            self._write_barriers.popleft()[1]()

    def _request(self, cmd: int, payload: bytes, on_reply: Callable[[int, bytes], None]) -> None:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        if msg_id in self._pending:
            raise RuntimeError(f"{self.name}: 65536 requests in flight")
        self._pending[msg_id] = on_reply
        self._send(wire.pack_header(msg_id, cmd, HEADER_SIZE + len(payload),
                                    wire.TYPE_COMMAND) + payload)

    def _on_reply(self, msg_id: int, cmd: int, flags: int, error_no: int, body: bytes) -> None:
        on_reply = self._pending.pop(msg_id, None)
        if on_reply is None:
            self.throttle.log("unsolicited replies", logging.WARNING,
                              "%s: unsolicited reply id %d (command %d) dropped", self.name,
                              msg_id, cmd)
            return
        error = min(max(error_no, 1), 4096) if flags & wire.FLAG_ERROR else 0
        if error:
            self.throttle.log(f"error replies to our {_kind(cmd)}", logging.WARNING,
                              "%s: client answered our %s with %s", self.name,
                              _cmd_name(cmd), errno.errorcode.get(error, error))
        on_reply(error, body)

    # -- interrupts ------------------------------------------------------------------------
    def trigger(self, index: int, vector: int) -> bool:
        """Signal an interrupt's eventfd once the DMA writes issued before it land."""
        slots = self.irq_fds[index]
        if not 0 <= vector < len(slots) or slots[vector] is None:
            return False
        carriers = [c for c in self._write_carriers() if c.writes_pending()]
        if not carriers:
            self._signal(index, vector)
            return True
        remaining = [len(carriers)]

        def landed() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._signal(index, vector)

        for carrier in carriers:
            carrier.after_writes(landed)
        return True

    def _write_carriers(self) -> list[Session]:
        """The sessions that carry this function's DMA writes as messages: the one
        behind its own memory (ours) and the one behind its DMA view's memory (the
        IOMMU's connection, for an endpoint behind the IOMMU)."""
        carriers: list[Session] = []
        for memory in (self.function.memory, self.function.dma.memory):
            fallback = memory.fallback
            if isinstance(fallback, MessageDma) and fallback.session not in carriers:
                carriers.append(fallback.session)
        return carriers

    def _signal(self, index: int, vector: int) -> None:
        fd = self.irq_fds[index][vector]
        if fd is None or self.irq_masked[index][vector]:
            return
        if index == wire.PciIrq.INTX:
            self.irq_masked[index][vector] = True  # automasked until the client unmasks
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: the interrupt is pending already
        except OSError as e:
            self.throttle.log("eventfd write failures", logging.WARNING,
                              "%s: IRQ %d/%d eventfd write failed: %s", self.name, index,
                              vector, e)

    # -- writing ---------------------------------------------------------------------------
    @property
    def backlogged(self) -> bool:
        """Too much output queued: read no more requests until the client catches up."""
        return self._out_bytes > OUT_BACKLOG

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        if self._out:
            self._queue(data)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            log.info("%s: send failed: %s", self.name, e)
            self.close()
            return
        if sent < len(data):
            self._queue(data[sent:])

    def _queue(self, data: bytes) -> None:
        was_backlogged = self.backlogged
        first = not self._out
        self._out.append(data)
        self._out_bytes += len(data)
        if first or self.backlogged != was_backlogged:
            self._want_write(self, True)

    def on_writable(self) -> None:
        was_backlogged = self.backlogged
        while self._out:
            data = self._out[0]
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.info("%s: send failed: %s", self.name, e)
                self.close()
                return
            self._out_bytes -= sent
            if sent < len(data):
                self._out[0] = data[sent:]
                break
            self._out.popleft()
        if not self._out:
            self._want_write(self, False)
        elif was_backlogged and not self.backlogged:
            self._want_write(self, True)

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the connection and everything it owned; the function state stays."""
        if self.closed:
            return
        self.closed = True
        _close_fds(self._fds)
        self._fds = []
        for m in list(self.dma_maps.mappings.values()):
            self.function.dma_unmapped(m.addr, m.size)
        self.dma_maps.unmap_all()
        for slots in self.irq_fds:
            _close_fds([fd for fd in slots if fd is not None])
            slots[:] = [None] * len(slots)
        if isinstance(self.function.memory.fallback, MessageDma):
            self.function.memory.fallback = None
        # Interrupts held for writes that never landed are dropped, not delivered: the
        # guest must not see a completion whose data is not there.
        if self._write_barriers:
            log.info("%s: %d interrupts held for unacknowledged DMA writes dropped",
                     self.name, len(self._write_barriers))
        self._write_barriers.clear()
        self._unacked_writes.clear()
        pending, self._pending = self._pending, {}
        for on_reply in pending.values():
            on_reply(errno.ENOTCONN, b"")
        self._out.clear()
        self._out_bytes = 0
        self.sock.close()
        self.throttle.flush()
        self.function.disconnected()


class MessageDma:
    """`GuestMemory.fallback` of a connected function: DMA messages to the client.

    Writes are posted as DMA_WRITE and never wait. Reads cannot be answered
    synchronously without blocking the loop (the client serves our requests only after
    we answer its own), so `read` raises MemoryAccessError; a function that must read
    unmapped memory uses `Session.dma_read` with a callback.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def read(self, gpa: int, length: int) -> bytes:
        raise MemoryAccessError(gpa, length, "not mapped (DMA_READ messages are asynchronous)")

    def write(self, gpa: int, data: bytes) -> None:
        self.session.dma_write(gpa, data)


def _unpack_arg(codec, body: bytes, what: str) -> tuple:
    """Unpack a struct that begins with `argsz`: payload and argsz must cover it."""
    if len(body) < codec.size:
        raise ProtocolError(errno.EINVAL, f"{what} payload {len(body)} < {codec.size}")
    fields = codec.unpack_from(body)
    if fields[0] < codec.size:
        raise ProtocolError(errno.EINVAL, f"{what} argsz {fields[0]} < {codec.size}")
    return fields


def _region_access(body: bytes, fds: list[int], what: str) -> tuple[int, int, int]:
    _no_fds(fds, what)
    if len(body) < wire.REGION_ACCESS.size:
        raise ProtocolError(errno.EINVAL, f"{what} payload {len(body)} < 16")
    offset, index, count = wire.REGION_ACCESS.unpack_from(body)
    if count > MAX_DATA_XFER_SIZE:
        raise ProtocolError(errno.E2BIG, f"{what} of {count} bytes")
    return offset, index, count


def _is_eventfd(fd: int) -> bool:
    """Whether `fd` is an eventfd: anything else (a pipe, a socket) could block the loop
    on write or do something other than raise an interrupt."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
            return any(line.startswith(b"eventfd-count:") for line in info)
    except OSError:
        return False


def _no_fds(fds: list[int], what: str) -> None:
    if fds:
        raise ProtocolError(errno.EINVAL, f"{what} carries {len(fds)} fds")


def _parse_client_caps(raw: bytes) -> dict:
    if not raw:
        return {}
    if raw[-1:] != b"\0":
        raise ProtocolError(errno.EINVAL, "VERSION JSON not NUL-terminated")
    try:
        doc = json.loads(raw[:-1].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: nesting deeper than the interpreter's stack (issue 14).
        raise ProtocolError(errno.EINVAL, f"VERSION JSON: {e}") from None
    caps = doc.get("capabilities", {}) if isinstance(doc, dict) else None
    if not isinstance(caps, dict):
        raise ProtocolError(errno.EINVAL, "VERSION JSON has no capabilities object")
    for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
        value = caps.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(errno.EINVAL, f"VERSION capability {key} = {value!r}")
    return caps


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _cmd_name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return str(cmd)


def _kind(cmd: int) -> str:
    """A command's name for log kinds: one of a small set, whatever the client sent."""
    return Command(cmd).name if cmd in Command._value2member_map_ else "unknown command"


_HANDLERS: dict[int, Callable[[Session, bytes, list[int]], bytes]] = {
    Command.VERSION: Session._version,
    Command.DMA_MAP: Session._dma_map,
    Command.DMA_UNMAP: Session._dma_unmap,
    Command.DEVICE_GET_INFO: Session._device_get_info,
    Command.DEVICE_GET_REGION_INFO: Session._get_region_info,
    Command.DEVICE_GET_IRQ_INFO: Session._get_irq_info,
    Command.DEVICE_SET_IRQS: Session._set_irqs,
    Command.REGION_READ: Session._region_read,
    Command.REGION_WRITE: Session._region_write,
    Command.DEVICE_RESET: Session._device_reset,
}

_SET_IRQS_DATA = {
    wire.IRQ_SET_DATA_EVENTFD: Session._set_irqs_eventfd,
    wire.IRQ_SET_DATA_NONE: Session._set_irqs_none,
    wire.IRQ_SET_DATA_BOOL: Session._set_irqs_bool,
}
