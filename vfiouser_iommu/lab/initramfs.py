"""Guest images: an initramfs with busybox, chosen kernel modules and a guest script.

The init mounts proc, sys, devtmpfs and a tmpfs on /tmp, loads the modules (in the
order given, dependencies first), runs the guest script with a few helper functions
defined, prints machine-readable lines on the console and powers off:

    @@RESULT <name> pass|fail <detail>    one per check the script makes
    @@DONE <exit status of the script>    last line before power-off

The archive is a plain "newc" cpio written here (no cpio binary needed), gzip-compressed.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

RESULT_RE = re.compile(r"@@RESULT (\S+) (pass|fail)(?: (.*))?$")
DONE_RE = re.compile(r"@@DONE (-?\d+)")

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "@@INIT $(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules-load); do
    insmod "/lib/modules/$m.ko" || echo "@@RESULT load-module-$m fail insmod exited $?"
done
# Modules given with `lab boot --module`: one line each, "NAME PARAMS...".
while read -r m params; do
    [ -n "$m" ] || continue
    if out=$(insmod "/lib/modules/extra/$m.ko" $params 2>&1); then
        echo "@@RESULT insmod-$m pass $params"
    else
        echo "@@RESULT insmod-$m fail insmod exited $?: $(echo "$out" | tail -n 1)"
    fi
done < /etc/modules-extra
sh -c '. /lib/guest-lib.sh; . /script.sh'
echo "@@DONE $?"
sync
poweroff -f
"""

# Helpers every guest script can use.
GUEST_LIB = r"""
# result NAME pass|fail DETAIL...
result() { n=$1; v=$2; shift 2; echo "@@RESULT $n $v $*"; }
pass() { n=$1; shift; result "$n" pass "$@"; }
fail() { n=$1; shift; result "$n" fail "$@"; }
# check NAME COMMAND...: pass if the command succeeds
check() {
    n=$1; shift
    if "$@" >/tmp/check.out 2>&1; then pass "$n" "$(head -c 200 /tmp/check.out | tr '\n' ' ')"
    else fail "$n" "exit $?: $(head -c 200 /tmp/check.out | tr '\n' ' ')"; fi
}
# kmod_run KO [PARAM=VALUE...]: load a test module that reports on the kernel log, print
# its @@RESULT lines and every other kernel line logged meanwhile as @@KLOG, unload it.
kmod_run() {
    ko=$1; shift
    name=$(basename "$ko" .ko)
    n=$(dmesg | wc -l)
    if ! out=$(insmod "$ko" "$@" 2>&1); then fail "insmod-$name" "$out"; fi
    sleep 0.5
    dmesg | tail -n +$((n + 1)) \
        | sed -n -e 's/^.*\(@@RESULT .*\)$/\1/p' -e '/@@RESULT/!s/^/@@KLOG /p'
    rmmod "$name" 2>/dev/null
    return 0
}
"""


@dataclass
class CpioEntry:
    path: str
    data: bytes = b""
    mode: int = 0o100644
    target: str | None = None  # for symlinks


@dataclass
class Initramfs:
    """What goes in the image; `build()` gives the compressed archive."""

    busybox: Path
    script: str
    modules: list[tuple[str, Path]] = field(default_factory=list)  # (name, .ko) load order
    files: dict[str, bytes] = field(default_factory=dict)          # extra files by path
    # Modules loaded after the lab's, before the script, each reported as a @@RESULT
    # insmod-NAME line: (name, .ko, module parameters).
    extra_modules: list[tuple[str, Path, str]] = field(default_factory=list)

    def entries(self) -> list[CpioEntry]:
        dirs = ["bin", "sbin", "etc", "lib", "lib/modules", "proc", "sys", "dev", "tmp", "mnt"]
        out = [CpioEntry(d, mode=0o040755) for d in dirs]
        out.append(CpioEntry("bin/busybox", self.busybox.read_bytes(), 0o100755))
        out.append(CpioEntry("bin/sh", mode=0o120777, target="busybox"))
        out.append(CpioEntry("init", INIT.encode(), 0o100755))
        out.append(CpioEntry("lib/guest-lib.sh", GUEST_LIB.encode()))
        out.append(CpioEntry("script.sh", self.script.encode(), 0o100755))
        load = "".join(f"{name}\n" for name, _ in self.modules)
        out.append(CpioEntry("etc/modules-load", load.encode()))
        for name, ko in self.modules:
            out.append(CpioEntry(f"lib/modules/{name}.ko", ko.read_bytes()))
        extra = "".join(f"{name} {params}".rstrip() + "\n"
                        for name, _, params in self.extra_modules)
        out.append(CpioEntry("etc/modules-extra", extra.encode()))
        if self.extra_modules:
            out.append(CpioEntry("lib/modules/extra", mode=0o040755))
        for name, ko, _ in self.extra_modules:
            out.append(CpioEntry(f"lib/modules/extra/{name}.ko", ko.read_bytes()))
        made = set(dirs) | ({"lib/modules/extra"} if self.extra_modules else set())
        for path, data in sorted(self.files.items()):
            # The archive must name every folder a file sits in, parents first.
            parts = path.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folder = "/".join(parts[:i])
                if folder not in made:
                    made.add(folder)
                    out.append(CpioEntry(folder, mode=0o040755))
            # ELF files are programs the script runs: make them executable.
            mode = 0o100755 if data[:4] == b"\x7fELF" else 0o100644
            out.append(CpioEntry(path.lstrip("/"), data, mode))
        return out

    def build(self) -> bytes:
        return gzip.compress(cpio_newc(self.entries()), compresslevel=1)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.build())
        return path


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def cpio_newc(entries: list[CpioEntry]) -> bytes:
    """An SVR4 "newc" cpio archive of `entries`, ending with the TRAILER!!! record."""
    buf = io.BytesIO()
    for ino, e in enumerate([*entries, CpioEntry("TRAILER!!!", mode=0)], start=1):
        data = e.target.encode() if e.target is not None else e.data
        name = e.path.encode() + b"\0"
        fields = [ino, e.mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        buf.write(header + name + b"\0" * _pad4(len(header) + len(name)))
        buf.write(data + b"\0" * _pad4(len(data)))
    return buf.getvalue()


def read_cpio_newc(blob: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into {path: (mode, data)} (for tests and `lab inspect`)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        if blob[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        fields = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = blob[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4(110 + namesize)
        data = blob[data_start:data_start + size]
        pos = data_start + size + _pad4(size)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data)


@dataclass
class GuestResult:
    name: str
    passed: bool
    detail: str


@dataclass
class Verdict:
    results: list[GuestResult]
    exit_status: int | None   # the script's, from @@DONE; None if the guest never finished

    @property
    def passed(self) -> bool:
        return (self.exit_status == 0 and bool(self.results)
                and all(r.passed for r in self.results))

    def summary(self) -> str:
        failed = [r.name for r in self.results if not r.passed]
        if self.exit_status is None:
            return "guest did not finish"
        if failed:
            return f"{len(failed)} of {len(self.results)} checks failed: {' '.join(failed)}"
        if not self.results:
            return "the guest script reported no results"
        if self.exit_status != 0:
            return f"guest script exited {self.exit_status}"
        return f"all {len(self.results)} checks passed"


def parse_console(lines: list[str]) -> Verdict:
    results, status = [], None
    for line in lines:
        line = line.rstrip("\r\n")
        m = RESULT_RE.search(line)
        if m:
            results.append(GuestResult(m.group(1), m.group(2) == "pass", m.group(3) or ""))
            continue
        m = DONE_RE.search(line)
        if m:
            status = int(m.group(1))
    return Verdict(results, status)
