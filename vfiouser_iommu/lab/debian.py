"""Fetching packages from Debian's archive for the lab.

The lab takes QEMU, the riscv64 kernel and busybox from Debian unstable, whatever their
current versions are. The archive's address is never written in the project: it is the
mirror the machine's own apt configuration names (or `VFIOUSER_IOMMU_MIRROR`).

Only what the lab needs is here: read a suite's `Packages` index for one architecture,
resolve a package's run-time dependency closure, download `.deb` files (checked against
the index's SHA256) and unpack them with `dpkg-deb`.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
CHUNK = 1 << 20

Progress = Callable[[str], None]


class LabError(Exception):
    """A provisioning step failed for a reason the user can act on (one line)."""


# -- where the archive is -----------------------------------------------------------------

def _deb822_entries(text: str) -> Iterable[tuple[list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            yield (fields.get("uris", "").split(), fields.get("suites", "").split(),
                   fields.get("components", "").split())


def _one_line_entries(text: str) -> Iterable[tuple[list[str], list[str], list[str]]]:
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            yield [words[1]], [words[2]], words[3:]


def apt_mirror() -> str:
    """The Debian archive this machine's apt uses (not its security archive)."""
    override = os.environ.get("VFIOUSER_IOMMU_MIRROR")
    if override:
        return override.rstrip("/")
    entries: list[tuple[list[str], list[str], list[str]]] = []
    if APT_SOURCES.exists():
        entries += _one_line_entries(APT_SOURCES.read_text())
    if APT_SOURCES_DIR.is_dir():
        for f in sorted(APT_SOURCES_DIR.iterdir()):
            if f.suffix == ".sources":
                entries += _deb822_entries(f.read_text())
            elif f.suffix == ".list":
                entries += _one_line_entries(f.read_text())
    for uris, suites, components in entries:
        if "main" in components and any("-" not in s for s in suites):
            for uri in uris:
                if uri.startswith(("http://", "https://", "file:/")):
                    return uri.rstrip("/")
    raise LabError("no Debian archive found in the apt configuration "
                   "(set VFIOUSER_IOMMU_MIRROR to one)")


# -- the index ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: tuple[tuple[str, ...], ...]  # an AND of ORs of package names
    provides: tuple[str, ...]


def _relation(value: str) -> tuple[tuple[str, ...], ...]:
    groups = []
    for group in value.split(","):
        names = tuple(alt.split()[0].split(":")[0] for alt in group.split("|") if alt.strip())
        if names:
            groups.append(names)
    return tuple(groups)


def parse_packages(text: str) -> dict[str, Package]:
    """Parse a Packages index; where a name appears twice the later stanza wins."""
    packages: dict[str, Package] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1].isspace() and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or "Filename" not in fields:
            continue
        depends = _relation(", ".join(filter(None, (fields.get("Pre-Depends"),
                                                    fields.get("Depends")))))
        packages[fields["Package"]] = Package(
            name=fields["Package"], version=fields.get("Version", ""),
            architecture=fields.get("Architecture", ""), filename=fields["Filename"],
            size=int(fields.get("Size", "0")), sha256=fields.get("SHA256", ""),
            depends=depends,
            provides=tuple(n[0] for n in _relation(fields.get("Provides", ""))))
    return packages


class Index:
    """One suite/architecture's packages, with virtual-package lookup."""

    def __init__(self, packages: dict[str, Package]):
        self.packages = packages
        self.providers: dict[str, list[str]] = {}
        for p in packages.values():
            for v in p.provides:
                self.providers.setdefault(v, []).append(p.name)

    def find(self, name: str) -> Package | None:
        if name in self.packages:
            return self.packages[name]
        for real in self.providers.get(name, ()):
            return self.packages[real]
        return None

    def get(self, name: str) -> Package:
        pkg = self.find(name)
        if pkg is None:
            raise LabError(f"package {name} is not in the archive's index")
        return pkg

    def newest_matching(self, pattern: str) -> Package:
        """The highest version among packages whose names match the regex `pattern`."""
        found = [p for n, p in self.packages.items() if re.fullmatch(pattern, n)]
        if not found:
            raise LabError(f"no package matching {pattern} in the archive's index")
        return max(found, key=lambda p: version_key(p.version))

    def closure(self, roots: Iterable[str], skip: Iterable[str] = ()) -> list[Package]:
        """Every package the roots need at run time (first satisfiable alternative)."""
        skipped = set(skip)
        seen: dict[str, Package] = {}
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name in skipped:
                continue
            pkg = self.get(name)
            if pkg.name in seen or pkg.name in skipped:
                continue
            seen[pkg.name] = pkg
            for group in pkg.depends:
                if any(alt in skipped for alt in group):
                    continue
                choice = next((alt for alt in group if self.find(alt)), None)
                if choice is None:
                    raise LabError(f"{pkg.name} needs one of {' | '.join(group)}, "
                                   "none is in the archive's index")
                todo.append(choice)
        return sorted(seen.values(), key=lambda p: p.name)


def _order(c: str) -> int:
    """dpkg's character order: '~' before everything (even the end), letters first."""
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternate non-digit runs (by _order) and digit runs (numerically)."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        ni = i
        while ni < len(a) and a[ni].isdigit():
            ni += 1
        nj = j
        while nj < len(b) and b[nj].isdigit():
            nj += 1
        diff = int(a[i:ni] or 0) - int(b[j:nj] or 0)
        if diff:
            return diff
        i, j = ni, nj
    return 0


def _split_version(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.partition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Negative, zero or positive as Debian version `a` sorts before, with or after `b`."""
    (ea, ua, ra), (eb, ub, rb) = _split_version(a), _split_version(b)
    return (ea - eb) or _compare_part(ua, ub) or _compare_part(ra, rb)


version_key = functools.cmp_to_key(compare_versions)


# -- the network ------------------------------------------------------------------------------

class Archive:
    """A Debian archive (a mirror URL) and a download cache folder."""

    def __init__(self, mirror: str, cache: Path, progress: Progress = print):
        self.mirror = mirror
        self.cache = cache
        self.progress = progress
        self._indexes: dict[tuple[str, str], Index] = {}

    def index(self, suite: str, arch: str) -> Index:
        key = (suite, arch)
        if key not in self._indexes:
            url = f"{self.mirror}/dists/{suite}/main/binary-{arch}/Packages.xz"
            self.progress(f"reading the {suite}/{arch} package index")
            data = lzma.decompress(self._fetch(url))
            self._indexes[key] = Index(parse_packages(data.decode("utf-8", "replace")))
        return self._indexes[key]

    def _fetch(self, url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise LabError(f"the Debian archive answered {e.code} for {url}") from None
        except (urllib.error.URLError, OSError) as e:
            raise LabError(f"the Debian archive is unreachable ({url}): {e}") from None

    def download(self, pkg: Package) -> Path:
        """The .deb in the cache, downloaded and checked if it is not there yet."""
        self.cache.mkdir(parents=True, exist_ok=True)
        dest = self.cache / Path(pkg.filename).name
        if dest.exists() and dest.stat().st_size == pkg.size:
            return dest
        part = dest.with_suffix(".part")
        url = f"{self.mirror}/{pkg.filename}"
        self.progress(f"downloading {pkg.name} {pkg.version} ({pkg.size / 1e6:.1f} MB)")
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as out:
                while chunk := r.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as e:
            part.unlink(missing_ok=True)
            raise LabError(f"the Debian archive answered {e.code} for {pkg.filename}") from None
        except OSError as e:
            part.unlink(missing_ok=True)
            if getattr(e, "errno", None) == 28:
                raise LabError(f"disk full while downloading {pkg.name} to {self.cache}") from None
            raise LabError(f"download of {pkg.name} failed: {e}") from None
        if pkg.sha256 and digest.hexdigest() != pkg.sha256:
            part.unlink(missing_ok=True)
            raise LabError(f"{pkg.name}: checksum mismatch (archive changed mid-way? retry)")
        part.rename(dest)
        return dest


def extract(deb: Path, dest: Path, members: Iterable[str] = ()) -> None:
    """Unpack a .deb's files into `dest` (only `members`, tar wildcards, if given)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb") is None:
        raise LabError("dpkg-deb is missing (apt-get install dpkg)")
    wanted = list(members)
    with tempfile.TemporaryFile() as err:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                               stderr=err)
        cmd = ["tar", "-x", "-C", str(dest), "--no-same-owner"]
        if wanted:
            cmd += ["--wildcards", *wanted]
        untar = subprocess.run(cmd, stdin=tar.stdout, stderr=subprocess.PIPE)
        tar.stdout.close()
        tar.wait()
        if tar.returncode != 0 or untar.returncode != 0:
            err.seek(0)
            why = (err.read() + untar.stderr).decode(errors="replace").strip().splitlines()
            raise LabError(f"unpacking {deb.name} failed: {why[-1] if why else 'unknown'}")


def relink_absolute_symlinks(root: Path) -> None:
    """Make absolute symlinks inside an unpacked tree point inside the tree."""
    for path in root.rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            if target.startswith("/"):
                inside = root / target.lstrip("/")
                path.unlink()
                path.symlink_to(os.path.relpath(inside, path.parent))
