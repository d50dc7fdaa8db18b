"""The smoke battery: what a kernel CI job runs against a patch to the riscv-iommu driver.

Each *suite* is one guest boot on our IOMMU (the lab's default topology: IOMMU 01.0,
iommu-testdev 02.0, virtio-blk 03.0, virtio-rng 04.0) running one of the lab's guest
scripts; each `@@RESULT` line the script prints is a check, and some checks are made on
the host side afterwards from the server's log and the disk image. Every boot has a
deadline, so a kernel that panics or hangs gives failed checks with the console tail,
never a hung job. A check the guest never reported (it crashed first) fails as "not
reported".
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vfiouser_iommu.lab import kmod
from vfiouser_iommu.lab.boot import GuestRun, boot_ours, default_script
from vfiouser_iommu.lab.debian import LabError
from vfiouser_iommu.lab.initramfs import RESULT_RE, GuestResult
from vfiouser_iommu.lab.kbuild import Kbuild
from vfiouser_iommu.lab.paths import Lab
from vfiouser_iommu.smoke.report import Check, Suite

ENDPOINT_BDFS = ("0000:00:02.0", "0000:00:03.0", "0000:00:04.0")
CONSOLE_TAIL = 25
MISSING_TAIL = 6
_SERVER_LOG_EVIDENCE = re.compile(r"WARNING|ERROR|Traceback|fault cause|stale", re.I)
# Fatal kernel errors. Lockup and stall reports are not among them: an overloaded CI
# host makes a TCG guest report them although nothing is wrong with the kernel.
_PANIC = re.compile(r"Kernel panic|Oops|Unable to handle kernel|BUG: (?!.*lockup)")


@dataclass
class Boot:
    """What one suite's boot produced, for the host-side checks."""

    run: GuestRun
    workdir: Path
    results: dict[str, GuestResult]




def _commands_complete(boot: Boot) -> Check:
    """The driver's probe-time commands ran to completion in our command queue."""
    log = boot.run.server_log
    wanted = (r"IODIR\.INVAL_DDT: done", r"IOTINVAL\.VMA: done", r"IOFENCE\.C .*: done")
    missing = [w for w in wanted if not re.search(w, log)]
    stalled = "stalled the queue" in log
    ok = not missing and not stalled
    detail = "IODIR.INVAL_DDT, IOTINVAL.VMA, IOFENCE.C completed" if ok else \
        f"missing {missing}" + (", the queue stalled" if stalled else "")
    return Check("commands-complete", ok, detail=detail)


def _blk_data_on_image(boot: Boot) -> Check:
    """What the guest wrote through virtio-blk is what the image file holds."""
    result = boot.results.get("virtio-blk-roundtrip")
    if result is None or not result.passed:
        return Check("virtio-blk-data-on-image", False, detail="no virtio-blk round trip")
    words = result.detail.split()
    mib, want = int(words[0]), words[-1]
    with open(boot.workdir / "disk.img", "rb") as f:
        got = hashlib.md5(f.read(mib << 20)).hexdigest()
    return Check("virtio-blk-data-on-image", got == want,
                 detail=f"{mib} MiB md5 {got} on the image, guest read {want}")


def _server_clean(boot: Boot) -> Check:
    """Our server logged no error (a traceback would be our bug, not the driver's)."""
    bad = [line for line in boot.run.server_log.splitlines()
           if " ERROR" in line or "Traceback" in line]
    return Check("server-no-errors", not bad, detail=f"{len(bad)} error lines",
                 evidence=bad[-10:])


def _reset_twice(boot: Boot) -> Check:
    """QEMU reset our IOMMU on the guest's reboot, and the driver set it up again."""
    resets = boot.run.server_log.count("riscv-iommu: device reset")
    probes = len(re.findall(r"IODIR\.INVAL_DDT: done", boot.run.server_log))
    return Check("iommu-reset-and-reprobed", resets >= 2 and probes == 2,
                 detail=f"{resets} device resets, {probes} global IODIR.INVAL_DDT")


_CHECKER_SUMMARY = re.compile(r"invalidation checker: (\d+) distinct stale use\(s\), "
                              r"(\d+) use\(s\) in all")


def _checker_clean(boot: Boot) -> Check:
    """The invalidation checker (check=on) saw the driver use no stale cache entry: every
    change it made to a DC, PC, PTE or MSI PTE was followed by the invalidation the spec
    requires before the IOMMU used it again."""
    log = boot.run.server_log
    m = _CHECKER_SUMMARY.search(log)
    if m is None:
        return Check("invalidation-checker", False,
                     detail="no checker summary in the server log (is check=on?)")
    stale = [line for line in log.splitlines() if "stale use of" in line]
    return Check("invalidation-checker", m.group(1) == "0",
                 detail=f"{m.group(1)} distinct stale uses, {m.group(2)} in all",
                 evidence=stale[:20])


