"""What the death-and-reconnect and data-safety tests share: our server with QEMU
attached to some of its functions, a QEMU whose console we read line by line and can
kill at any moment, and a look at the server process's fds, VMAs and memory.

(A module of its own, not conftest.py: two test files import it.)
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vfiouser_iommu.lab.boot import guest_initramfs, kernel_args, machine_args, stop_process
from vfiouser_iommu.lab.paths import Lab
from vfiouser_iommu.lab.stack import OurStack, Topology
from vfiouser_iommu.topology import qemu_vfio_user_args

# A function served to the test itself, never to QEMU: it must keep answering while
# QEMU dies and comes back.
WITNESS = "iommu-testdev@05.0"
QEMU_FUNCTIONS = ("01.0", "02.0", "03.0", "04.0")


def start_stack(lab: Lab, workdir: Path, *, verbose: int = 1,
                disk_size: int = 64 << 20) -> OurStack:
    topology = Topology()
    topology.endpoints.append(WITNESS)
    stack = OurStack(lab, workdir, topology, verbose=verbose, disk_size=disk_size)
    return stack.start()


def qemu_argv(lab: Lab, stack: OurStack, script: str, *, files: dict[str, bytes] | None = None,
              name: str = "guest") -> list[str]:
    """A guest on the stack's functions except the witness."""
    machine = machine_args(lab, memory=stack.memory)
    dtb = stack.write_dtb(machine)
    initrd = guest_initramfs(lab, script, files=files).write(stack.workdir / f"{name}.initrd")
    functions = [f for f in stack.functions if f.addr in QEMU_FUNCTIONS]
    return (machine + kernel_args(lab, initrd)
            + qemu_vfio_user_args(stack.socket_dir, functions, stack.memory)
            + ["-dtb", str(dtb)])


class Qemu:
    """A QEMU child whose console is read line by line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.console: list[str] = []
        self._pending = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        """The first new console line satisfying `predicate`, or None at the deadline
        or when QEMU's console closes."""
        deadline = time.monotonic() + timeout
        seen = len(self.console)
        while True:
            for line in self.console[seen:]:
                if predicate(line):
                    return line
            seen = len(self.console)
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                if left <= 0 or self.proc.poll() is not None:
                    return None

    def _read(self, timeout: float) -> bool:
        """Read what the console has; False once it is closed."""
        if not self._selector.select(timeout):
            return True
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return False
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        self.console += [raw.decode("utf-8", "replace").rstrip("\r") for raw in complete]
        return True

    def drain(self, seconds: float) -> None:
        """Keep reading the console for `seconds`."""
        self.wait_for(lambda line: False, seconds)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self._selector.close()
        stop_process(self.proc)

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ProcessUsage:
    """What a process holds: open fds, VMAs, resident memory."""

    fds: int
    vmas: int
    rss_kib: int
    fd_targets: list[str] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def of(cls, pid: int) -> ProcessUsage:
        targets = []
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                targets.append(f"{name}->{os.readlink(f'/proc/{pid}/fd/{name}')}")
            except OSError:
                pass
        fds = len(targets)
        with open(f"/proc/{pid}/maps", "rb") as maps:
            vmas = sum(1 for _ in maps)
        with open(f"/proc/{pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return cls(fds, vmas, rss, targets)


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()
