"""The initramfs builder and the console verdict parser."""

import gzip
import stat

from vfiouser_iommu.lab.initramfs import (
    CpioEntry,
    Initramfs,
    cpio_newc,
    parse_console,
    read_cpio_newc,
)


def test_cpio_round_trip_keeps_paths_modes_data_and_alignment():
    entries = [CpioEntry("bin", mode=0o040755), CpioEntry("bin/x", b"abc", 0o100755),
               CpioEntry("bin/sh", mode=0o120777, target="x"), CpioEntry("odd-name", b"12345")]
    blob = cpio_newc(entries)
    assert len(blob) % 4 == 0
    files = read_cpio_newc(blob)
    assert files["bin/x"] == (0o100755, b"abc")
    assert files["bin/sh"] == (0o120777, b"x")
    assert files["odd-name"][1] == b"12345"
    assert stat.S_ISDIR(files["bin"][0])


def test_image_has_init_busybox_script_and_modules_in_load_order(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake busybox")
    mods = []
    for name in ("a_dep", "b_user"):
        (tmp_path / f"{name}.ko").write_bytes(name.encode())
        mods.append((name, tmp_path / f"{name}.ko"))
    image = Initramfs(busybox=busybox, script="pass x y\n", modules=mods,
                      files={"/etc/extra": b"1"})
    files = read_cpio_newc(gzip.decompress(image.build()))
    assert files["bin/busybox"] == (0o100755, busybox.read_bytes())
    assert files["init"][0] == 0o100755 and files["init"][1].startswith(b"#!/bin/busybox sh")
    assert files["script.sh"][1] == b"pass x y\n"
    assert files["etc/modules-load"][1] == b"a_dep\nb_user\n"
    assert files["lib/modules/b_user.ko"][1] == b"b_user"
    assert files["etc/extra"][1] == b"1"
    init = files["init"][1].decode()
    for needed in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "mount -t tmpfs",
                   "insmod", "@@DONE", "poweroff -f"):
        assert needed in init


def test_verdict_needs_done_zero_and_all_results_passing():
    ok = parse_console(["noise", "@@RESULT a pass fine", "[ 1.0] @@RESULT b pass", "@@DONE 0"])
    assert ok.passed and [r.name for r in ok.results] == ["a", "b"]
    assert ok.results[0].detail == "fine"
    assert not parse_console(["@@RESULT a pass", "@@RESULT b fail why", "@@DONE 0"]).passed
    assert not parse_console(["@@RESULT a pass"]).passed          # never finished
    assert not parse_console(["@@RESULT a pass", "@@DONE 1"]).passed
    assert not parse_console(["@@DONE 0"]).passed                 # reported nothing
    assert "b" in parse_console(["@@RESULT b fail x", "@@DONE 0"]).summary()


def test_files_get_their_parent_folders_and_extra_modules_a_load_list(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    ko = tmp_path / "test_mod.ko"
    ko.write_bytes(b"module")
    image = Initramfs(busybox=busybox, script="", files={"/opt/a/b/c.sh": b"x",
                                                         "/opt/a/d": b"y"},
                      extra_modules=[("test_mod", ko, "checks=all s=1")])
    files = read_cpio_newc(gzip.decompress(image.build()))
    names = list(files)
    for folder in ("opt", "opt/a", "opt/a/b"):
        assert stat.S_ISDIR(files[folder][0])
    assert names.index("opt") < names.index("opt/a") < names.index("opt/a/b") \
        < names.index("opt/a/b/c.sh")
    assert names.count("opt/a") == 1
    assert files["lib/modules/extra/test_mod.ko"][1] == b"module"
    assert files["etc/modules-extra"][1] == b"test_mod checks=all s=1\n"
    assert b"@@RESULT insmod-$m pass" in files["init"][1]
