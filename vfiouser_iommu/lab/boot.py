"""Booting lab guests: the QEMU command line, the console, the verdict.

A guest is the lab's kernel with an initramfs (see `initramfs.py`) on QEMU's riscv64
`virt` machine under TCG. `run_guest` streams the console, stops at the deadline or on
Ctrl-C, always leaves nothing running, and returns the guest's verdict.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TextIO

from vfiouser_iommu.lab.initramfs import Initramfs, Verdict, parse_console
from vfiouser_iommu.lab.paths import Lab
from vfiouser_iommu.topology import shared_ram_args

KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet"
DEFAULT_MEMORY = "1G"


def default_script(name: str = "demo.sh") -> str:
    return resources.files("vfiouser_iommu.lab").joinpath("guest", name).read_text()


def machine_args(lab: Lab, memory: str = DEFAULT_MEMORY, smp: int = 2,
                 machine: str = "virt,aia=aplic-imsic", reboot: bool = False) -> list[str]:
    """What every lab guest has: the machine, firmware, no display. Unless `reboot`,
    a guest reboot ends QEMU like a power-off does."""
    return [lab.qemu, "-M", machine, "-m", memory, "-smp", str(smp), "-nographic",
            *([] if reboot else ["-no-reboot"]), "-bios", "default"]


def kernel_args(lab: Lab, initrd: Path, cmdline: str = KERNEL_CMDLINE,
                append: str = "") -> list[str]:
    """`append` adds to the kernel command line (after the lab's own arguments)."""
    return ["-kernel", lab.kernel, "-initrd", str(initrd), "-append",
            f"{cmdline} {append}".strip()]


#: A module `lab boot --module` loads: (name, .ko path, module parameters).
ExtraModule = tuple[str, Path, str]


def parse_module_option(text: str) -> ExtraModule:
    """`PATH.ko [PARAM=VALUE ...]` -> (name, path, params); ValueError if it is no .ko."""
    path, _, params = text.strip().partition(" ")
    ko = Path(path).expanduser()
    if ko.suffix != ".ko":
        raise ValueError(f"--module {path}: want a .ko file")
    if not ko.is_file():
        raise ValueError(f"--module {path}: no such file")
    return ko.stem.replace("-", "_"), ko, params.strip()


def guest_initramfs(lab: Lab, script: str, modules: list[str] | None = None,
                    files: dict[str, bytes] | None = None,
                    extra_modules: list[ExtraModule] | None = None) -> Initramfs:
    """An initramfs for `script`, loading `modules` (default: all the lab has), then
    `extra_modules` (each reported as an `insmod-NAME` result)."""
    names = lab.module_order if modules is None else [
        m for m in lab.module_order if m in set(modules)]
    return Initramfs(busybox=Path(lab.busybox), script=script,
                     modules=[(n, Path(lab.modules[n])) for n in names],
                     files=dict(files or {}), extra_modules=list(extra_modules or []))


@dataclass
class GuestRun:
    verdict: Verdict
    console: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
    returncode: int | None = None
    init_seconds: float | None = None  # from QEMU start to the guest's init running
    server_log: str = ""               # our server's log, when our stack was booted
    hints: list[str] = field(default_factory=list)  # one-line notes for the user


def run_guest(argv: list[str], timeout: float, echo: TextIO | None = sys.stdout,
              on_line: Callable[[str], None] | None = None) -> GuestRun:
    """Run QEMU until it exits or `timeout` seconds pass; nothing is left running."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    run = GuestRun(Verdict([], None))
    try:
        run.timed_out = not _pump(proc, started + timeout, lines, echo, on_line, run, started)
        if not run.timed_out:
            try:
                proc.wait(timeout=5)  # its console closed: QEMU is on its way out
            except subprocess.TimeoutExpired:
                pass
    finally:
        stop_process(proc)
    run.console = lines
    run.seconds = time.monotonic() - started
    run.returncode = proc.returncode
    run.verdict = parse_console(lines)
    return run


def _pump(proc: subprocess.Popen, deadline: float, lines: list[str], echo: TextIO | None,
          on_line: Callable[[str], None] | None, run: GuestRun, started: float) -> bool:
    """Copy the console until QEMU closes it (True) or the deadline passes (False)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    pending = b""
    try:
        while time.monotonic() < deadline:
            try:
                ready = sel.select(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except KeyboardInterrupt:
                return True          # Ctrl-C ends the guest like a power-off would
            if not ready:
                if proc.poll() is not None:
                    return True
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return True
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if line.startswith("@@INIT") and run.init_seconds is None:
                    run.init_seconds = time.monotonic() - started
                lines.append(line)
                if echo is not None:
                    echo.write(line + "\n")
                    echo.flush()
                if on_line is not None:
                    on_line(line)
        return False
    finally:
        if pending:
            lines.append(pending.decode("utf-8", "replace"))
        sel.close()


def stop_process(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Terminate a process group started with start_new_session, then kill it."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if proc.stdout is not None:
        proc.stdout.close()


def smoke_boot(lab: Lab, timeout: float = 120) -> float:
    """Boot the kernel to a one-line script; return seconds; raise if it fails."""
    from vfiouser_iommu.lab.debian import LabError

    script = 'pass boot "$(uname -r)"\n'
    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-") as tmp:
        initrd = guest_initramfs(lab, script, modules=[]).write(Path(tmp) / "initrd.gz")
        run = run_guest(machine_args(lab, memory="512M") + kernel_args(lab, initrd),
                        timeout, echo=None)
    if not run.verdict.passed:
        tail = " | ".join(run.console[-5:])
        raise LabError(f"the lab kernel did not boot ({run.verdict.summary()}): {tail}")
    return run.seconds


#: Where `boot_reference(testdev=True)` puts QEMU's iommu-testdev.
REFERENCE_TESTDEV = "04.0"


def guest_hints(lab: Lab, run: GuestRun, iommu_options: str | None = None) -> list[str]:
    """One-line notes about known guest-kernel bugs the run may meet on our IOMMU with
    `iommu_options` (None: QEMU's built-in IOMMU); see lab/known_bugs.py."""
    from vfiouser_iommu.lab.known_bugs import hints_for_guest

    return hints_for_guest(lab.kernel_version, run.console, iommu_options)


def reference_args(disk: Path, iommu_addr: str = "01.0", blk_addr: str = "02.0",
                   rng_addr: str = "03.0", cache: str = "unsafe") -> list[str]:
    """QEMU's built-in riscv-iommu-pci with virtio-blk and virtio-rng behind it; `cache`
    is the drive's cache mode (unsafe ignores flushes; writeback honours them, as our
    virtio-blk does)."""
    return [
        "-device", f"riscv-iommu-pci,addr={iommu_addr}",
        "-drive", f"file={disk},if=none,id=disk0,format=raw,cache={cache}",
        "-device", f"virtio-blk-pci,drive=disk0,addr={blk_addr},iommu_platform=on,"
                   "disable-legacy=on",
        "-device", f"virtio-rng-pci,addr={rng_addr},iommu_platform=on,disable-legacy=on",
    ]


def reference_net_args(tap: str, iommu_addr: str = "01.0", net_addr: str = "02.0",
                       net_options: str = "") -> list[str]:
    """QEMU's built-in riscv-iommu-pci with its own virtio-net-pci behind it, on the tap
    `tap` that QEMU opens by name (so QEMU runs in the tap's network namespace).
    vhost=off: QEMU moves the frames itself, as our server does; romfile="": no iPXE.
    `net_options` (",key=value...") are added to the virtio-net-pci device."""
    return [
        "-device", f"riscv-iommu-pci,addr={iommu_addr}",
        "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-pci,netdev=net0,addr={net_addr},iommu_platform=on,"
                   f"disable-legacy=on,romfile={net_options}",
    ]


KEEP_RUNNING_MARK = "@@KEEP-RUNNING"


def keep_running_script(script: str) -> str:
    """`script`, then the verdict line, then an idle guest that runs until stopped (so
    that a person or a test can inspect it: `lab boot --keep-running`)."""
    return (f'{script}\necho "@@DONE $?"\necho "{KEEP_RUNNING_MARK}"\n'
            "while :; do sleep 3600; done\n")


def make_scratch_disk(path: Path, size: int = 64 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def boot_reference(lab: Lab, script: str, timeout: float, echo: TextIO | None = sys.stdout,
                   disk_size: int = 64 << 20, files: dict[str, bytes] | None = None,
                   append: str = "", extra_modules: list[ExtraModule] | None = None,
                   testdev: bool = False, cache: str = "unsafe",
                   memfd: bool = False) -> GuestRun:
    """Boot a guest on QEMU's built-in IOMMU with virtio-blk + virtio-rng behind it
    (and QEMU's iommu-testdev at 04.0 with `testdev`). `cache`: the drive's cache mode;
    `memfd`: guest RAM as the same shared memfd our stack uses (benchmarks compare
    like with like)."""
    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-") as tmp:
        initrd = guest_initramfs(lab, script, files=files, extra_modules=extra_modules
                                 ).write(Path(tmp) / "initrd.gz")
        disk = make_scratch_disk(Path(tmp) / "disk.img", disk_size)
        argv = (machine_args(lab) + kernel_args(lab, initrd, append=append)
                + reference_args(disk, cache=cache)
                + (shared_ram_args(DEFAULT_MEMORY) if memfd else []))
        if testdev:
            argv += ["-device", f"iommu-testdev,addr={REFERENCE_TESTDEV}"]
        run = run_guest(argv, timeout, echo)
        run.hints = guest_hints(lab, run)
        return run


def boot_ours(lab: Lab, script: str, timeout: float, echo: TextIO | None = sys.stdout,
              topology=None, workdir: Path | None = None, memory: str = DEFAULT_MEMORY,
              verbose: int = 1, reboot: bool = False, disk_size: int = 64 << 20,
              files: dict[str, bytes] | None = None,
              on_line: Callable[[str], None] | None = None, append: str = "",
              serve_args: list[str] | None = None,
              extra_modules: list[ExtraModule] | None = None) -> GuestRun:
    """Boot a guest on our IOMMU (a `vfiouser-iommu serve` child) with its endpoints.

    `workdir` keeps the sockets, the scratch disk, the DTB and the server log; a
    temporary folder is used (and removed) when it is None. With `reboot`, a guest
    reboot resets the machine (our functions get DEVICE_RESET) instead of ending it.
    `serve_args` go to `serve` (e.g. `--trace FILE`, `--profile FILE`). The server's
    control socket is `workdir/sockets/control.sock`.
    """
    from vfiouser_iommu.lab.stack import OurStack

    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        stack = OurStack(lab, work, topology, memory=memory, verbose=verbose,
                         disk_size=disk_size, serve_args=serve_args)
        machine = machine_args(lab, memory=memory, reboot=reboot)
        dtb = stack.write_dtb(machine)
        initrd = guest_initramfs(lab, script, files=files, extra_modules=extra_modules
                                 ).write(work / "initrd.gz")
        with stack:
            argv = (machine + kernel_args(lab, initrd, append=append) + stack.qemu_args()
                    + ["-dtb", str(dtb)])
            run = run_guest(argv, timeout, echo, on_line)
        run.server_log = stack.server_log()
        run.hints = guest_hints(lab, run, stack.topology.iommu_options)
        return run
