"""Our stack in the lab: a `vfiouser-iommu serve` process and the QEMU that attaches it.

The server runs as a child process (as a user would run it), one socket per function
in a scratch folder; QEMU gets shared memfd RAM, one `vfio-user-pci` per function at
its address, and a DTB that describes our IOMMU to Linux (`dtb.py`): QEMU only writes
the `riscv,pci-iommu` node for its own riscv-iommu-pci.

Default topology: IOMMU at 01.0, iommu-testdev at 02.0, virtio-blk at 03.0 (a scratch
image), virtio-rng at 04.0.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vfiouser_iommu.lab.dtb import add_pci_iommu, dump_dtb
from vfiouser_iommu.lab.paths import Lab
from vfiouser_iommu.topology import (
    FunctionSpec,
    parse_address,
    parse_functions,
    qemu_vfio_user_args,
)


class StackError(Exception):
    pass


def start_server_process(socket_dir: Path, specs: list[str], *, iommu: str | None = None,
                         verbose: int = 0, stderr=None, timeout: float = 30.0,
                         serve_args: list[str] | None = None) -> subprocess.Popen:
    """Run `vfiouser-iommu serve` for the endpoint `specs` (and the IOMMU at `iommu`,
    `SS.F[,options]`) in a child process of its own session; return it once every
    socket listens. Stop it with SIGTERM (it then exits 0 and removes its sockets).
    Raises StackError if it exits or stays silent instead. `serve_args` are more
    options for `serve` (e.g. `--trace FILE`, `--profile FILE`)."""
    argv = [sys.executable, "-m", "vfiouser_iommu", *(["-v"] * verbose), "serve",
            "--socket-dir", str(socket_dir), *(serve_args or [])]
    if iommu is not None:
        argv += ["--iommu", iommu]
    for spec in specs:
        argv += ["--endpoint", spec]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr,
                            start_new_session=True)
    # serve prints one line per function once its socket listens. Raw reads: a
    # buffered readline could swallow several lines that select() then never reports.
    deadline, seen = time.monotonic() + timeout, b""
    while seen.count(b"\n") < len(specs) + (iommu is not None):
        left = deadline - time.monotonic()
        ready = left > 0 and select.select([proc.stdout], [], [], left)[0]
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise StackError(f"vfiouser-iommu serve did not start: {' '.join(argv)}")
        seen += chunk
    return proc


DEFAULT_ENDPOINTS = ("iommu-testdev@02.0", "virtio-blk@03.0", "virtio-rng@04.0")


@dataclass
class Topology:
    """Where our functions sit. A virtio-blk without `disk=` gets the scratch image.

    Endpoints whose address is in `outside_iommu_map` are left out of the DTB's
    iommu-map: Linux then never attaches them to the IOMMU, their device context stays
    invalid, and every DMA they make faults (a way to provoke endpoint faults)."""

    iommu: str = "01.0"
    iommu_options: str = ""          # e.g. "caps=0x..." or named flags, as `serve` takes
    endpoints: list[str] = field(default_factory=lambda: list(DEFAULT_ENDPOINTS))
    outside_iommu_map: list[str] = field(default_factory=list)  # SS.F addresses

    @classmethod
    def parse(cls, iommu: str | None, endpoints: list[str]) -> Topology:
        """From `--iommu SS.F[,opts]` and `--endpoint` options (none: the default set)."""
        address, _, options = (iommu or "01.0").partition(",")
        return cls(address, options, list(endpoints) or list(DEFAULT_ENDPOINTS))

    def endpoint_specs(self, disk: Path) -> list[str]:
        return [f"{e},disk={disk}" if e.startswith("virtio-blk@") and "disk=" not in e else e
                for e in self.endpoints]

    def iommu_spec(self) -> str:
        return self.iommu + (f",{self.iommu_options}" if self.iommu_options else "")


def our_dtb(machine_argv: list[str], functions: list[FunctionSpec], iommu: str,
            outside_iommu_map: list[str] = ()) -> bytes:
    """The DTB QEMU makes for `machine_argv`, plus a riscv,pci-iommu node for our IOMMU
    at `iommu` (SS.F) and an iommu-map of exactly the other `functions`' requester IDs,
    less the addresses in `outside_iommu_map`."""
    slot, fn = parse_address(iommu)
    iommu_bdf = slot << 3 | fn
    outside = {parse_address(a) for a in outside_iommu_map}
    endpoints = [f.requester_id for f in functions
                 if f.devfn != iommu_bdf and (f.slot, f.function) not in outside]
    return add_pci_iommu(dump_dtb(machine_argv), iommu_bdf, endpoints)


class OurStack:
    """Start with `with OurStack(lab, workdir) as stack:`; `stack.qemu_args()` attaches it."""

    def __init__(self, lab: Lab, workdir: Path, topology: Topology | None = None,
                 memory: str = "1G", verbose: int = 1, disk_size: int = 64 << 20,
                 serve_args: list[str] | None = None):
        self.lab = lab
        self.serve_args = list(serve_args or [])
        self.workdir = Path(workdir)
        self.topology = topology or Topology()
        self.memory = memory
        self.verbose = verbose
        self.disk_size = disk_size
        self.socket_dir = self.workdir / "sockets"
        self.disk = self.workdir / "disk.img"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.functions = parse_functions(self.topology.iommu,
                                         self.topology.endpoint_specs(self.disk))

    def start(self, timeout: float = 30.0) -> OurStack:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if not self.disk.exists():
            with open(self.disk, "wb") as f:
                f.truncate(self.disk_size)
        with open(self.log_path, "w") as log:
            try:
                self.proc = start_server_process(
                    self.socket_dir, self.topology.endpoint_specs(self.disk),
                    iommu=self.topology.iommu_spec(), verbose=self.verbose, stderr=log,
                    timeout=timeout, serve_args=self.serve_args)
            except StackError as e:
                raise StackError(f"{e}\n{self.server_log()[-800:]}") from None
        return self

    def stop(self) -> int | None:
        """SIGTERM the server (it closes its sessions and removes its sockets)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()
        code, self.proc = self.proc.returncode, None
        return code

    def __enter__(self) -> OurStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def control_path(self) -> Path:
        """The server's control socket (`vfiouser-iommu inspect` it)."""
        return self.socket_dir / "control.sock"

    def server_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def iommu_bdf(self) -> int:
        slot, fn = parse_address(self.topology.iommu)
        return slot << 3 | fn

    def write_dtb(self, machine_argv: list[str]) -> Path:
        """The machine's DTB with a riscv,pci-iommu node for our IOMMU and an iommu-map
        covering exactly our endpoints' requester IDs (less `outside_iommu_map`)."""
        dtb = our_dtb(machine_argv, self.functions, self.topology.iommu,
                      self.topology.outside_iommu_map)
        path = self.workdir / "virt.dtb"
        path.write_bytes(dtb)
        return path

    def qemu_args(self) -> list[str]:
        """Shared RAM and one vfio-user-pci per function (add after the machine args)."""
        return qemu_vfio_user_args(self.socket_dir, self.functions, self.memory)
