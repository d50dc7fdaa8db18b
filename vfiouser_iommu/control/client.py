"""A blocking client of the control socket (`vfiouser-iommu inspect`, tests).

    with ControlConnection("/tmp/vfu") as c:          # a socket dir or the socket
        c.execute("walk", did=0x10, iova=0x1000, access="read")

Replies are matched to requests by order; event lines that arrive in between are kept
for `events()`.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections import deque
from pathlib import Path

CONTROL_SOCKET = "control.sock"


class ControlError(Exception):
    """The server answered with an error (`class_`, `desc`), or the connection broke."""

    def __init__(self, desc: str, class_: str = "ConnectionError"):
        super().__init__(f"{class_}: {desc}" if class_ != "ConnectionError" else desc)
        self.desc = desc
        self.class_ = class_


def control_path(where: str | os.PathLike) -> Path:
    """The control socket of a socket folder, or `where` itself."""
    path = Path(where)
    return path / CONTROL_SOCKET if path.is_dir() else path


class ControlConnection:
    def __init__(self, where: str | os.PathLike, timeout: float = 10.0) -> None:
        self.path = control_path(where)
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(self.path))
        except OSError as e:
            self.sock.close()
            raise ControlError(f"cannot connect to {self.path}: {e.strerror or e}") from None
        self._buffer = b""
        self._events: deque[dict] = deque()
        self.greeting = self._read_message(time.monotonic() + timeout)
        if "QMP" not in self.greeting:
            raise ControlError(f"{self.path} did not greet like a control socket")

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- requests -------------------------------------------------------------------------
    def execute(self, name: str, **arguments):
        """Run a command; return its "return" value or raise ControlError."""
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.send_raw((json.dumps(request) + "\n").encode())
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read_message(deadline)
            if "event" in message:
                self._events.append(message)
                continue
            if "error" in message:
                error = message["error"]
                raise ControlError(error.get("desc", "?"), error.get("class", "GenericError"))
            return message.get("return")

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ControlError(f"control socket write failed: {e}") from None

    def read_message(self, timeout: float | None = None) -> dict:
        """The next line from the server (reply or event), as sent."""
        return self._read_message(time.monotonic() + (timeout or self.timeout))

    def events(self, timeout: float) -> list[dict]:
        """Events received so far, waiting up to `timeout` for at least one."""
        deadline = time.monotonic() + timeout
        while not self._events and time.monotonic() < deadline:
            try:
                message = self._read_message(deadline)
            except TimeoutError:
                break
            if "event" in message:
                self._events.append(message)
        out = list(self._events)
        self._events.clear()
        return out

    # -- lines ----------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no answer from {self.path}")
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ControlError(f"{self.path} closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)