HOST_CHECKS: dict[str, Callable[[Boot], Check]] = {
    "invalidation-checker": _checker_clean,
    "commands-complete": _commands_complete,
    "virtio-blk-data-on-image": _blk_data_on_image,
    "server-no-errors": _server_clean,
    "iommu-reset-and-reprobed": _reset_twice,
}


@dataclass(frozen=True)
class SuiteSpec:
    """One boot of the battery."""

    name: str
    script: str                     # a script of vfiouser_iommu/lab/guest, or ""
    expected: tuple[str, ...]       # the checks the script must report
    about: str
    reboot: bool = False
    host_checks: tuple[str, ...] = ()  # names in HOST_CHECKS
    module_checks: str = ""            # run the test kernel module with checks=THIS
    iommu: str = ""                    # IOMMU options this suite needs

    def guest_script(self) -> str:
        if self.module_checks:
            return f"kmod_run {GUEST_KO} checks={self.module_checks}\n"
        return default_script(self.script)

    def check_names(self) -> list[str]:
        return ["boot", *self.expected, *self.host_checks]


SUITES: tuple[SuiteSpec, ...] = (
    SuiteSpec(
        "probe", "our_iommu.sh",
        ("iommu-probed", "driver-no-errors", "iommu-msix",
         *(f"iommu-group-{bdf}" for bdf in ENDPOINT_BDFS),
         "virtio-blk-roundtrip", "virtio-rng", "dma-fault-reported", "fault-interrupt"),
        "the driver probes our IOMMU with no error, its MSI-X vectors are wired, every "
        "endpoint is in an IOMMU group, virtio-blk and virtio-rng do DMA through it, a "
        "provoked DMA fault reaches the driver's fault handler",
        host_checks=("commands-complete", "virtio-blk-data-on-image", "invalidation-checker",
                     "server-no-errors")),
    SuiteSpec(
        "reboot", "reboot.sh",
        ("first-boot-probe", "second-boot-probe",
         *(f"second-boot-group-{bdf}" for bdf in ENDPOINT_BDFS),
         "second-boot-no-driver-errors", "second-boot-virtio-blk"),
        "the guest reboots, QEMU resets our functions, the driver probes again",
        reboot=True,
        host_checks=("iommu-reset-and-reprobed", "invalidation-checker", "server-no-errors")),
    SuiteSpec(
        "kmod", "",
        ("kmod-setup", "kmod-paging-domain-alloc", "kmod-paging-attach",
         *(f"kmod-{op}-{size}" for op in ("map", "unmap")
           for size in ("4k", "64k", "2m", "1g", "top")),
         "kmod-remap-4k", "kmod-remap-table-as-2m", "kmod-msi-irqs",
         "kmod-msi-flat-delivered", "kmod-msi-pte-invalid", "kmod-msi-pte-misconfigured",
         "kmod-msi-pte-load-fault", "kmod-msi-mrif"),
        "the project's test module, built for this kernel, makes the driver build a paging "
        "domain (Sv57, S and NL invalidations): every page size mapped, DMA through it, "
        "unmap faults, remap; MSI page tables deliver to real IMSIC files, bad MSI PTEs "
        "fault, MRIF sets its pending bit and sends the notice",
        host_checks=("invalidation-checker", "server-no-errors"),
        module_checks="alloc,paging,msi",
        # Linux <= 7.2.13 cannot allocate a paging domain when Svpbmt is advertised
        # (docs/svpbmt.md); S and NL make the driver use its range invalidations.
        iommu="svpbmt=off,s=on,nl=on"),
)

GUEST_KO = f"/kmod/{kmod.NAME}.ko"


def select(suites: tuple[SuiteSpec, ...], only: list[str]) -> list[tuple[SuiteSpec, set[str]]]:
    """The suites to boot and, for each, the check names to report (`only` holds suite
    or check names, shell patterns allowed). ValueError for a name nothing matches."""
    if not only:
        return [(s, set()) for s in suites]
    chosen: dict[str, set[str]] = {}
    for pattern in only:
        hit = False
        for s in suites:
            if fnmatch.fnmatchcase(s.name, pattern):
                chosen[s.name] = set()
                hit = True
                continue
            names = [n for n in s.check_names() if fnmatch.fnmatchcase(n, pattern)]
            if names:
                hit = True
                if chosen.get(s.name, None) != set():
                    chosen.setdefault(s.name, set()).update(names)
        if not hit:
            raise ValueError(f"--only {pattern!r} names no suite or check")
    return [(s, chosen[s.name]) for s in suites if s.name in chosen]


