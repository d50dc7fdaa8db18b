"""`vfiouser-iommu lab ...`: provision the guest lab, show it, boot guests."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

HELP = """\
The guest lab: a QEMU >= 10.1 with vfio-user-pci, riscv-iommu-pci and iommu-testdev,
a riscv64 Linux kernel with the riscv-iommu driver built in, its modules, and busybox,
kept in a cache folder (default ~/.cache/vfiouser-iommu, or $VFIOUSER_IOMMU_LAB).

  provision   build or check the lab (a second run checks and returns in seconds)
  status      print what the lab holds (versions, paths)
  boot        boot a guest and run a guest script; exits with the guest's verdict
  qemu-args   print the QEMU arguments that attach vfio-user functions
  dtb         write the device tree that describes our IOMMU to Linux (for -dtb)

Ready QEMU configurations that use these are in the project's qemu-configs/ folder.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="provision the guest lab, show it, boot guests",
                         description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    p = cmds.add_parser("provision", help="build or check the lab",
                        description="Build the lab from Debian unstable's packages (the mirror "
                        "comes from this machine's apt configuration; override with "
                        "VFIOUSER_IOMMU_MIRROR), or check an existing one.")
    p.add_argument("--kernel", type=Path, metavar="PATH",
                   help="use your own riscv64 kernel image (Image or vmlinux) instead of "
                        "Debian's; it needs riscv-iommu built in")
    p.add_argument("--modules", type=Path, metavar="DIR",
                   help="with --kernel: its module tree (the folder holding modules.dep)")
    p.add_argument("--kbuild", type=Path, metavar="DIR",
                   help="your kernel's build tree (where you ran make; it has Module.symvers), "
                        "for building kernel modules such as the project's test module; "
                        "with Debian's kernel the lab fetches the matching headers itself")
    p.add_argument("--refresh", action="store_true",
                   help="resolve current package versions and rebuild even if the lab exists")
    p.add_argument("--no-boot-check", action="store_true",
                   help="skip the check that the kernel boots")
    p.set_defaults(func=cmd_provision)

    p = cmds.add_parser("status", help="print what the lab holds")
    p.add_argument("--json", action="store_true",
                   help="print the lab's facts as one JSON object (paths, versions, the "
                        "kbuild tree for `make -C` and the cross compiler to build with)")
    p.set_defaults(func=cmd_status)

    p = cmds.add_parser("boot", help="boot a guest and run a guest script",
                        description="Boot a riscv64 guest, run a busybox sh script in it after "
                        "mounting proc, sys, devtmpfs and /tmp and loading the lab's modules, "
                        "stream the console, and exit 0 if every @@RESULT the script reported "
                        "passed. Helpers in the script: pass NAME DETAIL, fail NAME DETAIL, "
                        "check NAME COMMAND...")
    p.add_argument("--reference", action="store_true",
                   help="use QEMU's built-in riscv-iommu-pci (with virtio-blk-pci and "
                        "virtio-rng-pci behind it) instead of ours")
    p.add_argument("--script", type=Path, metavar="PATH",
                   help="guest script (default: the demo script)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop the guest after this long (default: 300, none with "
                        "--keep-running)")
    p.add_argument("--quiet", action="store_true", help="do not stream the console")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep the sockets, scratch disk, DTB and server log here "
                        "(default: a temporary folder)")
    p.add_argument("--server-log", action="store_true",
                   help="print our server's log after the guest stops")
    p.add_argument("--iommu", metavar="SS.F[,OPTIONS]",
                   help="our IOMMU's address and options, as `serve --iommu` takes them "
                        "(default: 01.0)")
    p.add_argument("--endpoint", action="append", default=[], metavar="KIND@SS.F[,opt=val]",
                   help="an endpoint behind our IOMMU (repeatable; default: iommu-testdev@02.0 "
                        "virtio-blk@03.0 virtio-rng@04.0; a virtio-blk without disk= gets a "
                        "scratch image)")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="more kernel command-line arguments (e.g. 'iommu.strict=1')")
    p.add_argument("--file", action="append", default=[], metavar="GUEST_PATH=HOST_PATH",
                   help="copy a host file into the guest's initramfs at GUEST_PATH (its "
                        "folders are created; repeatable)")
    p.add_argument("--module", action="append", default=[], metavar="'PATH.ko [PARAMS]'",
                   help="a kernel module to load after the lab's and before the script, "
                        "with optional module parameters; its insmod result is reported as "
                        "@@RESULT insmod-NAME (repeatable)")
    p.add_argument("--disk-size", type=int, default=64, metavar="MIB",
                   help="size of the scratch disk image (default: %(default)s MiB)")
    p.add_argument("--keep-running", action="store_true",
                   help="after the script, keep the guest running (until Ctrl-C or "
                        "--timeout) and print our server's control socket, so that "
                        "`vfiouser-iommu inspect` can look at the live guest")
    p.add_argument("--trace", type=Path, metavar="FILE.json",
                   help="our server writes a trace-event file (serve --trace)")
    p.set_defaults(func=cmd_boot)

    p = cmds.add_parser("qemu-args", help="print QEMU arguments for vfio-user functions",
                        description="Print the QEMU arguments that attach the functions a "
                        "`vfiouser-iommu serve` with the same options provides: shared memfd "
                        "RAM and one vfio-user-pci per function at its address.")
    p.add_argument("--socket-dir", type=Path, required=True, metavar="DIR")
    p.add_argument("--iommu", metavar="SS.F", help="the IOMMU function's address")
    p.add_argument("--endpoint", action="append", default=[], metavar="KIND@SS.F",
                   help="an endpoint function (repeatable)")
    p.add_argument("--memory", default="1G", help="guest RAM size (default: %(default)s)")
    p.set_defaults(func=cmd_qemu_args)

    _add_dtb_parser(cmds)


