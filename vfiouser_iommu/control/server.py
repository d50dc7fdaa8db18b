"""The control socket: JSON lines in the style of QMP, served from the vfio-user loop.

A client connects to `SOCKET_DIR/control.sock` (mode 0600) and gets a greeting line::

    {"QMP": {"version": {...}, "capabilities": ["events"]}}

then sends one JSON object per line, `{"execute": NAME, "arguments": {...}, "id": ...}`,
and gets one line back: `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`
(with the request's "id" when it had one). Commands work right away; `qmp_capabilities`
(optional) with `{"enable": ["events"]}`, or `subscribe`, asks for asynchronous
`{"event": NAME, "data": {...}, "timestamp": {...}}` lines, which only such clients
get. The commands themselves are in `commands.py`.

It runs on the same `selectors` loop as the vfio-user functions (`Server.watch`), so it
must never make that loop wait:

- every socket is non-blocking; a client gets at most `LINES_PER_TURN` requests handled
  per loop turn (more wait for the next turn) and every command's work is bounded;
- a line longer than `MAX_LINE` is refused with an error and skipped;
- output waits in a per-client buffer; above `OUTPUT_LIMIT` the server stops reading
  that client's requests and drops its events (then tells it how many it lost), so a
  client that does not read costs bounded memory and nothing else;
- garbage, broken JSON, disconnects and errors of any kind end in an error reply or
  a closed connection, never in an exception that leaves this module.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
MAX_LINE = 64 << 10
OUTPUT_LIMIT = 1 << 20
LINES_PER_TURN = 8
RECV_SIZE = 64 << 10


class CommandError(Exception):
    """A command failed: `class_` is the QMP error class."""

    def __init__(self, desc: str, class_: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.class_ = class_


Handler = Callable[..., object]


def _event_line(kind: str, data: dict) -> bytes:
    now = time.time()
    stamp = {"seconds": int(now), "microseconds": int((now % 1) * 1e6)}
    return (json.dumps({"event": kind, "data": data, "timestamp": stamp},
                       default=str) + "\n").encode()


class ControlClient:
    """One connection: its buffers and what it subscribed to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.discarding = False     # skipping the rest of an over-long line
        self.events: set[str] | None = None   # None: no events; empty set: all
        self.dropped = 0
        self.closed = False
        self.scheduled = False

    def wants(self, kind: str) -> bool:
        return self.events is not None and (not self.events or kind in self.events)