@dataclass
class Smoke:
    """Runs the battery on `lab` (whose kernel may be the user's) and collects suites."""

    lab: Lab
    workdir: Path
    iommu_options: str = ""
    strict: bool = False
    timeout: float = 120.0
    append: str = ""
    kbuild: Kbuild | None = None     # builds the test module; None: module suites fail
    out: TextIO | None = field(default=sys.stdout)
    _module: Path | None = field(default=None, init=False)

    def say(self, text: str) -> None:
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()

    def run(self, chosen: list[tuple[SuiteSpec, set[str]]]) -> list[Suite]:
        return [self.run_suite(spec, wanted) for spec, wanted in chosen]

    def run_suite(self, spec: SuiteSpec, wanted: set[str]) -> Suite:
        from vfiouser_iommu.lab.stack import StackError, Topology

        self.say(f"== {spec.name}: {spec.about}")
        workdir = self.workdir / spec.name
        workdir.mkdir(parents=True, exist_ok=True)
        timer = _Timer(self.say)
        # Linux never invalidates after mapping (the spec lets it), so negative caching
        # (--strict) would fail the module's remap of a page that had just faulted.
        options = iommu_options(",".join(filter(None, [spec.iommu, self.iommu_options])),
                                self.strict and not spec.module_checks)
        topology = Topology.parse(f"01.0,{options}", [])
        started = time.monotonic()
        try:
            run = boot_ours(self.lab, spec.guest_script(), timeout=self.timeout,
                            echo=None, topology=topology, workdir=workdir,
                            reboot=spec.reboot, on_line=timer.on_line,
                            append=self.append, files=self._module_files(spec))
        except (StackError, LabError, OSError) as e:
            return self._not_booted(spec, wanted, str(e), time.monotonic() - started)
        suite = Suite(spec.name, seconds=run.seconds)
        suite.checks = self._checks(spec, run, workdir, timer)
        if wanted:
            suite.checks = [c for c in suite.checks if c.name in wanted or c.name == "boot"]
        failed = [c.name for c in suite.checks if not c.passed]
        self.say(f"   {spec.name}: {len(suite.checks) - len(failed)}/{len(suite.checks)} "
                 f"passed in {run.seconds:.1f}s" + (f"; failed: {' '.join(failed)}"
                                                   if failed else ""))
        return suite

    def _module_files(self, spec: SuiteSpec) -> dict[str, bytes]:
        """The test module for the kernel under test, built once per run."""
        if not spec.module_checks:
            return {}
        if self.kbuild is None:
            raise LabError("no kbuild tree to build the test module for this kernel "
                           "(give --kbuild DIR, the tree the kernel was built in)")
        if self._module is None:
            self.say(f"   building the test module against {self.kbuild.tree}")
            self._module = kmod.build(self.kbuild)
        return {GUEST_KO: self._module.read_bytes()}

    def _checks(self, spec: SuiteSpec, run: GuestRun, workdir: Path,
                timer: _Timer) -> list[Check]:
        evidence = _evidence(run)
        checks = [_boot_check(run, timer, evidence)]
        results = {r.name: r for r in run.verdict.results}
        reason = _why_missing(run, timer)
        for name in [*spec.expected, *(n for n in results if n not in spec.expected)]:
            r = results.get(name)
            if r is None:
                # The boot check carries the whole tail; here, the lines where it ended.
                checks.append(Check(name, False, detail=f"not reported: {reason}",
                                    evidence=["--- guest console, last lines",
                                              *run.console[-MISSING_TAIL:]]))
            else:
                checks.append(Check(name, r.passed, timer.seconds.get(name, 0.0), r.detail,
                                    [] if r.passed else evidence))
        boot = Boot(run, workdir, results)
        for name in spec.host_checks:
            check = HOST_CHECKS[name](boot)
            if not check.passed:
                check.evidence = check.evidence + evidence
            checks.append(check)
            self.say(f"   {'ok  ' if check.passed else 'FAIL'} {check.name} (host)")
        return checks

    def _not_booted(self, spec: SuiteSpec, wanted: set[str], why: str,
                    seconds: float) -> Suite:
        self.say(f"   {spec.name}: could not start: {why}")
        names = [n for n in spec.check_names()[1:] if not wanted or n in wanted]
        checks = [Check("boot", False, seconds, f"not booted: {why}",
                        why.splitlines())]
        checks += [Check(n, False, detail="not run: the guest was not booted") for n in names]
        return Suite(spec.name, checks, seconds)


