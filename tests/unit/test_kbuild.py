"""The lab's kbuild tree adjustments and module-build plumbing (lab/kbuild.py), and the
known-bug hints (lab/known_bugs.py). The real build runs in tests/guest."""

import json
import os

from vfiouser_iommu.lab import kbuild
from vfiouser_iommu.lab.known_bugs import SVPBMT, advertises_svpbmt, hints_for_guest


def test_needed_glibc_is_the_newest_version_named():
    elf = b"\x7fELF....GLIBC_2.2.5\0GLIBC_2.38\0GLIBC_2.34\0"
    assert kbuild.needed_glibc(elf) == (2, 38)
    assert kbuild.needed_glibc(b"\x7fELF static") == (0, 0)


def test_host_tools_newer_than_this_glibc_get_a_loader_wrapper(tmp_path, monkeypatch):
    monkeypatch.setattr(kbuild, "glibc_version", lambda: (2, 36))
    (tmp_path / "mod").mkdir()
    new = tmp_path / "mod" / "modpost"
    old = tmp_path / "fixdep"
    script = tmp_path / "script.sh"
    new.write_bytes(b"\x7fELF GLIBC_2.38\0")
    old.write_bytes(b"\x7fELF GLIBC_2.34\0")
    script.write_text("#!/bin/sh\n")
    assert kbuild.wrap_host_tools(tmp_path, tmp_path / "lib") == ["modpost"]
    assert (tmp_path / "mod" / "modpost.elf").read_bytes().startswith(b"\x7fELF")
    wrapper = new.read_text()
    assert "ld-linux-x86-64.so.2" in wrapper and str(new) + ".elf" in wrapper
    assert os.access(new, os.X_OK)
    assert old.read_bytes().startswith(b"\x7fELF")


def test_adapt_config_turns_symbols_off_in_all_three_places(tmp_path):
    (tmp_path / "include" / "config").mkdir(parents=True)
    (tmp_path / "include" / "generated").mkdir(parents=True)
    (tmp_path / ".config").write_text("CONFIG_CC_HAS_ASSUME=y\nCONFIG_KEEP=y\n")
    (tmp_path / "include/config/auto.conf").write_text("CONFIG_CC_HAS_ASSUME=y\n")
    (tmp_path / "include/generated/autoconf.h").write_text(
        "#define CONFIG_CC_HAS_ASSUME 1\n#define CONFIG_CC_HAS_ASSUME_X 1\n")
    kbuild.adapt_config(tmp_path, ("CC_HAS_ASSUME",), make_only=())
    assert (tmp_path / ".config").read_text() == \
        "# CONFIG_CC_HAS_ASSUME is not set\nCONFIG_KEEP=y\n"
    assert "=y" not in (tmp_path / "include/config/auto.conf").read_text()
    assert (tmp_path / "include/generated/autoconf.h").read_text() == \
        "#define CONFIG_CC_HAS_ASSUME_X 1\n"


def test_the_nine_gcc12_symbols_and_btf_are_turned_off():
    assert len(kbuild.GCC12_LACKS) == 9
    assert "DEBUG_INFO_BTF_MODULES" in kbuild.NO_PAHOLE


def test_module_btf_stays_in_the_c_header_because_it_sizes_struct_module(tmp_path):
    (tmp_path / "include" / "config").mkdir(parents=True)
    (tmp_path / "include" / "generated").mkdir(parents=True)
    (tmp_path / ".config").write_text("CONFIG_DEBUG_INFO_BTF_MODULES=y\n")
    (tmp_path / "include/config/auto.conf").write_text("CONFIG_DEBUG_INFO_BTF_MODULES=y\n")
    header = "#define CONFIG_DEBUG_INFO_BTF_MODULES 1\n"
    (tmp_path / "include/generated/autoconf.h").write_text(header)
    kbuild.adapt_config(tmp_path)
    assert "=y" not in (tmp_path / ".config").read_text()
    assert "=y" not in (tmp_path / "include/config/auto.conf").read_text()
    assert (tmp_path / "include/generated/autoconf.h").read_text() == header


def test_cached_module_build_is_reused_and_keyed_by_sources(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    kb = kbuild.Kbuild(tree, (), tmp_path / "cache")
    files = {"m.c": b"int x;", "Kbuild": b"obj-m += m.o\n"}
    digest = kbuild.source_digest(files, kb)
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / f"m-{digest}.ko"
    cached.write_bytes(b"ko")
    assert kbuild.build_module(kb, "m", files) == cached
    assert kbuild.source_digest({**files, "m.c": b"int y;"}, kb) != digest


def test_svpbmt_hint_only_for_affected_kernels_with_svpbmt_advertised():
    assert advertises_svpbmt("") and not advertises_svpbmt("svpbmt=off")
    assert hints_for_guest("7.2.13+deb14-riscv64", [], "") == [SVPBMT.hint]
    assert hints_for_guest("7.2.13+deb14-riscv64", [], "svpbmt=off") == []
    assert hints_for_guest("7.2.13+deb14-riscv64", [], None) == []    # QEMU's IOMMU
    assert hints_for_guest("6.18.0", [], "") == []


def test_lab_status_json_names_the_kbuild_tree_and_compiler(tmp_path, monkeypatch, capsys):
    from vfiouser_iommu.cli import main
    from vfiouser_iommu.lab.paths import Lab

    for name in ("qemu", "Image", "busybox", "tree/Makefile"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    Lab(root=str(tmp_path), qemu=str(tmp_path / "qemu"), qemu_version="11.1.3",
        qemu_source="system", kernel=str(tmp_path / "Image"), kernel_version="7.2.13",
        kernel_source="debian sid 7.2.13-1", busybox=str(tmp_path / "busybox"),
        kbuild=str(tmp_path / "tree"), cross_compile="riscv64-linux-gnu-").save()
    monkeypatch.setenv("VFIOUSER_IOMMU_LAB", str(tmp_path))
    assert main(["lab", "status", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["kbuild"] == str(tmp_path / "tree")
    assert facts["cross_compiler"].endswith("riscv64-linux-gnu-gcc")
    assert facts["make_modules"][:3] == ["make", "-C", str(tmp_path / "tree")]