class ControlServer:
    """Serves the control protocol on `path` from `server`'s loop (`vfio_user.Server`)."""

    def __init__(self, server, path: str | os.PathLike, commands: dict[str, Handler],
                 greeting: dict) -> None:
        self.server = server
        self.path = Path(path)
        self.commands = commands
        self.greeting = (json.dumps({"QMP": greeting}) + "\n").encode()
        self.clients: dict[socket.socket, ControlClient] = {}
        self.listener = _listen(self.path)
        server.watch(self.listener, selectors.EVENT_READ, self._on_accept)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        self.server.unwatch(self.listener)
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _on_accept(self, events: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:   # out of fds, ...: refuse, and keep serving
            log.warning("control: accept failed: %s", e)
            return
        sock.setblocking(False)
        if len(self.clients) >= MAX_CLIENTS:
            try:
                sock.send(b'{"error": {"class": "GenericError", "desc": "too many clients"}}\n')
            except OSError:
                pass
            sock.close()
            return
        client = ControlClient(sock)
        self.clients[sock] = client
        self._send(client, self.greeting)

    def _close(self, client: ControlClient) -> None:
        if client.closed:
            return
        client.closed = True
        self.clients.pop(client.sock, None)
        self.server.unwatch(client.sock)
        client.sock.close()

    # -- input ----------------------------------------------------------------------------
    def _on_client(self, client: ControlClient, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(client)
        if events & selectors.EVENT_READ and not client.closed:
            self._read(client)

    def _read(self, client: ControlClient) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:
            self._close(client)
            return
        client.inbuf += data
        self._handle_lines(client)

    def _handle_lines(self, client: ControlClient) -> None:
        client.scheduled = False
        handled = 0
        while not client.closed and len(client.outbuf) < OUTPUT_LIMIT:
            newline = client.inbuf.find(b"\n")
            if newline < 0:
                if len(client.inbuf) > MAX_LINE:
                    if not client.discarding:
                        self._reply(client, None, error=("GenericError",
                                                         f"line longer than {MAX_LINE} bytes"))
                    client.discarding = True
                    client.inbuf.clear()
                break
            if handled == LINES_PER_TURN:
                # Bounded work per turn: the rest waits for the next loop turn.
                client.scheduled = True
                self.server.call_soon(lambda: self._resume(client))
                break
            line = bytes(client.inbuf[:newline])
            del client.inbuf[:newline + 1]
            if client.discarding:
                client.discarding = False
                continue
            if line.strip():
                self._execute(client, line)
                handled += 1
        self._update_watch(client)

    def _resume(self, client: ControlClient) -> None:
        if not client.closed:
            self._handle_lines(client)

    def _execute(self, client: ControlClient, line: bytes) -> None:
        request_id = None
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as e:
            self._reply(client, None, error=("GenericError", f"JSON parse error: {e}"))
            return
        if not isinstance(request, dict):
            self._reply(client, None, error=("GenericError", "expected a JSON object"))
            return
        request_id = request.get("id")
        name, arguments = request.get("execute"), request.get("arguments", {})
        if not isinstance(name, str):
            self._reply(client, request_id, error=("GenericError", "no 'execute' string"))
            return
        if not isinstance(arguments, dict):
            self._reply(client, request_id, error=("GenericError",
                                                   "'arguments' must be an object"))
            return
        handler = self.commands.get(name)
        if handler is None and name not in _SESSION_COMMANDS:
            self._reply(client, request_id, error=("CommandNotFound",
                                                   f"the command {name} has not been found"))
            return
        try:
            if name in _SESSION_COMMANDS:
                result = _SESSION_COMMANDS[name](self, client, **arguments)
            else:
                result = handler(**arguments)
        except CommandError as e:
            self._reply(client, request_id, error=(e.class_, e.desc))
        except TypeError as e:
            self._reply(client, request_id, error=("GenericError", f"bad arguments: {e}"))
        except Exception as e:  # a bug of ours: the client gets it, the loop goes on
            log.exception("control: %s failed", name)
            self._reply(client, request_id, error=("GenericError", f"internal error: {e!r}"))
        else:
            self._reply(client, request_id, result=result)

    # -- output ---------------------------------------------------------------------------
    def _reply(self, client: ControlClient, request_id, *, result=None, error=None) -> None:
        if error is not None:
            message: dict = {"error": {"class": error[0], "desc": error[1]}}
        else:
            message = {"return": {} if result is None else result}
        if request_id is not None:
            message["id"] = request_id
        try:
            line = json.dumps(message, default=str)
        except (TypeError, ValueError) as e:
            line = json.dumps({"error": {"class": "GenericError",
                                         "desc": f"unencodable reply: {e}"}})
        self._send(client, (line + "\n").encode())

    def event(self, kind: str, data: dict) -> None:
        """Send an event to every client that asked for it (an Observer listener)."""
        line = None
        for client in list(self.clients.values()):
            if not client.wants(kind):
                continue
            if len(client.outbuf) >= OUTPUT_LIMIT:
                client.dropped += 1
                continue
            if client.dropped:
                self._send(client, _event_line("EVENTS_DROPPED", {"count": client.dropped}))
                client.dropped = 0
            if line is None:
                line = _event_line(kind, data)
            self._send(client, line)

    def _send(self, client: ControlClient, data: bytes) -> None:
        if client.closed:
            return
        client.outbuf += data
        self._flush(client)

    def _flush(self, client: ControlClient) -> None:
        was_full = len(client.outbuf) >= OUTPUT_LIMIT
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.info("control: client write failed: %s", e)
                self._close(client)
                return
            del client.outbuf[:sent]
        if was_full and len(client.outbuf) < OUTPUT_LIMIT and client.inbuf \
                and not client.scheduled:
            client.scheduled = True
            self.server.call_soon(lambda: self._resume(client))
        self._update_watch(client)

    def _update_watch(self, client: ControlClient) -> None:
        if client.closed:
            return
        events = 0
        if len(client.outbuf) < OUTPUT_LIMIT:
            events |= selectors.EVENT_READ
        if client.outbuf:
            events |= selectors.EVENT_WRITE
        self.server.watch(client.sock, events,
                          lambda ready, c=client: self._on_client(c, ready))


# -- commands about the session itself ----------------------------------------------------
def _qmp_capabilities(control: ControlServer, client: ControlClient, enable=()) -> dict:
    if not isinstance(enable, (list, tuple)) or not all(isinstance(e, str) for e in enable):
        raise CommandError("'enable' must be a list of capability names")
    unknown = set(enable) - {"events"}
    if unknown:
        raise CommandError(f"unknown capabilities: {', '.join(sorted(unknown))}")
    if "events" in enable:
        client.events = set()
    return {}


def _subscribe(control: ControlServer, client: ControlClient, events=None) -> dict:
    """Events from now on: all, or only those named."""
    if events is None:
        client.events = set()
    elif isinstance(events, list) and all(isinstance(e, str) for e in events) and events:
        client.events = set(events)
    else:
        raise CommandError("'events' must be a non-empty list of event names")
    return {"events": sorted(client.events) or "all"}


def _unsubscribe(control: ControlServer, client: ControlClient) -> dict:
    client.events = None
    return {}


_SESSION_COMMANDS = {"qmp_capabilities": _qmp_capabilities, "subscribe": _subscribe,
                     "unsubscribe": _unsubscribe}
SESSION_COMMAND_NAMES = tuple(_SESSION_COMMANDS)


def _listen(path: Path) -> socket.socket:
    """A non-blocking listening socket at `path`, mode 0600 from its creation."""
    if len(os.fsencode(path)) >= 108:
        raise ValueError(f"socket path too long for sun_path: {path}")
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock
