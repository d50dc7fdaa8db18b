"""The vfio-user wire under fuzzing: what one input means, and what must hold after it.

The server runs in this thread (no loop thread: each input is deterministic) with the
functions `serve --iommu 01.0 --endpoint iommu-testdev@02.0 --endpoint
virtio-blk@03.0,disk=... --endpoint virtio-rng@04.0` builds, plus an iommu-testdev at
05.0 outside the IOMMU (as `serve` without --iommu has them: its DMA outside the maps
becomes DMA_WRITE/DMA_READ messages on its own connection), each on its real listening
socket. An input connects a fresh client to one function over a real AF_UNIX stream,
sends it messages, then disconnects.

Input format (invertible, so the seed corpus is written by `encode`):

    byte    function (index into FUNCTIONS, modulo)
    byte    1 = negotiate a valid VERSION first
    then messages, each:
      byte  control: bit 0 NO_REPLY, bit 1 raw (the payload bytes go out as they are,
            framing and all), bits 2-4 number of fds, bit 5 send in small pieces,
            bit 6 REPLY type instead of COMMAND, bit 7 read no reply until the
            message is sent (a client slow to read: the server's output backs up)
      byte  command (ignored by per-command targets, which set their own)
      u16   msg id
      u16   payload length (cut to what is left of the input)
      byte  per fd: its kind (FD_KINDS, modulo)
      ...   payload

After the messages the harness sends a sentinel DEVICE_GET_INFO and serves the
server's own requests (DMA_READ/DMA_WRITE) until every reply an independent model of
the framing expects has arrived, or the connection closed where the model says it
must. Then it checks the invariants (`WireHarness.check`):

* every command got exactly one reply, in order, with its id and command; a NO_REPLY
  command or a reply message got none; an error reply is header-only with an errno in
  1..4095 and never EIO (our "bug handling command" path);
* nothing was logged at ERROR (an exception that reached a catch-all);
* after the client leaves: no session, no DMA map, no region in any GuestMemory, the
  server-wide map count 0, and exactly the fds we started with;
* the other functions still answer (checked every `ISOLATION_EVERY` inputs).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vfiouser_iommu.endpoints import build_endpoint
from vfiouser_iommu.iommu_pci import build_iommu_function
from vfiouser_iommu.vfio_user import Server, wire
from vfiouser_iommu.vfio_user.limits import MAX_MSG_SIZE, RECV_MAX_FDS
from vfiouser_iommu.vfio_user.wire import HEADER, HEADER_SIZE, Command

FUNCTIONS = ("01.0", "02.0", "03.0", "04.0", "05.0")
FD_KINDS = ("eventfd", "memfd", "memfd-small", "pipe", "devnull")
CONTROL_NO_REPLY, CONTROL_RAW, CONTROL_SPLIT, CONTROL_REPLY_TYPE = 1, 2, 0x20, 0x40
CONTROL_SLOW_READER = 0x80
MAX_PAYLOAD = 0xFFFF
ISOLATION_EVERY = 64
# Turns of the loop without any progress before the server counts as stuck.
STUCK_TURNS = 2000
RAM_BASE = 0x8000_0000
RAM_SIZE = 1 << 20

# Fuzz targets: one per command handler (every message of an input carries that
# command) and `sequence` (any command, and raw framing).
TARGETS: dict[str, int | None] = {
    "version": Command.VERSION,
    "dma_map": Command.DMA_MAP,
    "dma_unmap": Command.DMA_UNMAP,
    "device_get_info": Command.DEVICE_GET_INFO,
    "get_region_info": Command.DEVICE_GET_REGION_INFO,
    "get_irq_info": Command.DEVICE_GET_IRQ_INFO,
    "set_irqs": Command.DEVICE_SET_IRQS,
    "region_read": Command.REGION_READ,
    "region_write": Command.REGION_WRITE,
    "device_reset": Command.DEVICE_RESET,
    "unknown": Command.DEVICE_FEATURE,
    "sequence": None,
}

VERSION_BODY = wire.VERSION.pack(0, 0) + (
    b'{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, '
    b'"pgsizes": 4096, "max_dma_maps": 65535}}\0')
SENTINEL_ID = 0xFFFF


class InvariantBroken(AssertionError):
    """What the fuzzer reports as a crash."""


@dataclass
class Message:
    control: int
    command: int
    msg_id: int
    payload: bytes
    fd_kinds: list[int] = field(default_factory=list)


@dataclass
class Input:
    function: int
    negotiate: bool
    messages: list[Message]


def decode(data: bytes, command: int | None = None) -> Input:
    """An input as the harness reads it; `command` forces every message's command."""
    if len(data) < 2:
        return Input(0, True, [])
    function, negotiate, pos = data[0] % len(FUNCTIONS), bool(data[1] & 1), 2
    messages = []
    while pos + 6 <= len(data):
        control, cmd, msg_id, length = struct.unpack_from("<BBHH", data, pos)
        pos += 6
        n_fds = (control >> 2) & 7
        kinds = list(data[pos:pos + n_fds])
        pos += n_fds
        payload = data[pos:pos + length]
        pos += length
        messages.append(Message(control, cmd if command is None else command, msg_id,
                                payload, kinds))
    return Input(function, negotiate, messages)


def encode(function: int, messages: list[Message], negotiate: bool = True) -> bytes:
    """The input bytes `decode` turns into these messages."""
    out = bytearray([function, int(negotiate)])
    for m in messages:
        control = (m.control & ~0x1C) | (len(m.fd_kinds) << 2)
        out += struct.pack("<BBHH", control, m.command & 0xFF, m.msg_id, len(m.payload))
        out += bytes(m.fd_kinds) + m.payload
    return bytes(out)


def frame(m: Message) -> bytes:
    """The bytes of a message on the wire."""
    if m.control & CONTROL_RAW:
        return m.payload
    flags = wire.TYPE_REPLY if m.control & CONTROL_REPLY_TYPE else wire.TYPE_COMMAND
    if m.control & CONTROL_NO_REPLY:
        flags |= wire.FLAG_NO_REPLY
    return HEADER.pack(m.msg_id, m.command, HEADER_SIZE + len(m.payload), flags, 0) + m.payload


@dataclass
class Expected:
    """What an independent reading of the framing says the server must answer."""

    replies: list[tuple[int, int]]   # (msg id, command), in order
    oversize: set[int]               # indices into replies that must be E2BIG
    closes: bool                     # framing the server must close on


def expected_replies(stream: bytes, fds_per_message: list[int] | None = None) -> Expected:
    """Model of docs/vfio-user.md section 14's framing rules over the bytes sent."""
    replies: list[tuple[int, int]] = []
    oversize: set[int] = set()
    pos = 0
    while pos + HEADER_SIZE <= len(stream):
        msg_id, cmd, size, flags, _ = HEADER.unpack_from(stream, pos)
        if size < HEADER_SIZE or flags & wire.TYPE_MASK not in (wire.TYPE_COMMAND,
                                                                 wire.TYPE_REPLY):
            return Expected(replies, oversize, True)
        if pos + size > len(stream):
            break
        is_command = flags & wire.TYPE_MASK == wire.TYPE_COMMAND
        if is_command and not flags & wire.FLAG_NO_REPLY:
            if size > MAX_MSG_SIZE:
                oversize.add(len(replies))
            replies.append((msg_id, cmd))
        pos += size
    return Expected(replies, oversize, False)


