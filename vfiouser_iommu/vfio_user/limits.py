"""What one client may cost the server: every bound, named once (docs/robustness.md).

The server serves a client it does not trust (a fuzzer, a buggy VMM) next to clients
it must keep serving. Everything a client can make the server hold is bounded here,
and exceeding a bound is a clear errno, never an exception or an unbounded queue:

| resource | bound | when exceeded |
|---|---|---|
| message size | `MAX_MSG_SIZE` (a REGION_WRITE of `MAX_DATA_XFER_SIZE`) | drained, E2BIG |
| region access | `MAX_DATA_XFER_SIZE` bytes | E2BIG |
| fds with one message | `RECV_MAX_FDS` (we advertise `MAX_MSG_FDS`) | connection closed |
| DMA maps | `dma_map_limits()`: per client and server-wide | ENOSPC |
| messages per readable event | `BATCH` | the loop serves the others first |
| queued replies | `OUT_BACKLOG` bytes | we stop reading that client |

DMA maps hold no file descriptor: the fd a DMA_MAP brings is closed once mmapped
(`dma.map_fd`). What a map does hold is a VMA, and a process has at most
`vm.max_map_count` of them (65 530 by default); running out would make every later
mmap, and Python's own allocations, fail. So the maps' server-wide bound is what the
VMA budget allows, shared equally among the functions, and each client is told its
share as `max_dma_maps` in the VERSION reply: what it is advertised, it can hold.

The fds the server does hold are bounded by its functions, not by its clients: per
function a listening socket, one connection, its interrupts' eventfds and the fds of
the message being read. `fds_needed` counts them; `serve` raises the soft
RLIMIT_NOFILE to cover them and warns when the hard limit cannot.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable
from pathlib import Path

from .wire import HEADER_SIZE, REGION_ACCESS

log = logging.getLogger(__name__)

MAX_DATA_XFER_SIZE = 1 << 20
# Largest message we read into memory: a REGION_WRITE of MAX_DATA_XFER_SIZE bytes.
MAX_MSG_SIZE = HEADER_SIZE + REGION_ACCESS.size + MAX_DATA_XFER_SIZE
# What we advertise as max_msg_fds, and the room for fds in one recvmsg (more than this
# truncates, and the connection is closed: framing we cannot trust any more).
MAX_MSG_FDS = 8
RECV_MAX_FDS = 16
# Messages handled per readable event before yielding to other connections.
BATCH = 64
# Replies queued for a client that does not read them; beyond this we stop reading its
# requests until it catches up, so a stalled client cannot grow our memory.
OUT_BACKLOG = 4 << 20

# DMA maps one client may hold, whatever the VMA budget (bounds our memory: ~1 KiB each).
MAX_DMA_MAPS_PER_CLIENT = 8192
# VMAs left for everything else (Python's heap, thread stacks, libraries, C fast path).
VMA_RESERVE = 8192
MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")

# fds of the process besides its functions' (stdio, epoll, wake-up pair, logs, disks).
FDS_BASE = 64
# Kept open to be closed when accept() finds the table full, so that the waiting client
# can be accepted and refused instead of left to hang (or the loop to spin).
FD_RESERVE = 1


def vma_budget() -> int:
    """VMAs this process may still create for DMA maps."""
    try:
        limit = int(MAX_MAP_COUNT.read_text())
        with open("/proc/self/maps", "rb") as maps:
            used = sum(1 for _ in maps)
    except (OSError, ValueError):
        return MAX_DMA_MAPS_PER_CLIENT
    return max(limit - used - VMA_RESERVE, 0)


def dma_map_limits(functions: int, budget: int | None = None) -> tuple[int, int]:
    """(per client, server-wide) DMA map bounds for `functions` functions."""
    total = vma_budget() if budget is None else budget
    per_client = min(MAX_DMA_MAPS_PER_CLIENT, total // max(functions, 1))
    return per_client, per_client * max(functions, 1)


def fds_needed(irq_counts: Iterable[int]) -> int:
    """fds the server may hold with one function per `irq_counts` entry (its eventfds)."""
    per_function = [1 + 1 + irqs + RECV_MAX_FDS for irqs in irq_counts]
    return FDS_BASE + FD_RESERVE + sum(per_function)


def ensure_fds(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed` if the hard limit allows; the soft
    limit in force. Warns when it stays below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("RLIMIT_NOFILE is %d, below the %d fds these functions may need: "
                    "clients may be refused", soft, needed)
    return soft