def _add_dtb_parser(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "dtb", help="write the DTB that describes our IOMMU to Linux",
        description="QEMU describes only its own riscv-iommu-pci in the device tree. Write "
        "the tree QEMU makes for the lab's machine (or the one a -readconfig file "
        "describes) with a riscv,pci-iommu node for our IOMMU and an iommu-map of the "
        "endpoints' requester IDs, for QEMU's -dtb option. Give the same --iommu and "
        "--endpoint addresses as to `serve` (endpoint options are ignored).")
    p.add_argument("--iommu", default="01.0", metavar="SS.F",
                   help="the IOMMU function's address (default: %(default)s)")
    p.add_argument("--endpoint", action="append", default=[], metavar="KIND@SS.F",
                   help="an endpoint behind the IOMMU (repeatable)")
    p.add_argument("--outside-iommu-map", action="append", default=[], metavar="SS.F",
                   help="leave this endpoint out of the iommu-map: Linux will not attach it "
                        "to the IOMMU and its DMA faults (repeatable)")
    p.add_argument("--readconfig", type=Path, metavar="FILE",
                   help="the machine as this QEMU config file describes it (default: the "
                        "lab's: virt,aia=aplic-imsic, 1G, 2 CPUs)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    p.set_defaults(func=cmd_dtb)


def _lab_or_exit():
    from vfiouser_iommu.lab.paths import NoLab, load_lab

    try:
        return load_lab()
    except NoLab as e:
        print(f"vfiouser-iommu: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_provision(args: argparse.Namespace) -> int:
    from vfiouser_iommu.lab.debian import LabError
    from vfiouser_iommu.lab.provision import provision

    if args.modules and not args.kernel:
        print("vfiouser-iommu: --modules goes with --kernel", file=sys.stderr)
        return 2
    try:
        provision(kernel=args.kernel, modules=args.modules, refresh=args.refresh,
                  check_boot=not args.no_boot_check, kbuild=args.kbuild)
    except LabError as e:
        print(f"vfiouser-iommu: lab provision failed: {e}", file=sys.stderr)
        return 1
    return 0


def lab_facts(lab) -> dict:
    """The manifest plus what a module build needs, as `lab status --json` prints it."""
    import dataclasses
    import shutil

    facts = dataclasses.asdict(lab)
    compiler = f"{lab.cross_compile}gcc" if lab.cross_compile else ""
    facts["cross_compiler"] = (shutil.which(compiler) or compiler) if compiler else ""
    facts["make_modules"] = (["make", "-C", lab.kbuild, *lab.kbuild_make_args, "M=DIR",
                              "modules"] if lab.kbuild else [])
    return facts


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab_or_exit()
    if args.json:
        import json

        print(json.dumps(lab_facts(lab), indent=2))
        return 0
    print(f"lab:      {lab.root}")
    print(f"qemu:     {lab.qemu_version} ({lab.qemu_source})\n          {lab.qemu}")
    print(f"kernel:   {lab.kernel_version} ({lab.kernel_source})\n          {lab.kernel}")
    print(f"modules:  {' '.join(lab.module_order) or '(none)'}")
    print(f"busybox:  {lab.busybox_version}\n          {lab.busybox}")
    if lab.kbuild:
        make = " ".join(lab_facts(lab)["make_modules"])
        print(f"kbuild:   {lab.kbuild}\n          {make}")
    else:
        print("kbuild:   (none: provision with --kbuild DIR to build modules for your kernel)")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from vfiouser_iommu.endpoints import ENDPOINTS
    from vfiouser_iommu.lab.boot import (
        boot_ours,
        boot_reference,
        default_script,
        parse_module_option,
    )
    from vfiouser_iommu.lab.stack import StackError, Topology
    from vfiouser_iommu.topology import IOMMU_KIND, parse_functions

    if args.reference and (args.iommu or args.endpoint or args.keep_running or args.trace):
        print("vfiouser-iommu: --iommu/--endpoint/--keep-running/--trace are for our stack, "
              "not --reference", file=sys.stderr)
        return 2
    topology = Topology.parse(args.iommu, args.endpoint)
    try:
        for spec in parse_functions(topology.iommu, topology.endpoint_specs(Path("disk.img"))):
            if spec.kind != IOMMU_KIND and spec.kind not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {spec.kind!r} "
                                 f"(known: {', '.join(sorted(ENDPOINTS))})")
    except ValueError as e:
        print(f"vfiouser-iommu: {e}", file=sys.stderr)
        return 2
    try:
        files = _guest_files(args.file)
        modules = [parse_module_option(m) for m in args.module]
    except ValueError as e:
        print(f"vfiouser-iommu: {e}", file=sys.stderr)
        return 2
    lab = _lab_or_exit()
    script = args.script.read_text() if args.script else default_script()
    echo = None if args.quiet else sys.stdout
    disk_size = args.disk_size << 20
    timeout = args.timeout or (10.0 ** 9 if args.keep_running else 300.0)
    extras = {"files": files, "append": args.append, "extra_modules": modules}
    if args.reference:
        run = boot_reference(lab, script, timeout, echo=echo, disk_size=disk_size, **extras)
    else:
        workdir, on_line = args.workdir, None
        if args.keep_running:
            script, workdir, on_line = _keep_running(script, workdir)
        serve_args = ["--trace", str(args.trace.resolve())] if args.trace else []
        try:
            run = boot_ours(lab, script, timeout, echo=echo, workdir=workdir,
                            topology=topology, disk_size=disk_size, on_line=on_line,
                            serve_args=serve_args, **extras)
        except StackError as e:
            print(f"vfiouser-iommu: {e}", file=sys.stderr)
            return 1
        if args.server_log:
            print("--- our server's log (vfiouser-iommu -v serve)")
            print(run.server_log, end="")
    for hint in run.hints:
        print(hint)
    status = "PASS" if run.verdict.passed else "FAIL"
    extra = " (timed out)" if run.timed_out else ""
    boot = f", init after {run.init_seconds:.1f}s" if run.init_seconds else ""
    print(f"== {status}: {run.verdict.summary()}{extra} [{run.seconds:.1f}s{boot}]")
    return 0 if run.verdict.passed else 1


def _keep_running(script: str, workdir: Path | None):
    """The script, workdir and console watcher of `lab boot --keep-running`."""
    import tempfile

    from vfiouser_iommu.lab.boot import KEEP_RUNNING_MARK, keep_running_script

    workdir = workdir or Path(tempfile.mkdtemp(prefix="vfiouser-iommu-"))
    control = (workdir / "sockets" / "control.sock").resolve()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # A SIGTERM (say from `timeout`) stops the guest and our server like Ctrl-C does,
    # instead of leaving them running in their own sessions.
    signal.signal(signal.SIGTERM, interrupt)

    def on_line(line: str) -> None:
        if line.strip() == KEEP_RUNNING_MARK:
            print(f"== the guest keeps running; our server's control socket is {control}\n"
                  f"   e.g. vfiouser-iommu inspect {control} stats   (Ctrl-C stops the guest)",
                  flush=True)

    return keep_running_script(script), workdir, on_line


def _guest_files(options: list[str]) -> dict[str, bytes]:
    """`--file GUEST_PATH=HOST_PATH` options as {guest path: contents}."""
    files = {}
    for option in options:
        guest, sep, host = option.partition("=")
        if not sep or not guest.startswith("/") or not host:
            raise ValueError(f"--file {option}: want /GUEST/PATH=HOST_PATH")
        try:
            files[guest] = Path(host).expanduser().read_bytes()
        except OSError as e:
            raise ValueError(f"--file {option}: {e.strerror}") from None
    return files


def cmd_qemu_args(args: argparse.Namespace) -> int:
    import shlex

    from vfiouser_iommu import topology

    try:
        functions = topology.parse_functions(iommu=args.iommu, endpoints=args.endpoint)
    except ValueError as e:
        print(f"vfiouser-iommu: {e}", file=sys.stderr)
        return 2
    argv = topology.qemu_vfio_user_args(args.socket_dir, functions, args.memory)
    print(" ".join(shlex.quote(a) for a in argv))
    return 0


def cmd_dtb(args: argparse.Namespace) -> int:
    from vfiouser_iommu.lab.boot import machine_args
    from vfiouser_iommu.lab.dtb import DtbError
    from vfiouser_iommu.lab.stack import our_dtb
    from vfiouser_iommu.topology import parse_functions

    try:
        functions = parse_functions(iommu=args.iommu, endpoints=args.endpoint)
    except ValueError as e:
        print(f"vfiouser-iommu: {e}", file=sys.stderr)
        return 2
    lab = _lab_or_exit()
    if args.readconfig is not None:
        if not args.readconfig.is_file():
            print(f"vfiouser-iommu: no file {args.readconfig}", file=sys.stderr)
            return 2
        machine = [lab.qemu, "-readconfig", str(args.readconfig), "-M", "virt", "-nographic"]
    else:
        machine = machine_args(lab)
    try:
        dtb = our_dtb(machine, functions, args.iommu, args.outside_iommu_map)
    except (DtbError, ValueError) as e:
        print(f"vfiouser-iommu: {e}", file=sys.stderr)
        return 1
    args.output.write_bytes(dtb)
    print(f"{args.output}: riscv,pci-iommu at {args.iommu}, iommu-map of "
          f"{len(functions) - 1 - len(args.outside_iommu_map)} endpoint(s)")
    return 0