class _Fds:
    """fds of the kinds FD_KINDS names, made per message and closed after sending."""

    @staticmethod
    def make(kind: int) -> int:
        name = FD_KINDS[kind % len(FD_KINDS)]
        if name == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC)
        if name.startswith("memfd"):
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, 0x1000 if name == "memfd-small" else RAM_SIZE)
            return fd
        if name == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class WireHarness:
    """The server and its four functions, driven one input at a time."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-wire-")
        work = Path(workdir or self._tmp.name)
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        self.server = Server()
        iommu = build_iommu_function({})
        endpoints = [build_endpoint("iommu-testdev", {}),
                     build_endpoint("virtio-blk", {"disk": str(disk)}),
                     build_endpoint("virtio-rng", {})]
        for function, addr in zip(endpoints, FUNCTIONS[1:4], strict=True):
            slot, fn = (int(x, 16) for x in addr.split("."))
            function.set_dma_view(iommu.iommu.dma_view(slot << 3 | fn))
        self.functions = [iommu, *endpoints, build_endpoint("iommu-testdev", {})]
        self.paths = [work / f"{addr}.sock" for addr in FUNCTIONS]
        for function, path in zip(self.functions, self.paths, strict=True):
            self.server.add_function(function, path)
        self.errors = _ErrorLog()
        self._logger = logging.getLogger("vfiouser_iommu")
        self._level = self._logger.level
        self._logger.addHandler(self.errors)
        self._logger.setLevel(logging.ERROR)
        self._isolating = False
        self.inputs = 0
        self.messages = 0            # messages the server handled, over every input
        self.fuzzed = 0              # messages the inputs themselves carried
        self._fds = _open_fds()

    def close(self) -> None:
        self.server.close()
        self._tmp.cleanup()
        self._logger.removeHandler(self.errors)
        self._logger.setLevel(self._level)

    # -- one input -----------------------------------------------------------------------
    def run(self, data: bytes, command: int | None = None) -> None:
        """Play one input; InvariantBroken if the server misbehaved."""
        self.run_input(decode(data, command))

    def run_input(self, inp: Input) -> None:
        self.inputs += 1
        self.fuzzed += len(inp.messages)
        port = self.server.ports[self.paths[inp.function]]
        client = self._connect(port)
        session = port.session
        try:
            prefix = []
            if inp.negotiate:
                prefix.append(Message(0, Command.VERSION, 0xFFFE, VERSION_BODY))
            sentinel = Message(0, Command.DEVICE_GET_INFO, SENTINEL_ID,
                               wire.DEVICE_INFO.pack(16, 0, 0, 0))
            self._exchange(client, prefix + inp.messages + [sentinel])
        finally:
            client.close()
            self.messages += session.messages_handled if session is not None else 0
            self._settle(port)
        self.check()
        if self.inputs % ISOLATION_EVERY == 0 and not self._isolating:
            self.check_isolation()

    def _connect(self, port) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(port.path))
        client.setblocking(False)
        for _ in range(100):
            self.server.run_once(0)
            if port.session is not None:
                return client
        raise InvariantBroken("the server did not accept a client")

    def _exchange(self, client: socket.socket, messages: list[Message]) -> None:
        stream = b"".join(frame(m) for m in messages)
        expect = expected_replies(stream)
        got: list[tuple[int, int, int, int, int]] = []
        inbox = bytearray()
        closed = False
        for m in messages:
            closed = closed or self._send(client, m, inbox, got)
        idle = 0
        while not closed and len(got) < len(expect.replies) and idle < STUCK_TURNS:
            before = len(got), len(inbox)
            self.server.run_once(0)
            closed = self._receive(client, inbox, got)
            idle = 0 if (len(got), len(inbox)) != before else idle + 1
        if closed and not expect.closes and len(got) < len(expect.replies):
            raise InvariantBroken(f"connection closed after {len(got)} of "
                                  f"{len(expect.replies)} replies")
        if not closed and len(got) < len(expect.replies) and not expect.closes:
            raise InvariantBroken(f"server stuck: {len(got)} of {len(expect.replies)} "
                                  "replies")
        self._check_replies(expect, got, stream)

    def _send(self, client, m: Message, inbox, got) -> bool:
        data = frame(m)
        fds = [_Fds.make(k) for k in m.fd_kinds][:RECV_MAX_FDS]
        piece = 7 if m.control & CONTROL_SPLIT else 1 << 16
        slow = bool(m.control & CONTROL_SLOW_READER)
        try:
            first, stuck = True, 0
            while data:
                try:
                    if first and fds:
                        n = socket.send_fds(client, [data[:piece]], fds)
                    else:
                        n = client.send(data[:piece])
                except BlockingIOError:
                    n = 0
                except (BrokenPipeError, ConnectionResetError):
                    return True
                if n:
                    first = False
                data = data[n:]
                self.server.run_once(0)
                stuck = 0 if n else stuck + 1
                # A slow reader reads only when neither side can move any more.
                if (not slow or stuck > 50) and self._receive(client, inbox, got):
                    return True
            return False
        finally:
            for fd in fds:
                os.close(fd)

    def _receive(self, client, inbox: bytearray, got: list) -> bool:
        """Read what the server sent; answer its requests; True once it closed."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(client, 1 << 16, 4)
            except BlockingIOError:
                break
            except ConnectionResetError:
                return True
            for fd in fds:
                os.close(fd)
            if fds:
                raise InvariantBroken("the server sent fds")
            if not data:
                return True
            inbox += data
        while len(inbox) >= HEADER_SIZE:
            msg_id, cmd, size, flags, error = HEADER.unpack_from(inbox)
            if size < HEADER_SIZE:
                raise InvariantBroken(f"server message of size {size}")
            if len(inbox) < size:
                break
            body = bytes(inbox[HEADER_SIZE:size])
            del inbox[:size]
            kind = flags & wire.TYPE_MASK
            if kind == wire.TYPE_COMMAND:
                self._serve_request(client, msg_id, cmd, flags, body)
            elif kind == wire.TYPE_REPLY:
                got.append((msg_id, cmd, size, flags, error))
            else:
                raise InvariantBroken(f"server message of type {kind}")
        return False

    def _serve_request(self, client, msg_id: int, cmd: int, flags: int, body: bytes) -> None:
        if cmd not in (Command.DMA_READ, Command.DMA_WRITE):
            raise InvariantBroken(f"server sent command {cmd}")
        if flags & wire.FLAG_NO_REPLY:
            return
        if cmd == Command.DMA_READ and len(body) >= 16:
            addr, count = struct.unpack_from("<QQ", body)
            reply = struct.pack("<QQ", addr, count) + bytes(count)
            header = HEADER.pack(msg_id, cmd, HEADER_SIZE + len(reply), wire.TYPE_REPLY, 0)
        else:
            reply = b""
            header = HEADER.pack(msg_id, cmd, HEADER_SIZE, wire.TYPE_REPLY, 0)
        try:
            client.sendall(header + reply)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass

    def _check_replies(self, expect: Expected, got: list, stream: bytes) -> None:
        for i, (msg_id, cmd, size, flags, error) in enumerate(got):
            if i >= len(expect.replies):
                raise InvariantBroken(f"unexpected reply {i}: id {msg_id} command {cmd}")
            if (msg_id, cmd) != expect.replies[i]:
                raise InvariantBroken(f"reply {i} is id {msg_id} command {cmd}, "
                                      f"expected {expect.replies[i]}")
            if flags & wire.FLAG_ERROR:
                if size != HEADER_SIZE or not 0 < error < 4096:
                    raise InvariantBroken(f"error reply of size {size} errno {error}")
                if error == errno.EIO:
                    raise InvariantBroken(f"EIO (a bug's catch-all) for command {cmd}")
            if i in expect.oversize and error != errno.E2BIG:
                raise InvariantBroken(f"oversized message answered {error}")

    def _settle(self, port) -> None:
        for _ in range(50):
            self.server.run_once(0)
            if port.session is None:
                return
        raise InvariantBroken("the server kept a closed client's session")

    # -- invariants -------------------------------------------------------------------------
    def check(self) -> None:
        if self.errors.records:
            record = self.errors.records[0]
            self.errors.records.clear()
            trace = (logging.Formatter().formatException(record.exc_info)
                     if record.exc_info else "")
            raise InvariantBroken(f"logged at ERROR: {record.getMessage()}\n{trace}")
        for function in self.functions:
            if function.memory.regions:
                raise InvariantBroken(f"{function.name}: regions left after disconnect")
        if self.server.dma_budget.used:
            raise InvariantBroken(f"{self.server.dma_budget.used} maps counted after "
                                  "every client left")
        fds = _open_fds()
        if fds != self._fds:
            raise InvariantBroken(f"fds leaked or lost: {sorted(fds ^ self._fds)}")

    def check_isolation(self) -> None:
        """Each function still serves a well-behaved client."""
        self._isolating = True
        try:
            for index in range(len(FUNCTIONS)):
                self.run_input(Input(index, True, []))
        finally:
            self._isolating = False


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}
