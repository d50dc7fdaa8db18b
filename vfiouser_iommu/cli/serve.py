"""`vfiouser-iommu serve`: serve PCI functions over vfio-user until SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from ..control import CONTROL_SOCKET, start_control
from ..control.trace import TraceWriter
from ..endpoints import ENDPOINTS, build_endpoint
from ..iommu_pci import build_iommu_function
from ..topology import IOMMU_KIND, FunctionSpec, check_unique, parse_function
from ..vfio_user import DmaLayout, Server

log = logging.getLogger(__name__)

HELP = f"""\
Serve PCI functions to QEMU's vfio-user-pci, one UNIX socket per function
(SOCKET_DIR/SS.F.sock, mode 0600), all from one process. Start this before QEMU;
stop it with SIGTERM.

With --iommu SS.F the RISC-V IOMMU is served too (1b36:0014, the function Linux's
riscv-iommu driver binds to), and every endpoint's DMA is translated by it for the
endpoint's requester ID (bus 0, so its devfn). IOMMU options after the address:
caps=0xVALUE (the whole capabilities register) and/or capability flags such as
ats=off, sv57=off, msi_flat=off, pas=48 (default: everything we implement), and the
introspection modes (docs/introspection.md): check=on (the invalidation checker),
cache=spec|max|none, negative=on (cache V=0 entries until invalidated).

Endpoint kinds: {", ".join(sorted(ENDPOINTS))}. Options:
  iommu-testdev@SS.F
  virtio-blk@SS.F,disk=PATH[,readonly=on]
  virtio-rng@SS.F
  virtio-net@SS.F,tap=NAME[,netns=NAME][,mac=XX:XX:XX:XX:XX:XX][,offload=off]
      an existing tap, in network namespace NAME (/run/netns/NAME or a path) if given
Example: vfiouser-iommu serve --socket-dir /tmp/vfu --iommu 01.0 \\
             --endpoint iommu-testdev@02.0 --endpoint virtio-blk@03.0,disk=disk.img

The control socket (SOCKET_DIR/control.sock unless --control moves it) answers
`vfiouser-iommu inspect SOCKET_DIR COMMAND`: registers, contexts, walks, caches,
faults, commands, statistics, modes (docs/introspection.md).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve PCI functions over vfio-user",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket-dir", type=Path, required=True, metavar="DIR",
                   help="folder for the sockets (created if missing)")
    p.add_argument("--endpoint", action="append", default=[], metavar="KIND@SS.F[,opt=val]",
                   type=_function_spec, help="an endpoint function on bus 0 (repeatable)")
    p.add_argument("--iommu", metavar="SS.F[,caps=0xVALUE][,FLAG=on|off]", type=_iommu_spec,
                   help="serve the RISC-V IOMMU at SS.F, translating every endpoint's DMA")
    p.add_argument("--dma-layout", choices=[m.value for m in DmaLayout],
                   default=DmaLayout.SPEC.value,
                   help="DMA_READ/DMA_WRITE layout the client speaks (default: %(default)s)")
    p.add_argument("--control", type=Path, metavar="PATH",
                   help="the control socket (default: SOCKET_DIR/control.sock)")
    p.add_argument("--no-control", action="store_true", help="serve no control socket")
    p.add_argument("--trace", type=Path, metavar="FILE.json",
                   help="write a Chrome trace-event file of the IOMMU's commands, faults, "
                        "invalidations, interrupts, stale uses and per-endpoint rates "
                        "(open it in ui.perfetto.dev); needs --iommu")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="run under cProfile and write its statistics (pstats) to FILE at exit")
    p.add_argument("--stats", type=Path, metavar="FILE",
                   help="write the server's CPU and wall time, page faults and context "
                        "switches (JSON) to FILE at exit")
    p.set_defaults(func=cmd_serve)


def _function_spec(text: str) -> FunctionSpec:
    try:
        return parse_function(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _iommu_spec(text: str) -> FunctionSpec:
    try:
        return parse_function(f"{IOMMU_KIND}@{text}")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.endpoint and args.iommu is None:
        print("serve: nothing to serve (give --endpoint or --iommu)", file=sys.stderr)
        return 2
    if args.trace and args.iommu is None:
        print("serve: --trace traces the IOMMU: give --iommu", file=sys.stderr)
        return 2
    try:
        specs = ([args.iommu] if args.iommu else []) + args.endpoint
        check_unique(specs)
        functions = [(build_endpoint(spec.kind, spec.options), spec) for spec in args.endpoint]
        if args.iommu is not None:
            iommu = build_iommu_function(args.iommu.options)
            for function, spec in functions:
                function.set_dma_view(iommu.iommu.dma_view(spec.requester_id))
            functions.insert(0, (iommu, args.iommu))
    except ValueError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    if args.iommu is not None and iommu.iommu.config.svpbmt:
        from ..lab.known_bugs import SERVE_SVPBMT_HINT

        print(SERVE_SVPBMT_HINT, file=sys.stderr, flush=True)
    args.socket_dir.mkdir(parents=True, exist_ok=True)
    server = Server(dma_layout=DmaLayout(args.dma_layout))
    iommu_function = functions[0][0] if args.iommu is not None else None
    endpoints = [(spec, f) for f, spec in functions if f is not iommu_function]
    control = trace = None
    if args.trace:
        try:
            trace = TraceWriter(args.trace, server, iommu_function, endpoints)
        except OSError as e:
            print(f"serve: --trace {args.trace}: {e.strerror or e}", file=sys.stderr)
            return 2
    if not args.no_control:
        path = args.control or args.socket_dir / CONTROL_SOCKET
        try:
            control = start_control(server, path, iommu_function, endpoints, trace)
        except (OSError, ValueError) as e:
            print(f"serve: control socket {path}: {e}", file=sys.stderr)
            return 2
    for function, spec in functions:
        server.add_function(function, spec.socket_path(args.socket_dir))
        print(f"{spec.kind}@{spec.addr}: {spec.socket_path(args.socket_dir)}", flush=True)
    if control is not None:
        # Last, after every function's line: whoever waits for those finds all listening.
        print(f"control: {control.path}", flush=True)
    try:
        with _measured(args.profile, args.stats):
            server.serve_forever()
    finally:
        if control is not None:
            control.close()
        if trace is not None:
            trace.close()
        if iommu_function is not None:
            _checker_summary(iommu_function.iommu)
    return 0


def _checker_summary(iommu) -> None:
    """The invalidation checker's summary, at stop (a warning if it found stale uses)."""
    checker = iommu.checker
    if checker is None:
        return
    level = logging.WARNING if checker.stale else logging.INFO
    logging.getLogger("vfiouser_iommu.iommu.checker").log(level, "%s", checker.summary())


@contextlib.contextmanager
def _measured(profile: Path | None, stats: Path | None):
    """Profile and/or time what runs inside (docs/performance.md uses both)."""
    profiler = cProfile.Profile() if profile else None
    started, times = time.monotonic(), os.times()
    if profiler:
        profiler.enable()
    try:
        yield
    finally:
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        if stats:
            end, usage = os.times(), resource.getrusage(resource.RUSAGE_SELF)
            stats.write_text(json.dumps({
                "wall_seconds": time.monotonic() - started,
                "user_seconds": end.user - times.user,
                "system_seconds": end.system - times.system,
                "minor_faults": usage.ru_minflt,
                "voluntary_switches": usage.ru_nvcsw,
                "involuntary_switches": usage.ru_nivcsw,
            }))