def iommu_options(user: str, strict: bool = False) -> str:
    """Our IOMMU's options for a smoke boot: the invalidation checker on (the driver must
    give it nothing to report) unless the user says check=off; with `strict`, caches at
    their largest and negative caching too, so a missing invalidation shows at once."""
    given = {item.partition("=")[0] for item in user.split(",") if item}
    extra = [f"{k}={v}" for k, v in (("check", "on"), ("cache", "max"), ("negative", "on"))
             if k not in given and (k == "check" or strict)]
    return ",".join(filter(None, [user, *extra]))


class _Timer:
    """Times each check from the console as it streams, and prints progress."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.last = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.panic: str | None = None

    def on_line(self, line: str) -> None:
        now = time.monotonic()
        if line.startswith("@@INIT"):
            self.last = now
            return
        if self.panic is None and _PANIC.search(line):
            self.panic = line.strip()
            self.say(f"   the guest kernel failed: {self.panic}")
        m = RESULT_RE.search(line)
        if m is None:
            return
        name = m.group(1)
        self.seconds[name] = now - self.last
        self.last = now
        word = "ok  " if m.group(2) == "pass" else "FAIL"
        self.say(f"   {word} {name} ({self.seconds[name]:.1f}s)")


def _boot_check(run: GuestRun, timer: _Timer, evidence: list[str]) -> Check:
    ok = run.init_seconds is not None and run.verdict.exit_status == 0 and not run.timed_out
    if run.timed_out:
        detail = "the guest did not finish before the deadline"
    elif run.init_seconds is None:
        detail = "the guest never reached its init"
    elif run.verdict.exit_status is None:
        detail = "the guest stopped before its script finished"
    else:
        detail = f"init after {run.init_seconds:.1f}s, script exit {run.verdict.exit_status}"
    if timer.panic:
        ok, detail = False, f"{detail}; {timer.panic}"
    return Check("boot", ok, run.init_seconds or run.seconds, detail, [] if ok else evidence)


def _why_missing(run: GuestRun, timer: _Timer) -> str:
    if timer.panic:
        return f"the kernel failed ({timer.panic})"
    if run.timed_out:
        return "the guest hung (deadline passed)"
    if run.init_seconds is None:
        return "the guest never reached its init"
    return "the guest script stopped before it"


def _evidence(run: GuestRun) -> list[str]:
    server = run.server_log.splitlines()
    notable = [line for line in server if _SERVER_LOG_EVIDENCE.search(line)][-15:]
    return ([f"--- guest console, last {CONSOLE_TAIL} lines"] + run.console[-CONSOLE_TAIL:]
            + ["--- server log: warnings and faults"] + notable
            + ["--- server log: last lines"] + server[-5:])


def lab_for_kernel(lab: Lab, kernel: Path, modules: Path | None, workdir: Path) -> Lab:
    """The lab with the user's kernel image and the guest modules from their module
    tree (modules built into the kernel are simply not loaded)."""
    from vfiouser_iommu.lab.provision import GUEST_MODULES, _user_kernel_version, load_modules

    if not kernel.is_file():
        raise LabError(f"--kernel {kernel}: no such file")
    order: list[tuple[str, bytes]] = []
    if modules is not None:
        if not modules.is_dir():
            raise LabError(f"--modules {modules}: no such folder")
        builtin = _builtin_modules(modules)
        order = load_modules(modules, [m for m in GUEST_MODULES if m not in builtin])
    dest = workdir / "modules"
    dest.mkdir(parents=True, exist_ok=True)
    for name, ko in order:
        (dest / f"{name}.ko").write_bytes(ko)
    return dataclasses.replace(
        lab, kernel=str(kernel), kernel_version=_user_kernel_version(kernel),
        kernel_source=f"user {kernel}", module_order=[n for n, _ in order],
        modules={n: str(dest / f"{n}.ko") for n, _ in order})


def _builtin_modules(tree: Path) -> set[str]:
    found = next(tree.rglob("modules.builtin"), None)
    if found is None:
        return set()
    names = (Path(line.strip()).name for line in found.read_text().splitlines())
    return {re.sub(r"\.ko$", "", n).replace("-", "_") for n in names if n}


def user_kbuild(tree: Path, cache: Path) -> Kbuild:
    """The user's kernel build tree, cross-compiling with the lab's compiler."""
    from vfiouser_iommu.lab.kbuild import CROSS_COMPILE

    tree = tree.expanduser().resolve()
    if not (tree / "Makefile").exists():
        raise LabError(f"--kbuild {tree}: no Makefile there (want the kernel's build tree)")
    return Kbuild(tree, ("ARCH=riscv", f"CROSS_COMPILE={CROSS_COMPILE}"), cache)
