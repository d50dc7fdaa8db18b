"""`vfiouser-iommu smoke`: the guest battery a kernel CI job runs against a patch."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HELP = """\
Boot a riscv64 kernel (default: the lab's; --kernel for your own) on our RISC-V IOMMU
and run the guest battery against its riscv-iommu driver: probe with no driver error,
IRQ vectors, IOMMU groups, a checksummed virtio-blk round trip, virtio-rng, a provoked
DMA fault and the driver's fault line, reboot and re-probe, and the project's test
kernel module (built for the kernel under test: paging domains of every page size,
unmap and remap, MSI page tables in flat and MRIF mode), all with our invalidation
checker on: a driver that changes a table and uses it before the invalidation the
spec requires fails the invalidation-checker check. Every boot has a deadline:
a kernel that panics or hangs fails its checks with the console tail, it never hangs
the job.

Output: a progress line per check, a summary, and on request KTAP (--ktap, the
kernel's own test format) and JUnit XML (--junit, what GitLab, GitHub and Jenkins
show), each check with its time and, on failure, the console and server-log lines
that explain it. Exit status 0 only when every check passed; 1 when one failed; 2 for
bad arguments or a missing lab.

Examples:
  vfiouser-iommu smoke
  vfiouser-iommu smoke --kernel arch/riscv/boot/Image --kbuild . \\
      --modules mods/lib/modules/7.3.0 --ktap smoke.ktap --junit smoke.xml
  vfiouser-iommu smoke --only probe 'iommu-group-*' --iommu svpbmt=off
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("smoke", help="run the guest battery on a kernel (KTAP, JUnit)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", type=Path, metavar="IMAGE",
                   help="your riscv64 kernel image (riscv-iommu built in); default: the lab's")
    p.add_argument("--modules", type=Path, metavar="DIR",
                   help="with --kernel: its module tree (lib/modules/VERSION), where "
                        "virtio_blk and virtio_rng are found unless built in")
    p.add_argument("--kbuild", type=Path, metavar="DIR",
                   help="with --kernel: the tree it was built in (where you ran make), to "
                        "build the project's test kernel module for it; without, the "
                        "module's suite fails")
    p.add_argument("--ktap", type=Path, metavar="FILE", help="write the results as KTAP")
    p.add_argument("--junit", type=Path, metavar="FILE", help="write the results as JUnit XML")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="run only these suites or checks (shell patterns allowed)")
    p.add_argument("--iommu", default="", metavar="OPTIONS",
                   help="options for our IOMMU, as `serve --iommu 01.0,OPTIONS` takes them "
                        "(e.g. svpbmt=off, caps=0x...)")
    p.add_argument("--strict", action="store_true",
                   help="besides the invalidation checker (always on unless check=off), "
                        "run our IOMMU with cache=max,negative=on: a missing invalidation "
                        "then shows as a wrong translation at once")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="extra kernel command-line arguments")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="deadline of each guest boot (default: %(default)s)")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep each boot's server log, DTB and disk image here "
                        "(default: a temporary folder)")
    p.add_argument("--list", action="store_true", help="list the suites and checks, then exit")
    p.set_defaults(func=cmd_smoke)


def cmd_smoke(args: argparse.Namespace) -> int:
    from vfiouser_iommu.smoke.battery import SUITES, select

    if args.list:
        for suite in SUITES:
            print(f"{suite.name}: {suite.about}")
            for name in suite.check_names():
                print(f"    {name}")
        return 0
    if (args.modules or args.kbuild) and not args.kernel:
        print("smoke: --modules and --kbuild go with --kernel", file=sys.stderr)
        return 2
    try:
        chosen = select(SUITES, args.only)
    except ValueError as e:
        print(f"smoke: {e} (see smoke --list)", file=sys.stderr)
        return 2
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, chosen, args.workdir)
    with tempfile.TemporaryDirectory(prefix="vfiouser-iommu-smoke-") as tmp:
        return _run(args, chosen, Path(tmp))


def _run(args: argparse.Namespace, chosen, workdir: Path) -> int:
    from vfiouser_iommu.lab.debian import LabError
    from vfiouser_iommu.lab.paths import NoLab, load_lab
    from vfiouser_iommu.smoke.battery import Smoke, iommu_options, lab_for_kernel, user_kbuild
    from vfiouser_iommu.smoke.report import ktap, write_junit

    try:
        lab = load_lab()
        if args.kernel is not None:
            lab = lab_for_kernel(lab, args.kernel, args.modules, workdir / "kernel")
            kbuild = user_kbuild(args.kbuild, workdir / "kmod") if args.kbuild else None
        else:
            kbuild = lab.kbuild_for_modules() if lab.kbuild else None
    except (NoLab, LabError) as e:
        print(f"smoke: {e}", file=sys.stderr)
        return 2
    options = iommu_options(args.iommu, args.strict)
    header = [f"vfiouser-iommu smoke: kernel {lab.kernel_version} ({lab.kernel_source})",
              f"QEMU {lab.qemu_version}; IOMMU options: {options}"]
    for line in header:
        print(line)
    started = time.monotonic()
    smoke = Smoke(lab, workdir, iommu_options=args.iommu, timeout=args.timeout,
                  append=args.append, strict=args.strict, kbuild=kbuild)
    suites = smoke.run(chosen)
    checks = [c for s in suites for c in s.checks]
    failed = [f"{s.name}/{c.name}" for s in suites for c in s.checks if not c.passed]
    if args.ktap:
        args.ktap.write_text(ktap(suites, header))
    if args.junit:
        write_junit(suites, args.junit)
    print(f"== smoke: {len(checks) - len(failed)}/{len(checks)} checks passed in "
          f"{time.monotonic() - started:.1f}s" + (f"; FAILED: {' '.join(failed)}"
                                                  if failed else ""))
    for path in filter(None, (args.ktap, args.junit)):
        print(f"   wrote {path}")
    return 1 if failed else 0
