"""A small blocking vfio-user client, for tests, benchmarks and inspection.

It speaks the client side of the protocol the way QEMU's `vfio-user-pci` does (same
message layouts, one fd with DMA_MAP, eventfds with SET_IRQS) and can also send raw,
deliberately malformed messages. Requests the server sends us (DMA_READ/DMA_WRITE) are
served from `memory`, a `GuestMemory` standing in for the guest's RAM, in the layout
given (QEMU's by default).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
from dataclasses import dataclass, field

from ..memory import GuestMemory, MemoryAccessError
from . import wire
from .wire import HEADER, HEADER_SIZE, Command, DmaLayout


class ClientError(Exception):
    def __init__(self, cmd: int, error: int):
        super().__init__(f"{Command(cmd).name if cmd in Command._value2member_map_ else cmd}: "
                         f"{errno.errorcode.get(error, error)}")
        self.cmd = cmd
        self.errno = error


@dataclass
class Message:
    msg_id: int
    cmd: int
    size: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & wire.FLAG_ERROR)


class Client:
    """One connection to one function's socket."""

    def __init__(self, path: str | os.PathLike, *, memory: GuestMemory | None = None,
                 dma_layout: DmaLayout = DmaLayout.SPEC, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.memory = memory if memory is not None else GuestMemory()
        self.dma_layout = dma_layout
        self.timeout = timeout
        self._next_id = 0x100
        self.dma_requests: list[Message] = []
        self.server_caps: dict = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- raw messages --------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send(self, cmd: int, payload: bytes = b"", *, fds=(), flags: int = wire.TYPE_COMMAND,
             msg_id: int | None = None) -> int:
        if msg_id is None:
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
        self.send_raw(HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), flags, 0) + payload,
                      fds)
        return msg_id

    def _recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return bytes(out)

    def recv_message(self) -> Message:
        data, fds, _, _ = socket.recv_fds(self.sock, HEADER_SIZE, 16)
        if not data:
            raise ConnectionError("server closed the connection")
        head = data + self._recv_exact(HEADER_SIZE - len(data))
        msg_id, cmd, size, flags, error_no = HEADER.unpack(head)
        payload = self._recv_exact(size - HEADER_SIZE) if size > HEADER_SIZE else b""
        return Message(msg_id, cmd, size, flags, error_no, payload, list(fds))

    def wait_reply(self, msg_id: int) -> Message:
        """The reply to `msg_id`, serving the server's DMA requests meanwhile."""
        while True:
            msg = self.recv_message()
            if msg.flags & wire.TYPE_MASK == wire.TYPE_COMMAND:
                self._serve_request(msg)
                continue
            if msg.msg_id != msg_id:
                raise AssertionError(f"reply id {msg.msg_id} while waiting for {msg_id}")
            return msg

    def request(self, cmd: int, payload: bytes = b"", *, fds=()) -> Message:
        """Send a command and return its reply; ClientError on an error reply."""
        reply = self.wait_reply(self.send(cmd, payload, fds=fds))
        if reply.is_error:
            raise ClientError(cmd, reply.error_no)
        return reply

    def errno_of(self, cmd: int, payload: bytes = b"", *, fds=(), flags: int = 0) -> int:
        """Send a command and return the errno of its reply (0 for success)."""
        reply = self.wait_reply(self.send(cmd, payload, fds=fds, flags=flags))
        return reply.error_no if reply.is_error else 0

    def expect_no_reply(self, timeout: float = 0.2) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
            raise AssertionError(f"unexpected message {self.recv_message()}")

    def poll(self, timeout: float = 0.0) -> int:
        """Serve the server's DMA requests that arrive within `timeout`; how many."""
        served = 0
        while select.select([self.sock], [], [], timeout)[0]:
            msg = self.recv_message()
            if msg.flags & wire.TYPE_MASK != wire.TYPE_COMMAND:
                raise AssertionError(f"unexpected reply {msg}")
            self._serve_request(msg)
            served += 1
            timeout = 0.0
        return served

    # -- server requests -----------------------------------------------------------------
    def _serve_request(self, msg: Message) -> None:
        self.dma_requests.append(msg)
        for fd in msg.fds:
            os.close(fd)
        try:
            addr, count, data = _decode_request(self.dma_layout, msg)
            if msg.cmd == Command.DMA_WRITE:
                self.memory.write(addr, data)
                reply = b""
            else:
                reply = _encode_read_reply(self.dma_layout, addr, self.memory.read(addr, count))
            error = 0
        except (ValueError, KeyError):
            error, reply = errno.EINVAL, b""
        except MemoryAccessError:
            error, reply = errno.EFAULT, b""
        if msg.flags & wire.FLAG_NO_REPLY:
            return
        flags = wire.TYPE_REPLY | (wire.FLAG_ERROR if error else 0)
        self.send_raw(HEADER.pack(msg.msg_id, msg.cmd, HEADER_SIZE + len(reply), flags, error)
                      + reply)

    # -- commands ----------------------------------------------------------------------------
    def negotiate(self, caps: dict | None = None) -> dict:
        doc = {"capabilities": caps if caps is not None else {
            "max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
            "max_dma_maps": 65535, "write_multiple": False,
            "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 28}}}
        body = wire.VERSION.pack(0, 0) + json.dumps(doc).encode() + b"\0"
        reply = self.request(Command.VERSION, body)
        raw = reply.payload[wire.VERSION.size:]
        self.server_caps = json.loads(raw.rstrip(b"\0").decode()) if raw else {}
        return self.server_caps

    def dma_map(self, addr: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = wire.DMA_MAP_READ | wire.DMA_MAP_WRITE) -> None:
        payload = wire.DMA_MAP.pack(wire.DMA_MAP.size, flags, offset, addr, size)
        self.request(Command.DMA_MAP, payload, fds=() if fd is None else (fd,))

    def dma_unmap(self, addr: int, size: int, flags: int = 0) -> bytes:
        return self.request(Command.DMA_UNMAP,
                            wire.DMA_UNMAP.pack(wire.DMA_UNMAP.size, flags, addr, size)).payload

    def device_info(self) -> tuple[int, int, int]:
        reply = self.request(Command.DEVICE_GET_INFO, wire.DEVICE_INFO.pack(16, 0, 0, 0))
        _, flags, regions, irqs = wire.DEVICE_INFO.unpack(reply.payload)
        return flags, regions, irqs

    def region_info(self, index: int, argsz: int = 32) -> tuple[int, int, int]:
        """(flags, size, offset) of region `index`."""
        payload = wire.REGION_INFO.pack(argsz, 0, index, 0, 0, 0)
        reply = self.request(Command.DEVICE_GET_REGION_INFO, payload)
        _, flags, _, _, size, offset = wire.REGION_INFO.unpack_from(reply.payload)
        return flags, size, offset

    def irq_info(self, index: int) -> tuple[int, int]:
        """(flags, count) of IRQ index `index`."""
        reply = self.request(Command.DEVICE_GET_IRQ_INFO, wire.IRQ_INFO.pack(16, 0, index, 0))
        _, flags, _, count = wire.IRQ_INFO.unpack(reply.payload)
        return flags, count

    def set_irqs(self, index: int, start: int, count: int, flags: int, fds=(),
                 data: bytes = b"") -> None:
        payload = wire.IRQ_SET.pack(wire.IRQ_SET.size + len(data), flags, index, start,
                                    count) + data
        self.request(Command.DEVICE_SET_IRQS, payload, fds=fds)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, wire.REGION_ACCESS.pack(offset, index, count))
        return reply.payload[wire.REGION_ACCESS.size:]

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        payload = wire.REGION_ACCESS.pack(offset, index, len(data)) + data
        if posted:
            self.send(Command.REGION_WRITE, payload, flags=wire.FLAG_NO_REPLY)
        else:
            self.request(Command.REGION_WRITE, payload)

    def readl(self, index: int, offset: int) -> int:
        return struct.unpack("<I", self.region_read(index, offset, 4))[0]

    def writel(self, index: int, offset: int, value: int, *, posted: bool = False) -> None:
        self.region_write(index, offset, struct.pack("<I", value), posted=posted)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)


def _decode_request(layout: DmaLayout, msg: Message) -> tuple[int, int, bytes]:
    if msg.cmd == Command.DMA_WRITE:
        return wire.decode_dma_payload(layout, msg.payload)
    if msg.cmd == Command.DMA_READ:
        codec = wire.DMA_RW_PACKED if layout is DmaLayout.PACKED else wire.DMA_RW_SPEC
        if len(msg.payload) < codec.size:
            raise ValueError("short DMA_READ")
        addr, count = codec.unpack_from(msg.payload)
        return addr, count, b""
    raise KeyError(msg.cmd)


def _encode_read_reply(layout: DmaLayout, addr: int, data: bytes) -> bytes:
    return wire.encode_dma_request(layout, addr, len(data), data)
