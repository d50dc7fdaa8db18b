"""A served IOMMU function with guest RAM and tables, a testdev and the control socket,
for the control-socket, inspect and trace tests. (A module of its own: test files import
it.)"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

from served import Served

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
from iommu_tables import RAM_BASE, RAM_SIZE, Builder, atp  # noqa: E402

from vfiouser_iommu.control import start_control  # noqa: E402
from vfiouser_iommu.control.client import ControlConnection  # noqa: E402
from vfiouser_iommu.endpoints.testdev import IommuTestDev  # noqa: E402
from vfiouser_iommu.iommu import Access, Request  # noqa: E402
from vfiouser_iommu.iommu.walk import SV39  # noqa: E402
from vfiouser_iommu.iommu_pci import IommuFunction  # noqa: E402
from vfiouser_iommu.memory import GuestMemory  # noqa: E402
from vfiouser_iommu.topology import parse_function  # noqa: E402

DID, PSCID = 0x10, 0x7
DATA = RAM_BASE + (1 << 20)
IOVA = 0x4000_5000
CQ = RAM_BASE + (40 << 20)
FQ = RAM_BASE + (41 << 20)


class Stack:
    """A served IOMMU function (with a DC for DID, an Sv39 table mapping IOVA, command
    and fault queues on) and a testdev, plus the control socket."""

    def __init__(self, tmp_path: Path, modes: dict | None = None, trace: Path | None = None):
        self.function = IommuFunction(modes=modes)
        iommu = self.function.iommu
        memory: GuestMemory = self.function.memory
        memory.add_region(RAM_BASE, memoryview(bytearray(RAM_SIZE)))
        b = Builder(memory)
        root = b.alloc()
        self.pt = b.root(SV39)
        self.leaf = b.map(SV39, self.pt, IOVA, DATA)
        b.set_dc(root, 3, DID, 64, tc=1, ta=PSCID << 12, fsc=atp(8, self.pt >> 12))
        iommu.mmio_write(0x18, 8, (CQ >> 12) << 10 | 5)          # cqb: 64 entries
        iommu.mmio_write(0x48, 4, 1)                              # cqcsr.cqen
        iommu.mmio_write(0x28, 8, (FQ >> 12) << 10 | 5)          # fqb
        iommu.mmio_write(0x4C, 4, 3)                              # fqcsr.fqen, fie
        iommu.mmio_write(0x10, 8, (root >> 12) << 10 | 4)        # ddtp: 3LVL
        self.cq_tail = 0
        self.builder = b
        self.served = Served(tmp_path, {"iommu": self.function, "dev": IommuTestDev()})
        self.path = tmp_path / "control.sock"
        self.spec = parse_function("iommu-testdev@02.0")
        self.trace = None
        done = threading.Event()

        def start():
            endpoints = [(self.spec, self.served.functions["dev"])]
            if trace is not None:
                from vfiouser_iommu.control.trace import TraceWriter
                self.trace = TraceWriter(trace, self.served.server, self.function,
                                         endpoints, interval=0.1)
            self.control = start_control(self.served.server, self.path, self.function,
                                         endpoints, self.trace)
            done.set()

        self.served.server.call_soon(start)
        assert done.wait(5)

    def on_loop(self, fn):
        """Run `fn` on the server's loop thread and return its result."""
        box, done = [], threading.Event()
        self.served.server.call_soon(lambda: (box.append(fn()), done.set()))
        assert done.wait(5)
        return box[0]

    def translate(self, iova, access=Access.READ, did=DID):
        return self.on_loop(lambda: self.function.iommu.translate(Request(did, None, iova,
                                                                          access)))

    def submit(self, *commands: int) -> None:
        """Commands through the command queue, executed on the loop."""
        iommu = self.function.iommu

        def run():
            for command in commands:
                address = CQ + 16 * self.cq_tail
                iommu.memory.write_int(address, 8, command & (1 << 64) - 1)
                iommu.memory.write_int(address + 8, 8, command >> 64)
                self.cq_tail = (self.cq_tail + 1) % 64
            iommu.mmio_write(0x24, 4, self.cq_tail)
            return iommu.mmio_read(0x20, 4)

        assert self.on_loop(run) == self.cq_tail

    def connect(self, **kwargs) -> ControlConnection:
        return ControlConnection(self.path, **kwargs)

    def stop(self):
        self.on_loop(self.control.close)
        if self.trace is not None:
            self.on_loop(self.trace.close)
        self.served.stop()


def raw_client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(5)
    return sock


def read_line(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed"
        data += chunk
    return json.loads(data)
