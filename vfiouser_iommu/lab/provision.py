"""`lab provision`: QEMU, a riscv64 kernel with its modules, and busybox, in the lab folder.

Each part is built in a scratch folder and renamed into place when complete; the
manifest (`lab.json`) is written last. A second run finds the manifest, checks that
what it names still works, and returns in seconds.

- QEMU: the system's own `qemu-system-riscv64` if it is new enough and has the three
  devices the project needs; otherwise a private sysroot unpacked from Debian unstable's
  packages, run through that sysroot's own dynamic loader (no root, no chroot).
- Kernel: Debian unstable's newest `linux-binary-*-riscv64` (or `--kernel PATH`), and the
  modules the guest tests load, decompressed, from its `linux-modules-*` package.
- busybox: Debian unstable's `busybox-static` for riscv64.
- kbuild: a tree that builds kernel modules for that kernel with Debian 12's
  `gcc-riscv64-linux-gnu` (lab/kbuild.py), checked by building a module; for your own
  kernel, the build tree you name with `--kbuild`.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from vfiouser_iommu.lab.debian import (
    Archive,
    LabError,
    Progress,
    apt_mirror,
    extract,
    relink_absolute_symlinks,
)
from vfiouser_iommu.lab.kbuild import CROSS_COMPILE, Kbuild, check_kbuild, debian_kbuild
from vfiouser_iommu.lab.paths import MANIFEST, Lab, NoLab, lab_dir, load_lab

SUITE = "sid"
HOST_ARCH = "amd64"
QEMU_DEVICES = ("vfio-user-pci", "riscv-iommu-pci", "iommu-testdev")
QEMU_MIN = (10, 1)
# Guest modules the tests load; their dependencies come along from modules.dep.
GUEST_MODULES = ("virtio_blk", "virtio_rng", "vfio_pci", "virtio_net")
# Run-time dependencies of qemu-system-riscv that QEMU does not need to run a
# riscv64 guest headless (maintainer-script tools, x86 firmware, the base system).
QEMU_SKIP = ("ipxe-qemu", "debconf", "perl-base", "dpkg", "adduser", "init-system-helpers",
             "libc-bin", "qemu-system-data", "seabios", "systemd", "udev", "passwd",
             "sensible-utils", "base-files", "base-passwd", "debianutils", "coreutils",
             "bash", "tar", "gzip", "login", "util-linux")


def _say(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


# -- QEMU ---------------------------------------------------------------------------------------

def qemu_version(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([binary, "-version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]


def qemu_missing_devices(binary: str) -> list[str]:
    try:
        out = subprocess.run([binary, "-M", "virt", "-device", "help"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return list(QEMU_DEVICES)
    return [d for d in QEMU_DEVICES if f'name "{d}"' not in out]


def qemu_qualifies(binary: str) -> bool:
    version = qemu_version(binary)
    return bool(version and version[:2] >= QEMU_MIN and not qemu_missing_devices(binary))


WRAPPER_SYSTEM = """#!/bin/sh
# The lab's QEMU: the system's own, which has everything the project needs.
exec {binary} "$@"
"""

WRAPPER_SYSROOT = """#!/bin/sh
# The lab's QEMU: Debian unstable's build, run from a private sysroot through that
# sysroot's own dynamic loader, so it needs nothing newer from this machine.
S={sysroot}
L=$S/usr/lib/x86_64-linux-gnu
QEMU_MODULE_DIR=$L/qemu exec "$L/ld-linux-x86-64.so.2" \\
    --library-path "$L:$S/lib/x86_64-linux-gnu" \\
    "$S/usr/bin/qemu-system-riscv64" -L "$S/usr/share/qemu" "$@"
