"""A client for QEMU's qtest protocol: drive a machine's memory and MMIO with no guest CPU.

QEMU is started with `-qtest stdio -S` (the CPUs never run); each command is a text
line on QEMU's stdin and QEMU answers `OK ...` or `FAIL ...` on its stdout.
Asynchronous `IRQ raise/lower` lines (after `irq_intercept_in`) are queued, not
mistaken for answers.

    with QTest(extra_args=["-device", "iommu-testdev"]) as qt:
        qt.writel(addr, value); qt.readl(addr); qt.memwrite(addr, data)
"""

from __future__ import annotations

import base64
import os
import selectors
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

from vfiouser_iommu.lab.boot import stop_process
from vfiouser_iommu.lab.paths import Lab, load_lab

DEFAULT_MACHINE = "virt,aia=aplic-imsic,acpi=off"


class QTestError(Exception):
    """QEMU answered FAIL, died, or did not answer in time."""


class QTest:
    """One QEMU process in qtest mode."""

    def __init__(self, extra_args: list[str] = (), memory: str = "512M",
                 machine: str = DEFAULT_MACHINE, lab: Lab | None = None,
                 timeout: float = 30.0, qemu: str | None = None,
                 memory_backend: str | None = None):
        self.lab = lab
        self.timeout = timeout
        self.irqs: deque[str] = deque()
        binary = qemu or (lab or load_lab()).qemu
        machine_opts = machine
        mem_args = ["-m", memory]
        if memory_backend:
            # Shared RAM for vfio-user functions: DMA_MAP then carries the memfd.
            machine_opts += ",memory-backend=ram0"
            mem_args += ["-object", f"{memory_backend},id=ram0,size={memory}"]
        self.argv = [binary, "-M", machine_opts, *mem_args, "-nodefaults", "-display", "none",
                     "-qtest", "stdio", "-S", *extra_args]
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self.stderr_path: Path | None = None

    # -- lifetime -----------------------------------------------------------------------------
    def start(self) -> QTest:
        import tempfile

        err = tempfile.NamedTemporaryFile(prefix="qtest-", suffix=".log", delete=False)
        self.stderr_path = Path(err.name)
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=err, start_new_session=True)
        err.close()
        self._sel.register(self._proc.stdout, selectors.EVENT_READ)
        return self

    def stop(self) -> None:
        """QEMU in qtest mode does not exit at the end of its input: terminate it."""
        if self._proc is None:
            return
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        stop_process(self._proc)
        self._sel.close()
        self._proc = None
        if self.stderr_path is not None:
            self.stderr_path.unlink(missing_ok=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to QEMU (a crash, for tests of client death); `stop` still cleans up."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, sig)
            self._proc.wait(timeout=30)

    def __enter__(self) -> QTest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stderr(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_text(errors="replace")
        return ""

    # -- the protocol -------------------------------------------------------------------------
    def _readline(self, deadline: float) -> str:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(timeout=left):
                raise QTestError(f"no answer from QEMU within {self.timeout}s")
            chunk = os.read(self._proc.stdout.fileno(), 65536)
            if not chunk:
                raise QTestError(f"QEMU exited: {self.stderr().strip()[-500:]}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def command(self, line: str) -> str:
        """Send one command; return what follows OK (raise on FAIL)."""
        if self._proc is None:
            raise QTestError("QTest is not started")
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise QTestError(f"QEMU exited: {self.stderr().strip()[-500:]}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._readline(deadline)
            if answer.startswith("IRQ "):
                self.irqs.append(answer)
                continue
            if answer.startswith("OK"):
                return answer[3:]
            raise QTestError(f"{line!r}: {answer}")

    def _read(self, cmd: str, addr: int) -> int:
        return int(self.command(f"{cmd} {addr:#x}"), 16)

    def readb(self, addr: int) -> int:
        return self._read("readb", addr)

    def readw(self, addr: int) -> int:
        return self._read("readw", addr)

    def readl(self, addr: int) -> int:
        return self._read("readl", addr)

    def readq(self, addr: int) -> int:
        return self._read("readq", addr)

    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb {addr:#x} {value & 0xff:#x}")

    def writew(self, addr: int, value: int) -> None:
        self.command(f"writew {addr:#x} {value & 0xffff:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel {addr:#x} {value & 0xffffffff:#x}")

    def writeq(self, addr: int, value: int) -> None:
        self.command(f"writeq {addr:#x} {value & 0xffffffffffffffff:#x}")

    def memread(self, addr: int, length: int) -> bytes:
        if length == 0:
            return b""
        return base64.b64decode(self.command(f"b64read {addr:#x} {length:#x}"))

    def memwrite(self, addr: int, data: bytes) -> None:
        if data:
            encoded = base64.b64encode(bytes(data)).decode()
            self.command(f"b64write {addr:#x} {len(data):#x} {encoded}")

    def memset(self, addr: int, length: int, value: int = 0) -> None:
        self.command(f"memset {addr:#x} {length:#x} {value & 0xff:#x}")

    def clock_step(self, ns: int | None = None) -> int:
        return int(self.command("clock_step" + (f" {ns}" if ns else "")))
