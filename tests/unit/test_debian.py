"""Fetching and unpacking Debian packages for the lab, against a fake archive on disk."""

import hashlib
import lzma
import os
import subprocess

import pytest

from vfiouser_iommu.lab import debian
from vfiouser_iommu.lab.debian import (
    Archive,
    Index,
    LabError,
    apt_mirror,
    compare_versions,
    extract,
    parse_packages,
    relink_absolute_symlinks,
    version_key,
)

PACKAGES = """\
Package: app
Version: 1.0-1
Architecture: amd64
Pre-Depends: libc6 (>= 2.38)
Depends: libfoo1 | libfoo-alt, virtual-thing, skipped-tool
Filename: pool/main/a/app/app_1.0-1_amd64.deb
Size: {size}
SHA256: {sha}
Description: an app
 with a continued description: line

Package: libc6
Version: 2.41-1
Architecture: amd64
Filename: pool/main/g/glibc/libc6.deb
Size: 1

Package: libfoo-alt
Version: 1
Architecture: amd64
Filename: pool/main/f/foo/libfoo-alt.deb
Size: 1

Package: provider
Version: 1
Architecture: amd64
Provides: virtual-thing (= 1)
Filename: pool/main/p/provider/provider.deb
Size: 1

Package: linux-binary-7.1.2+deb14-riscv64
Version: 7.1.2-1
Filename: x
Size: 1

Package: linux-binary-7.10.1+deb14-riscv64
Version: 7.10.1-1
Filename: y
Size: 1
"""


def make_deb(tmp_path):
    root = tmp_path / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: app\nVersion: 1.0-1\nArchitecture: amd64\nMaintainer: t <t@t>\n"
        "Description: t\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "app").write_text("#!/bin/sh\necho app\n")
    (root / "usr" / "share").mkdir(parents=True)
    os.symlink("/usr/bin/app", root / "usr" / "share" / "app-link")
    deb = tmp_path / "app.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.fixture
def mirror(tmp_path):
    """A file:// archive with dists/sid/main/binary-amd64/Packages.xz and one real .deb."""
    deb = make_deb(tmp_path)
    data = deb.read_bytes()
    pool = tmp_path / "mirror" / "pool" / "main" / "a" / "app"
    pool.mkdir(parents=True)
    (pool / "app_1.0-1_amd64.deb").write_bytes(data)
    dists = tmp_path / "mirror" / "dists" / "sid" / "main" / "binary-amd64"
    dists.mkdir(parents=True)
    text = PACKAGES.format(size=len(data), sha=hashlib.sha256(data).hexdigest())
    (dists / "Packages.xz").write_bytes(lzma.compress(text.encode()))
    return f"file://{tmp_path / 'mirror'}"


def test_packages_index_relations_and_continuations():
    pkgs = parse_packages(PACKAGES.format(size=3, sha="ab"))
    app = pkgs["app"]
    assert app.depends == (("libc6",), ("libfoo1", "libfoo-alt"), ("virtual-thing",),
                           ("skipped-tool",))
    assert app.size == 3 and app.sha256 == "ab"
    assert pkgs["provider"].provides == ("virtual-thing",)


def test_closure_takes_available_alternatives_providers_and_skips():
    index = Index(parse_packages(PACKAGES.format(size=3, sha="ab")))
    names = [p.name for p in index.closure(["app"], skip=["skipped-tool"])]
    assert names == ["app", "libc6", "libfoo-alt", "provider"]
    with pytest.raises(LabError, match="skipped-tool"):
        index.closure(["app"])


def test_newest_matching_compares_versions_not_strings():
    index = Index(parse_packages(PACKAGES.format(size=3, sha="ab")))
    assert index.newest_matching(r"linux-binary-.*").version == "7.10.1-1"
    with pytest.raises(LabError, match="no package matching"):
        index.newest_matching(r"nothing-.*")
    ordered = ["1.0~rc1", "1.0", "1.0-1", "1.0-1+b1", "1.0a", "1.0.1", "1.9", "1.10",
               "1:0.1"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert compare_versions("1:11.1.3+ds-1", "1:11.1.3+ds-1") == 0


def test_download_checks_the_hash_and_unpacks(mirror, tmp_path):
    archive = Archive(mirror, tmp_path / "cache", progress=lambda m: None)
    pkg = archive.index("sid", "amd64").get("app")
    deb = archive.download(pkg)
    assert deb.read_bytes()[:8] == b"!<arch>\n"
    out = tmp_path / "out"
    extract(deb, out)
    assert (out / "usr" / "bin" / "app").read_text().startswith("#!/bin/sh")
    relink_absolute_symlinks(out)
    link = out / "usr" / "share" / "app-link"
    assert not os.readlink(link).startswith("/") and link.resolve() == (out / "usr/bin/app")


def test_checksum_mismatch_leaves_nothing(mirror, tmp_path):
    archive = Archive(mirror, tmp_path / "cache", progress=lambda m: None)
    pkg = archive.index("sid", "amd64").get("app")
    bad = debian.Package(**{**pkg.__dict__, "sha256": "0" * 64})
    with pytest.raises(LabError, match="checksum mismatch"):
        archive.download(bad)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_archive_and_missing_package_are_one_line_errors(mirror, tmp_path):
    with pytest.raises(LabError, match="unreachable") as e:
        Archive("http://127.0.0.1:9", tmp_path, progress=lambda m: None).index("sid", "amd64")
    assert "\n" not in str(e.value)
    archive = Archive(mirror, tmp_path / "cache", progress=lambda m: None)
    with pytest.raises(LabError, match="not in the archive"):
        archive.index("sid", "amd64").get("qemu-system-riscv")


def test_mirror_comes_from_the_apt_configuration(tmp_path, monkeypatch):
    monkeypatch.delenv("VFIOUSER_IOMMU_MIRROR", raising=False)
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    monkeypatch.setattr(debian, "APT_SOURCES", tmp_path / "none.list")
    monkeypatch.setattr(debian, "APT_SOURCES_DIR", sources)
    assert apt_mirror() == "http://mirror.example/debian"
    (tmp_path / "none.list").write_text(
        "# comment\ndeb [arch=amd64] http://one.example/d bookworm main\n")
    assert apt_mirror() == "http://one.example/d"
    monkeypatch.setenv("VFIOUSER_IOMMU_MIRROR", "http://override.example/x/")
    assert apt_mirror() == "http://override.example/x"


def test_no_archive_configured_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VFIOUSER_IOMMU_MIRROR", raising=False)
    monkeypatch.setattr(debian, "APT_SOURCES", tmp_path / "none.list")
    monkeypatch.setattr(debian, "APT_SOURCES_DIR", tmp_path / "nothing")
    with pytest.raises(LabError, match="VFIOUSER_IOMMU_MIRROR"):
        apt_mirror()
