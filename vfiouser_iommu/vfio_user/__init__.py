"""vfio-user transport: the wire format, the server loop, DMA maps and IRQ eventfds.

`wire` describes every message; `session` serves one connection to one PCI function;
`server` runs one event loop over one UNIX socket per function; `dma` holds a
connection's DMA map table; `client` is a blocking client for tests and tools. What was
checked against QEMU's `vfio-user-pci` is in docs/vfio-user.md.
"""

from .server import FunctionPort, Server, serve
from .session import Session
from .wire import Command, DmaLayout

__all__ = ["Command", "DmaLayout", "FunctionPort", "Server", "Session", "serve"]
