"""Kernel-module builds for the lab's kernel: a kbuild tree, and building modules with it.

Debian ships what an out-of-tree module build needs as three packages pinned to the
kernel's exact version: `linux-headers-<V>-riscv64` (the configured tree: `.config`,
generated headers, `Module.symvers`), `linux-headers-<V>-common` (the source headers
and the top `Makefile`) and `linux-kbuild-<V>` (the host tools, for the build
machine's architecture). They come from Debian unstable and were built with gcc-16
against a newer glibc, so three adjustments make them work with Debian 12's
`gcc-riscv64-linux-gnu` (gcc 12), verified on the lab's 7.2 kernel
(docs/kernel-modules.md):

- the riscv64 tree's `Makefile` includes the common tree by absolute path, and the
  compiler named in `.kernelvariables` is gcc-16: both are rewritten;
- toolchain capabilities gcc 12 lacks are turned off, consistently, in `.config`,
  `include/config/auto.conf` and `include/generated/autoconf.h` (and BTF for modules:
  there is no pahole);
- host tools that need a newer glibc than this machine's run through the dynamic
  loader of a private sysroot unpacked from unstable's libc (as the lab runs QEMU).

`build_module` builds a module from a source folder for a kbuild tree and returns the
`.ko`; builds are cached by a hash of the sources and the tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vfiouser_iommu.lab.debian import Archive, LabError, Progress, extract

CROSS_COMPILE = "riscv64-linux-gnu-"
# Kconfig symbols the kernel's gcc-16 has and Debian 12's gcc 12 does not (checked with
# the lab's 7.2.13 headers); left on, gcc 12 fails on flags or attributes it lacks.
GCC12_LACKS = ("TOOLCHAIN_HAS_ZACAS", "TOOLCHAIN_HAS_ZABHA", "RISCV_ISA_ZACAS",
               "RISCV_ISA_ZABHA", "CC_HAS_MIN_FUNCTION_ALIGNMENT", "CC_HAS_COUNTED_BY",
               "CC_HAS_COUNTED_BY_PTR", "CC_HAS_MULTIDIMENSIONAL_NONSTRING", "CC_HAS_ASSUME")
# Module BTF needs pahole, which the lab does not have. Only the build's makefiles may
# forget it: in autoconf.h it also sizes `struct module` (btf_data fields), and a module
# compiled without them has its exit pointer in the wrong field ([permanent], no rmmod).
NO_PAHOLE = ("DEBUG_INFO_BTF_MODULES",)
# Libraries the kbuild host tools load (modpost, genksyms, objtool: libelf, zlib, ssl).
HOST_LIBS = ("libc6", "libelf1t64", "zlib1g", "libzstd1", "libssl3t64")
HOST_LIBS_SKIP = ("libc-gconv-modules-extra", "debconf", "perl-base")
HOST_ARCH = "amd64"

PROBE_SOURCE = """\
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
static int __init probe_init(void) { return 0; }
module_init(probe_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vfiouser-iommu lab: kbuild check");
"""
PROBE_KBUILD = "obj-m += kbuild_probe.o\nccflags-remove-y += $(CC_FLAGS_FTRACE)\n"


# -- the tree ------------------------------------------------------------------------------

def glibc_version() -> tuple[int, int]:
    """This machine's glibc (major, minor)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        text = ""
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def needed_glibc(elf: bytes) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version an ELF file names."""
    found = [(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", elf)]
    return max(found, default=(0, 0))


WRAPPER = """#!/bin/sh
# A kbuild host tool built for a newer glibc than this machine's: run through the
# loader of the lab's private sysroot (see vfiouser_iommu/lab/kbuild.py).
L={libdir}
exec "$L/ld-linux-x86-64.so.2" --library-path "$L" "{real}" "$@"
"""


def wrap_host_tools(tools: Path, libdir: Path) -> list[str]:
    """Wrap every ELF under `tools` that this glibc cannot run; return their names."""
    host = glibc_version()
    wrapped = []
    for path in sorted(p for p in tools.rglob("*") if p.is_file() and not p.is_symlink()):
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        if needed_glibc(path.read_bytes()) <= host:
            continue
        real = path.with_name(path.name + ".elf")
        path.rename(real)
        path.write_text(WRAPPER.format(libdir=libdir, real=real))
        path.chmod(0o755)
        wrapped.append(path.name)
    return wrapped


def _config_off(text: str, symbols: tuple[str, ...], style: str) -> str:
    for sym in symbols:
        if style == "header":
            text = re.sub(rf"^#define CONFIG_{sym} 1\n", "", text, flags=re.M)
        else:
            text = re.sub(rf"^CONFIG_{sym}=y$", f"# CONFIG_{sym} is not set", text, flags=re.M)
    return text


def adapt_config(tree: Path, symbols: tuple[str, ...] = GCC12_LACKS,
                 make_only: tuple[str, ...] = NO_PAHOLE) -> None:
    """Turn `symbols` off in the three places kbuild reads configuration from, and
    `make_only` in the two the makefiles read (not in the C header)."""
    for rel, style in ((".config", "config"), ("include/config/auto.conf", "config"),
                       ("include/generated/autoconf.h", "header")):
        path = tree / rel
        off = symbols + (make_only if style == "config" else ())
        path.write_text(_config_off(path.read_text(), off, style))


def _kernelvariables(tree: Path) -> None:
    """Name Debian 12's cross compiler (the file names gcc-16, which it does not have)."""
    path = tree / ".kernelvariables"
    if path.exists():
        text = re.sub(r"^CC = .*$", "CC = $(CROSS_COMPILE)gcc", path.read_text(), flags=re.M)
        path.write_text(text)


def debian_kbuild(root: Path, archive: Archive, suite: str, kernel_version: str,
                  package_version: str, say: Progress) -> Path:
    """Make `<root>/kbuild` from Debian's packages for `kernel_version`; return the tree
    to pass as `make -C` (and check it builds a module)."""
    riscv = archive.index(suite, "riscv64")
    host = archive.index(suite, HOST_ARCH)
    wanted = [(riscv, f"linux-headers-{kernel_version}"),
              (riscv, f"linux-headers-{kernel_version.removesuffix('-riscv64')}-common"),
              (host, f"linux-kbuild-{kernel_version.removesuffix('-riscv64')}")]
    packages = []
    for index, name in wanted:
        pkg = index.get(name)
        if pkg.version != package_version:
            raise LabError(f"{name} is at {pkg.version} in the archive but the lab's kernel "
                           f"is {package_version}: run `lab provision --refresh`")
        packages.append(pkg)
    libs = host.closure(HOST_LIBS, HOST_LIBS_SKIP)
    total = sum(p.size for p in packages + libs) / 1e6
    say(f"kbuild for {kernel_version}: {len(packages)} packages + {len(libs)} host "
        f"libraries, {total:.0f} MB")
    debs = [archive.download(p) for p in packages + libs]
    dest, scratch = root / "kbuild", root / "kbuild.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    say("unpacking the kbuild tree")
    started = time.monotonic()
    for deb in debs:
        extract(deb, scratch)
    version = kernel_version.removesuffix("-riscv64")
    shutil.rmtree(dest, ignore_errors=True)
    scratch.rename(dest)
    tree = dest / "usr" / "src" / f"linux-headers-{kernel_version}"
    common = dest / "usr" / "src" / f"linux-headers-{version}-common"
    (tree / "Makefile").write_text(f"KBUILD_OUTPUT={tree}\ninclude {common}/Makefile\n")
    _kernelvariables(tree)
    adapt_config(tree)
    libdir = dest / "usr" / "lib" / "x86_64-linux-gnu"
    wrapped = wrap_host_tools(dest / "usr" / "lib" / f"linux-kbuild-{version}", libdir)
    say(f"kbuild tree unpacked in {time.monotonic() - started:.1f}s; host tools run through "
        f"the sysroot's loader: {' '.join(wrapped) or '(none)'}")
    return tree


# -- building ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kbuild:
    """How to build modules for one kernel: the tree and the make arguments."""

    tree: Path
    make_args: tuple[str, ...] = ()
    cache: Path | None = None        # where built modules are kept

    def identity(self) -> bytes:
        """What a cached build depends on besides its sources."""
        parts = [str(self.tree), " ".join(self.make_args)]
        for rel in ("Module.symvers", ".config", "include/config/kernel.release"):
            path = self.tree / rel
            if path.exists():
                st = path.stat()
                parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        return "\n".join(parts).encode()


def check_cross_compiler(prefix: str = CROSS_COMPILE) -> str:
    cc = shutil.which(prefix + "gcc")
    if cc is None:
        raise LabError(f"{prefix}gcc is missing (apt-get install gcc-riscv64-linux-gnu)")
    return cc


def source_digest(files: dict[str, bytes], kbuild: Kbuild) -> str:
    h = hashlib.sha256(kbuild.identity())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()[:16]


def build_module(kbuild: Kbuild, name: str, files: dict[str, bytes],
                 say: Progress | None = None, timeout: float = 600) -> Path:
    """Build module `name` (its sources and Kbuild in `files`) for `kbuild`; return the
    `.ko`. A cached build of the same sources for the same tree is returned at once."""
    if kbuild.cache is None:
        raise ValueError("build_module needs a Kbuild with a cache folder")
    digest = source_digest(files, kbuild)
    out = kbuild.cache / f"{name}-{digest}.ko"
    if out.exists():
        return out
    check_cross_compiler()
    with tempfile.TemporaryDirectory(prefix=f"kmod-{name}-") as tmp:
        work = Path(tmp)
        for rel, data in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        started = time.monotonic()
        if say:
            say(f"building {name}.ko for {kbuild.tree}")
        argv = ["make", "-C", str(kbuild.tree), f"M={work}", *kbuild.make_args,
                f"-j{os.cpu_count() or 1}", "modules"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"building {name}.ko took longer than {timeout:.0f}s") from None
        ko = work / f"{name}.ko"
        if proc.returncode != 0 or not ko.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise LabError(f"building {name}.ko failed:\n{tail}")
        if say:
            say(f"built {name}.ko in {time.monotonic() - started:.1f}s")
        kbuild.cache.mkdir(parents=True, exist_ok=True)
        keep = kbuild.cache / f"{name}-{digest}.ko"
        tmp_ko = keep.with_suffix(".tmp")
        shutil.copyfile(ko, tmp_ko)
        tmp_ko.replace(keep)
        return keep


def check_kbuild(kbuild: Kbuild, say: Progress) -> float:
    """Build a one-function module with `kbuild`; return the seconds it took."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kbuild-check-") as tmp:
        build_module(Kbuild(kbuild.tree, kbuild.make_args, Path(tmp)), "kbuild_probe",
                     {"kbuild_probe.c": PROBE_SOURCE.encode(),
                      "Kbuild": PROBE_KBUILD.encode()})
    seconds = time.monotonic() - started
    say(f"kbuild check: a module built in {seconds:.1f}s")
    return seconds


def vermagic(ko: Path) -> str:
    m = re.search(rb"vermagic=([^\0]*)\0", ko.read_bytes())
    return m.group(1).decode() if m else ""
