"""Where our PCI functions sit, and the QEMU arguments that attach them.

A function spec is `KIND@SS.F[,opt=val...]`: an endpoint kind, the slot and function
number on bus 0 (hexadecimal slot 00-1f, function 0-7, as in QEMU's `addr=SS.F`), and
options for the endpoint. Each function is served on `SOCKET_DIR/SS.F.sock`; QEMU gets
one `vfio-user-pci` device per function at that address, and guest RAM as a shared
memfd so that DMA_MAP hands the server the fds of guest memory.

Bus 0 because the server cannot see the guest's bus numbering: a function's requester
ID is fixed by this address (DESIGN.md, "Processes").
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_SPEC = re.compile(r"^(?P<kind>[a-z0-9][a-z0-9-]*)@(?P<slot>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])"
                   r"(?:,(?P<opts>.*))?$")
_ADDR = re.compile(r"^(?P<slot>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$")

RAM_BACKEND_ID = "ram0"


@dataclass(frozen=True)
class FunctionSpec:
    kind: str
    slot: int
    function: int
    options: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def addr(self) -> str:
        """QEMU's `addr=` value: slot.function."""
        return f"{self.slot:02x}.{self.function}"

    @property
    def devfn(self) -> int:
        return self.slot << 3 | self.function

    @property
    def requester_id(self) -> int:
        """Bus 0, so the requester ID is the devfn."""
        return self.devfn

    def socket_path(self, socket_dir: str | os.PathLike) -> Path:
        return Path(socket_dir) / f"{self.addr}.sock"


def parse_address(text: str) -> tuple[int, int]:
    """`SS.F` -> (slot, function); ValueError if malformed or out of range."""
    m = _ADDR.match(text)
    if m is None:
        raise ValueError(f"bad PCI address {text!r}: want SS.F (slot 00-1f, function 0-7)")
    slot = int(m["slot"], 16)
    if slot > 0x1F:
        raise ValueError(f"bad PCI slot {m['slot']}: 00-1f")
    return slot, int(m["fn"])


def parse_function(text: str) -> FunctionSpec:
    """Parse `KIND@SS.F[,opt=val...]`."""
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(f"bad function spec {text!r}: want KIND@SS.F[,opt=val...]")
    slot, fn = parse_address(f"{m['slot']}.{m['fn']}")
    options: dict[str, str] = {}
    for item in filter(None, (m["opts"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad option {item!r} in {text!r}: want opt=val")
        if key in options:
            raise ValueError(f"option {key!r} given twice in {text!r}")
        options[key] = value
    return FunctionSpec(m["kind"], slot, fn, options)


def check_unique(functions: list[FunctionSpec]) -> None:
    """ValueError if two functions claim one address."""
    seen: dict[int, FunctionSpec] = {}
    for f in functions:
        if f.devfn in seen:
            raise ValueError(f"{f.kind} and {seen[f.devfn].kind} both at {f.addr}")
        seen[f.devfn] = f


def vfio_user_device_args(socket_dir: str | os.PathLike,
                          functions: list[FunctionSpec]) -> list[str]:
    """One JSON `-device vfio-user-pci` per function, at its address."""
    check_unique(functions)
    args: list[str] = []
    for f in functions:
        device = {
            "driver": "vfio-user-pci",
            "id": f"vfu{f.slot:02x}_{f.function}",
            "addr": f.addr,
            "socket": {"type": "unix", "path": os.fspath(f.socket_path(socket_dir))},
        }
        args += ["-device", json.dumps(device, separators=(",", ":"))]
    return args


def shared_ram_args(ram_size: str | int) -> list[str]:
    """Guest RAM as a shared memfd: `-m` and the `memory-backend` that backs it."""
    size = str(ram_size)
    return ["-object", f"memory-backend-memfd,id={RAM_BACKEND_ID},size={size},share=on",
            "-machine", f"memory-backend={RAM_BACKEND_ID}", "-m", size]


def qemu_vfio_user_args(socket_dir: str | os.PathLike, functions: list[FunctionSpec],
                        ram_size: str | int) -> list[str]:
    """QEMU arguments for `functions` served from `socket_dir`, with shared RAM."""
    return shared_ram_args(ram_size) + vfio_user_device_args(socket_dir, functions)


IOMMU_KIND = "riscv-iommu"


def parse_functions(iommu: str | None, endpoints: list[str]) -> list[FunctionSpec]:
    """The functions of a command line: the IOMMU at `iommu` (SS.F) if given, then the
    endpoint specs; ValueError if any is malformed or two share an address."""
    functions = []
    if iommu is not None:
        slot, fn = parse_address(iommu)
        functions.append(FunctionSpec(IOMMU_KIND, slot, fn))
    functions += [parse_function(text) for text in endpoints]
    check_unique(functions)
    return functions