"""


def _write_wrapper(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)


def provision_qemu(root: Path, archive: Archive | None, say: Progress) -> tuple[str, str]:
    """Make <lab>/bin/qemu-system-riscv64; return (version, source)."""
    wrapper = root / "bin" / "qemu-system-riscv64"
    system = shutil.which("qemu-system-riscv64")
    if system and qemu_qualifies(system):
        say(f"using the system's QEMU ({system})")
        _write_wrapper(wrapper, WRAPPER_SYSTEM.format(binary=system))
        return ".".join(map(str, qemu_version(system) or ())), "system"
    if system:
        say(f"the system's QEMU ({system}) is too old or lacks {', '.join(QEMU_DEVICES)}; "
            "using Debian unstable's")
    assert archive is not None
    index = archive.index(SUITE, HOST_ARCH)
    qemu = index.get("qemu-system-riscv")
    packages = index.closure(["qemu-system-riscv", "opensbi"], QEMU_SKIP)
    say(f"QEMU {qemu.version}: {len(packages)} packages, "
        f"{sum(p.size for p in packages) / 1e6:.0f} MB")
    debs = [archive.download(p) for p in packages]
    sysroot = root / "sysroot"
    scratch = root / "sysroot.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    say("unpacking the QEMU sysroot")
    for deb in debs:
        extract(deb, scratch)
    relink_absolute_symlinks(scratch)
    shutil.rmtree(sysroot, ignore_errors=True)
    scratch.rename(sysroot)
    _write_wrapper(wrapper, WRAPPER_SYSROOT.format(sysroot=sysroot))
    missing = qemu_missing_devices(str(wrapper))
    if missing:
        raise LabError(f"Debian unstable's QEMU {qemu.version} lacks {', '.join(missing)}")
    return ".".join(map(str, qemu_version(str(wrapper)) or ())), f"debian {SUITE} {qemu.version}"


# -- kernel and modules -------------------------------------------------------------------------

def module_name(path: str | Path) -> str:
    base = Path(path).name
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def _decompress(src: Path) -> bytes:
    if src.suffix == ".xz":
        return lzma.decompress(src.read_bytes())
    if src.suffix == ".zst":
        return subprocess.run(["zstd", "-q", "-d", "-c", str(src)], check=True,
                              capture_output=True).stdout
    return src.read_bytes()


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` list of a module's .modinfo (modules.dep is made at install time,
    so a package's tree does not have it)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def load_modules(tree: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The wanted modules and what they need, decompressed, each after its dependencies."""
    files = {module_name(p): p for p in tree.rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name not in files:
            raise LabError(f"kernel module {name} is not in {tree} (built in, or missing)")
        done.add(name)
        ko = _decompress(files[name])
        for dep in module_depends(ko):
            visit(dep)
        order.append((name, ko))

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def provision_kernel(root: Path, archive: Archive | None, kernel: Path | None,
                     modules_from: Path | None, say: Progress) -> dict:
    """Kernel image and decompressed guest modules under <lab>/kernel."""
    dest = root / "kernel"
    scratch = root / "kernel.partial"
    unpack = root / "unpack.partial"
    for d in (scratch, unpack):
        shutil.rmtree(d, ignore_errors=True)
    scratch.mkdir(parents=True)
    if kernel is not None:
        say(f"using your kernel {kernel}")
        if not kernel.is_file():
            raise LabError(f"--kernel {kernel}: no such file")
        shutil.copyfile(kernel, scratch / "Image")
        version, source, tree = _user_kernel_version(kernel), f"user {kernel}", modules_from
    else:
        assert archive is not None
        index = archive.index(SUITE, "riscv64")
        binary = index.newest_matching(r"linux-binary-[0-9.]+\+deb\d+-riscv64")
        version = binary.name.removeprefix("linux-binary-")
        say(f"kernel {version} ({binary.version})")
        extract(archive.download(binary), unpack)
        image = next(unpack.glob("usr/lib/modules/*/vmlinu*"), None) or next(
            unpack.glob("boot/vmlinu*"), None)
        if image is None:
            raise LabError(f"no kernel image in {binary.name}")
        shutil.copyfile(image, scratch / "Image")
        modules = archive.download(index.get(f"linux-modules-{version}"))
        say("unpacking the kernel modules")
        extract(modules, unpack)
        modules.unlink()  # 100+ MB, and only a few modules of it are kept
        tree = next(unpack.glob("usr/lib/modules/*"), None) or next(unpack.glob("lib/modules/*"))
        source = f"debian {SUITE} {binary.version}"
    order = load_modules(Path(tree), GUEST_MODULES) if tree is not None else []
    (scratch / "modules").mkdir()
    for name, ko in order:
        (scratch / "modules" / f"{name}.ko").write_bytes(ko)
    say(f"guest modules: {' '.join(n for n, _ in order) or '(none)'}")
    shutil.rmtree(dest, ignore_errors=True)
    scratch.rename(dest)
    shutil.rmtree(unpack, ignore_errors=True)
    return {"kernel": str(dest / "Image"), "kernel_version": version, "kernel_source": source,
            "module_order": [n for n, _ in order],
            "modules": {n: str(dest / "modules" / f"{n}.ko") for n, _ in order}}


def _user_kernel_version(kernel: Path) -> str:
    m = re.search(rb"Linux version (\S+)", kernel.read_bytes()[: 64 << 20])
    return m.group(1).decode() if m else "unknown"


def provision_busybox(root: Path, archive: Archive, say: Progress) -> tuple[str, str]:
    pkg = archive.index(SUITE, "riscv64").get("busybox-static")
    unpack = root / "busybox.partial"
    shutil.rmtree(unpack, ignore_errors=True)
    extract(archive.download(pkg), unpack)
    binary = unpack / "usr" / "bin" / "busybox"
    if not binary.exists():
        binary = unpack / "bin" / "busybox"
    dest = root / "busybox"
    dest.mkdir(exist_ok=True)
    shutil.copyfile(binary, dest / "busybox")
    shutil.rmtree(unpack)
    say(f"busybox {pkg.version}")
    return str(dest / "busybox"), pkg.version


# -- kbuild -------------------------------------------------------------------------------

def provision_kbuild(root: Path, archive: Archive | None, kernel_version: str,
                     kernel_source: str, user_kbuild: Path | None, say: Progress) -> dict:
    """The manifest's kbuild fields: Debian's headers for Debian's kernel, or the user's
    build tree; either is checked by building a module."""
    if user_kbuild is not None:
        tree = user_kbuild.expanduser().resolve()
        if not (tree / "Makefile").exists():
            raise LabError(f"--kbuild {user_kbuild}: no Makefile there (want the kernel's "
                           "build tree, the folder you ran make in)")
        make_args = ["ARCH=riscv", f"CROSS_COMPILE={CROSS_COMPILE}"]
    elif kernel_source.startswith(f"debian {SUITE} "):
        if archive is None:
            archive = Archive(apt_mirror(), root / "downloads", say)
        tree = debian_kbuild(root, archive, SUITE, kernel_version,
                             kernel_source.split()[-1], say)
        make_args = []
    else:
        say("no --kbuild for your kernel: the lab will not build kernel modules")
        return {"kbuild": "", "kbuild_make_args": [], "cross_compile": ""}
    check_kbuild(Kbuild(tree, tuple(make_args)), say)
    return {"kbuild": str(tree), "kbuild_make_args": make_args, "cross_compile": CROSS_COMPILE}


def _kbuild_wanted(lab: Lab, kbuild: Path | None) -> bool:
    """Whether a complete lab still needs (another) kbuild tree."""
    if kbuild is not None:
        return lab.kbuild != str(kbuild.expanduser().resolve())
    # Debian's tree is named after the kernel version: a refreshed kernel needs its own.
    return lab.kernel_source.startswith("debian ") and (
        not lab.kbuild or not lab.kbuild.endswith(f"linux-headers-{lab.kernel_version}"))


# -- the whole lab ---------------------------------------------------------------------------

def missing_guest_modules(lab: Lab) -> list[str]:
    """GUEST_MODULES that a lab provisioned before they were added does not have."""
    return [m for m in GUEST_MODULES if m not in lab.modules]


def _refresh_kernel(lab: Lab, missing: list[str], check_boot: bool, say: Progress) -> Lab:
    """Fetch Debian's kernel and modules again, for modules added to GUEST_MODULES since
    the lab was made; QEMU and busybox stay."""
    root = Path(lab.root)
    say(f"the lab lacks the guest modules {' '.join(missing)}: fetching the kernel again")
    (root / MANIFEST).unlink(missing_ok=True)
    archive = Archive(apt_mirror(), root / "downloads", say)
    for key, value in provision_kernel(root, archive, None, None, say).items():
        setattr(lab, key, value)
    if check_boot:
        from vfiouser_iommu.lab.boot import smoke_boot

        say(f"kernel booted to its init and powered off in {smoke_boot(lab):.1f}s")
    lab.save()
    return lab


def provision(root: Path | None = None, kernel: Path | None = None,
              modules: Path | None = None, refresh: bool = False,
              check_boot: bool = True, say: Progress = _say,
              kbuild: Path | None = None) -> Lab:
    """Build (or check) the lab; return its manifest."""
    root = root or lab_dir()
    started = time.monotonic()
    if not refresh:
        try:
            lab = load_lab(root)
        except NoLab:
            pass
        else:
            if kernel is None or lab.kernel_source == f"user {kernel}":
                if qemu_qualifies(lab.qemu):
                    missing = missing_guest_modules(lab)
                    if missing and not lab.kernel_source.startswith("user "):
                        lab = _refresh_kernel(lab, missing, check_boot, say)
                    elif missing:
                        say(f"your kernel's modules lack {' '.join(missing)}; the guest tests "
                            "that need them will fail (provision with --modules again)")
                    if _kbuild_wanted(lab, kbuild):
                        return _add_kbuild(lab, kbuild, say, started)
                    say(f"lab at {root} is complete (QEMU {lab.qemu_version}, kernel "
                        f"{lab.kernel_version}); checked in {time.monotonic() - started:.1f}s")
                    return lab
                say("the lab's QEMU no longer works; provisioning again")
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).unlink(missing_ok=True)
        archive = Archive(apt_mirror(), root / "downloads", say)
        say(f"Debian archive: {archive.mirror} ({SUITE})")
        qemu_version_s, qemu_source = provision_qemu(root, archive, say)
        kernel_info = provision_kernel(root, archive, kernel, modules, say)
        busybox, busybox_version = provision_busybox(root, archive, say)
        kbuild_info = provision_kbuild(root, archive, kernel_info["kernel_version"],
                                       kernel_info["kernel_source"], kbuild, say)
    except OSError as e:
        if e.errno == 28:
            raise LabError(f"disk full under {root}") from None
        raise
    lab = Lab(root=str(root), qemu=str(root / "bin" / "qemu-system-riscv64"),
              qemu_version=qemu_version_s, qemu_source=qemu_source,
              busybox=busybox, busybox_version=busybox_version, **kernel_info, **kbuild_info)
    if check_boot:
        from vfiouser_iommu.lab.boot import smoke_boot

        say("checking that the kernel boots")
        seconds = smoke_boot(lab)
        say(f"kernel booted to its init and powered off in {seconds:.1f}s")
    lab.save()
    say(f"lab ready at {root} in {time.monotonic() - started:.0f}s")
    return lab


def _add_kbuild(lab: Lab, kbuild: Path | None, say: Progress, started: float) -> Lab:
    """A complete lab without the kbuild tree asked for: add only that."""
    root = Path(lab.root)
    try:
        info = provision_kbuild(root, None, lab.kernel_version, lab.kernel_source, kbuild, say)
    except OSError as e:
        if e.errno == 28:
            raise LabError(f"disk full under {root}") from None
        raise
    for name, value in info.items():
        setattr(lab, name, value)
    lab.save()
    say(f"lab at {root} can build kernel modules now ({time.monotonic() - started:.0f}s)")
    return lab
