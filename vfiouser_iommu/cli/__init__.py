"""The `vfiouser-iommu` command.

Each subcommand lives in its own module of this package and registers itself through
`add_parser(subparsers)`; the handler it sets as `func` gets the parsed arguments and
returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order here is the order in --help.
SUBCOMMANDS = ("serve", "inspect", "lab", "smoke")

DESCRIPTION = """\
An emulated RISC-V IOMMU (spec v1.0.1) that runs outside QEMU as a vfio-user server.
QEMU's vfio-user-pci attaches it to a riscv64 guest, whose Linux riscv-iommu driver
programs it; the devices behind it do their DMA through its translation.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfiouser-iommu", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vfiouser_iommu.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"vfiouser_iommu.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
