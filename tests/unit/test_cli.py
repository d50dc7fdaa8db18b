"""Argument parsing of the `vfiouser-iommu` command."""

import pytest

from vfiouser_iommu.cli import build_parser, main


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "lab" in out


@pytest.mark.parametrize("sub", ["provision", "status", "boot", "qemu-args"])
def test_lab_subcommands_explain_themselves(capsys, sub):
    with pytest.raises(SystemExit) as e:
        main(["lab", sub, "--help"])
    assert e.value.code == 0
    assert "usage: vfiouser-iommu lab " + sub in capsys.readouterr().out


def test_lab_boot_options():
    args = parse("lab", "boot", "--reference", "--script", "/x.sh", "--timeout", "42")
    assert args.reference and str(args.script) == "/x.sh" and args.timeout == 42.0
    # No --timeout: 300 s, or none at all with --keep-running (cmd_boot decides).
    assert parse("lab", "boot").timeout is None and not parse("lab", "boot").reference
    keep = parse("lab", "boot", "--keep-running", "--trace", "/t.json")
    assert keep.keep_running and str(keep.trace) == "/t.json"


def test_lab_provision_options():
    args = parse("lab", "provision", "--kernel", "/k/Image", "--modules", "/k/mods", "--refresh")
    assert str(args.kernel) == "/k/Image" and str(args.modules) == "/k/mods" and args.refresh


def test_modules_without_kernel_is_refused(capsys):
    assert main(["lab", "provision", "--modules", "/m"]) == 2
    assert "--modules goes with --kernel" in capsys.readouterr().err


def test_bad_timeout_and_missing_subcommand_are_usage_errors():
    with pytest.raises(SystemExit) as e:
        parse("lab", "boot", "--timeout", "soon")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        parse("lab")
    assert e.value.code == 2


def test_status_without_a_lab_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VFIOUSER_IOMMU_LAB", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["lab", "status"])
    assert e.value.code == 2
    assert "lab provision" in capsys.readouterr().err


def test_qemu_args_for_an_iommu_and_an_endpoint(capsys):
    assert main(["lab", "qemu-args", "--socket-dir", "/s", "--iommu", "01.0",
                 "--endpoint", "iommu-testdev@02.0"]) == 0
    out = capsys.readouterr().out
    assert "memory-backend-memfd,id=ram0,size=1G,share=on" in out
    assert '"addr":"01.0"' in out and '"path":"/s/02.0.sock"' in out


@pytest.mark.parametrize("bad", [["--iommu", "1.9"], ["--endpoint", "testdev"],
                                 ["--iommu", "02.0", "--endpoint", "iommu-testdev@02.0"]])
def test_qemu_args_refuses_bad_specs_with_a_message(capsys, bad):
    assert main(["lab", "qemu-args", "--socket-dir", "/s", *bad]) == 2
    assert capsys.readouterr().err.startswith("vfiouser-iommu: ")


def test_serve_refuses_bad_iommu_options(capsys, tmp_path):
    assert main(["serve", "--socket-dir", str(tmp_path), "--iommu", "01.0,ats=maybe"]) == 2
    assert "want on or off" in capsys.readouterr().err


def test_lab_boot_topology_options():
    args = parse("lab", "boot", "--iommu", "05.0,ats=off", "--endpoint", "virtio-blk@02.0",
                 "--disk-size", "128")
    assert args.iommu == "05.0,ats=off" and args.endpoint == ["virtio-blk@02.0"]
    assert args.disk_size == 128


@pytest.mark.parametrize("bad", [["--endpoint", "bogus@03.0"], ["--iommu", "3"],
                                 ["--reference", "--iommu", "01.0"]])
def test_lab_boot_refuses_a_bad_topology_before_booting(capsys, bad):
    assert main(["lab", "boot", *bad]) == 2
    assert capsys.readouterr().err.startswith("vfiouser-iommu: ")


def test_topology_defaults_and_scratch_disk():
    from pathlib import Path

    from vfiouser_iommu.lab.stack import Topology

    t = Topology.parse(None, [])
    assert t.iommu == "01.0" and t.iommu_options == ""
    assert t.endpoint_specs(Path("/d.img")) == [
        "iommu-testdev@02.0", "virtio-blk@03.0,disk=/d.img", "virtio-rng@04.0"]
    t = Topology.parse("05.0,ats=off", ["virtio-blk@02.0,disk=/mine.img"])
    assert t.iommu_spec() == "05.0,ats=off"
    assert t.endpoint_specs(Path("/d.img")) == ["virtio-blk@02.0,disk=/mine.img"]


def test_lab_boot_append_file_and_module_options(tmp_path, capsys):
    args = parse("lab", "boot", "--append", "svpbmt=x", "--file", "/a=/b", "--file", "/c=/d",
                 "--module", "/m.ko s=1")
    assert args.append == "svpbmt=x" and args.file == ["/a=/b", "/c=/d"]
    assert args.module == ["/m.ko s=1"]
    assert main(["lab", "boot", "--file", "relative=/x"]) == 2
    assert "want /GUEST/PATH=HOST_PATH" in capsys.readouterr().err
    assert main(["lab", "boot", "--module", str(tmp_path / "gone.ko")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_parse_module_option(tmp_path):
    from vfiouser_iommu.lab.boot import parse_module_option

    ko = tmp_path / "vfiouser-iommu-test.ko"
    ko.write_bytes(b"")
    assert parse_module_option(f"{ko} checks=first s=1") == \
        ("vfiouser_iommu_test", ko, "checks=first s=1")
    with pytest.raises(ValueError):
        parse_module_option(str(tmp_path / "x.o"))


def test_lab_provision_kbuild_option():
    assert str(parse("lab", "provision", "--kbuild", "/k/build").kbuild) == "/k/build"


def test_keep_running_script_reports_then_idles(tmp_path, capsys):
    import signal

    from vfiouser_iommu.cli.lab import _keep_running
    from vfiouser_iommu.lab.boot import KEEP_RUNNING_MARK
    from vfiouser_iommu.lab.initramfs import parse_console

    previous = signal.getsignal(signal.SIGTERM)
    try:
        script, workdir, on_line = _keep_running("pass one\n", tmp_path)
        assert script.startswith("pass one\n") and script.rstrip().endswith("done")
        assert f'echo "{KEEP_RUNNING_MARK}"' in script
        # The verdict comes before the idling (the init's own @@DONE never does).
        assert parse_console(["@@RESULT one pass", "@@DONE 0"]).passed
        on_line("unrelated")
        assert capsys.readouterr().out == ""
        on_line(KEEP_RUNNING_MARK)
        assert str(tmp_path.resolve() / "sockets" / "control.sock") in capsys.readouterr().out
        assert signal.getsignal(signal.SIGTERM) is not previous   # SIGTERM stops cleanly
    finally:
        signal.signal(signal.SIGTERM, previous)
