"""Guest: the ready QEMU configurations in qemu-configs/ agree with the code and boot.

For each configuration:
- **the files and the code never disagree.** The -readconfig file (+ the .args file of
  vfio-user-pci devices, for ours) is read into a model of what QEMU is told (machine,
  memory, CPUs, objects, drives, netdevs, devices) and compared with the model of the
  arguments the code makes: `lab qemu-args` run with the options the .args header
  documents, `lab boot`'s machine, `reference_args` / `reference_net_args`. The serve
  command in the .cfg header must name the same functions as the qemu-args command.
- **it boots.** The commands in the file's header are run as documented, from a scratch
  folder (`truncate`, `vfiouser-iommu serve`, `vfiouser-iommu lab dtb`, QEMU with
  `-readconfig` and the .args lines), with the lab's QEMU, kernel and an initramfs in
  place of `qemu-system-riscv64`, `Image`, `initrd.gz`; the namespace is the test's own
  in place of `vfu0` (and `ip netns exec` becomes entering it). The guest checks that
  the IOMMU probed and its endpoints work.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfiouser_iommu.cli import main as cli_main
from vfiouser_iommu.lab.boot import (
    KERNEL_CMDLINE,
    default_script,
    guest_initramfs,
    machine_args,
    reference_args,
    reference_net_args,
    run_guest,
    stop_process,
)
from vfiouser_iommu.lab.netns import in_namespace_argv

pytestmark = pytest.mark.guest
CONFIGS = Path(__file__).resolve().parents[2] / "qemu-configs"
NAMES = ["ours-default", "ours-net", "reference", "reference-net"]
HEADER_NETNS = "vfu0"

NET_SCRIPT = r"""
eth=$(ls /sys/bus/pci/devices/0000:00:02.0/virtio*/net | head -n 1)
iommu=$(ls -d /sys/class/iommu/riscv-iommu@* 2>/dev/null | head -n 1)
if [ -n "$iommu" ]; then pass iommu-probed "$iommu"; else fail iommu-probed "none"; fi
g=/sys/bus/pci/devices/0000:00:02.0/iommu_group
if [ -e $g ]; then pass net-iommu-group "$(cat $g/type)"; else fail net-iommu-group "none"; fi
ip link set "$eth" up
ip addr add 10.0.2.15/24 dev "$eth"
out=$(ping -A -q -c 50 -s 1472 -W 5 10.0.2.2 2>&1 | grep 'packets transmitted')
case "$out" in *", 50 packets received, 0% packet loss") pass ping "$out" ;;
    *) fail ping "$out" ;; esac
"""


# -- reading what QEMU is told -------------------------------------------------------------
def parse_readconfig(text: str) -> list[tuple[str, str | None, dict[str, str]]]:
    """QEMU's -readconfig format: `[group]` or `[group "id"]`, then `key = "value"`."""
    sections: list[tuple[str, str | None, dict[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'\[(\S+)(?: "([^"]*)")?\]', line)
        if m:
            sections.append((m.group(1), m.group(2), {}))
            continue
        m = re.fullmatch(r'(\S+)\s*=\s*"([^"]*)"', line)
        assert m and sections, f"not -readconfig syntax: {line!r}"
        sections[-1][2][m.group(1)] = m.group(2)
    return sections


def _keyval(text: str, implied: str) -> dict[str, str]:
    """QEMU's `a,b=c,d=e` option syntax; a leading bare word is the `implied` key."""
    out = {}
    for i, item in enumerate(text.split(",")):
        key, sep, value = item.partition("=")
        if not sep and i == 0:
            key, value = implied, key
        out[key] = value
    return out


def model_of_argv(argv: list[str]) -> dict:
    """What a QEMU command line configures, in a comparable form."""
    model: dict = {"machine": {}, "memory": None, "smp": None, "objects": {}, "drives": {},
                   "netdevs": {}, "devices": []}
    it = iter(argv)
    for arg in it:
        if arg in ("-M", "-machine"):
            model["machine"].update(_keyval(next(it), "type"))
        elif arg == "-m":
            model["memory"] = next(it)
        elif arg == "-smp":
            model["smp"] = next(it)
        elif arg == "-object":
            props = _keyval(next(it), "qom-type")
            model["objects"][props.pop("id")] = props
        elif arg in ("-drive", "-netdev"):
            props = _keyval(next(it), "type")
            model[arg[1:] + "s"][props.pop("id")] = props
        elif arg == "-device":
            value = next(it)
            model["devices"].append(json.loads(value) if value.startswith("{")
                                    else _keyval(value, "driver"))
    return model


def model_of_files(name: str) -> dict:
    model: dict = {"machine": {}, "memory": None, "smp": None, "objects": {}, "drives": {},
                   "netdevs": {}, "devices": []}
    for group, ident, props in parse_readconfig((CONFIGS / f"{name}.cfg").read_text()):
        props = dict(props)
        if group == "machine":
            model["machine"].update(props)
        elif group == "memory":
            model["memory"] = props["size"]
        elif group == "smp-opts":
            model["smp"] = props["cpus"]
        elif group in ("object", "drive", "netdev"):
            model[group + "s"][ident] = props
        elif group == "device":
            model["devices"].append(props | ({"id": ident} if ident else {}))
        else:
            pytest.fail(f"{name}.cfg: group [{group}] not understood by this test")
    args = CONFIGS / f"{name}.args"
    if args.exists():
        extra = model_of_argv(args_lines(args))
        assert extra["devices"] and not extra["objects"], "the .args hold devices only"
        model["devices"] += extra["devices"]
    return model


def args_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def header_commands(path: Path) -> list[list[str]]:
    """The commands a file's header documents (indented comment lines; `\\` continues),
    with `$(grep -v '^#' FILE)` kept as one word `@ARGS:FILE`."""
    commands, pending = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#   "):
            if pending:
                commands.append(pending)
                pending = ""
            continue
        text = line[4:].strip()
        pending += " " + text.rstrip("\\").strip()
        if not text.endswith("\\"):
            commands.append(pending)
            pending = ""
    out = []
    for command in commands:
        command = re.sub(r"\$\(grep -v '\^#' (\S+)\)", r"@ARGS:\1", command)
        command = re.sub(r"\s#\s.*$", "", command)  # a remark after the command
        words = shlex.split(command)
        out.append(words[:-1] if words[-1] == "&" else words)  # "&": in the background
    return out


def command(commands: list[list[str]], *prefix: str) -> list[str] | None:
    found = [c for c in commands if c[:len(prefix)] == list(prefix)]
    assert len(found) <= 1, found
    return found[0] if found else None


def serve_argv(commands: list[list[str]]) -> list[str]:
    found = [c for c in commands if c[0] == "vfiouser-iommu" and "serve" in c]
    assert len(found) == 1, commands
    return found[0]


def addresses(argv: list[str]) -> list[str]:
    """The SS.F of every --iommu and --endpoint option."""
    out = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--iommu":
            out.append(value.split(",")[0])
        elif flag == "--endpoint":
            out.append(value.split("@")[1].split(",")[0])
    return out


# -- the files and the code ----------------------------------------------------------------
def _qemu_args_from_the_code(name: str, capsys) -> list[str]:
    """Run the `lab qemu-args` command the .args header documents; its arguments."""
    documented = header_commands(CONFIGS / f"{name}.args")
    qemu_args = command(documented, "vfiouser-iommu", "lab", "qemu-args")
    assert qemu_args, f"{name}.args documents no `vfiouser-iommu lab qemu-args`"
    serve = serve_argv(header_commands(CONFIGS / f"{name}.cfg"))
    assert addresses(qemu_args) == addresses(serve), (qemu_args, serve)
    capsys.readouterr()
    assert cli_main(qemu_args[1:]) == 0
    return shlex.split(capsys.readouterr().out)


@pytest.mark.parametrize("name", NAMES)
def test_the_files_say_what_the_code_says(name, lab, capsys):
    files = model_of_files(name)
    machine = model_of_argv(machine_args(lab))
    for key in ("memory", "smp"):
        assert files[key] == machine[key], key
    assert files["machine"].items() >= machine["machine"].items()
    if name.startswith("ours-"):
        code = model_of_argv(_qemu_args_from_the_code(name, capsys))
        assert files["objects"] == code["objects"]
        assert files["machine"].items() >= code["machine"].items()
        assert files["memory"] == code["memory"]
        assert files["devices"] == code["devices"]
    else:
        code_args = (reference_args(Path("disk.img")) if name == "reference"
                     else reference_net_args("tap0"))
        code = model_of_argv(code_args)
        for key in ("objects", "drives", "netdevs", "devices"):
            assert files[key] == code[key], key


def test_readconfig_cannot_express_the_vfio_user_socket(lab, tmp_path):
    """Why ours need a .args file: QEMU refuses `socket` in a [device] section, both as
    dotted keys and as a string."""
    for body in ('socket.type = "unix"\n  socket.path = "x.sock"', 'socket = "x.sock"'):
        cfg = tmp_path / "try.cfg"
        cfg.write_text(f'[device]\n  driver = "vfio-user-pci"\n  addr = "01.0"\n  {body}\n')
        proc = subprocess.run([lab.qemu, "-M", "virt", "-readconfig", str(cfg), "-S",
                               "-nographic", "-monitor", "none", "-serial", "none"],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode != 0
        assert re.search(r"socket.type' not found|expected: object", proc.stderr), proc.stderr


# -- booting each configuration ------------------------------------------------------------
def _start_serve(argv: list[str], log: Path, netns: str) -> subprocess.Popen:
    argv = [a.replace(f"netns={HEADER_NETNS}", f"netns={netns}") for a in argv]
    functions = len(addresses(argv))
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vfiouser_iommu", *argv[1:]],
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    deadline, seen = time.monotonic() + 60, b""
    while seen.count(b"\n") < functions:
        ready = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            stop_process(proc)
            pytest.fail(f"serve did not start: {log.read_text()[-1000:]}")
        seen += chunk
    return proc


def _qemu_argv(documented: list[str], lab, initrd: Path, netns: str) -> list[str]:
    if documented[:3] == ["ip", "netns", "exec"]:
        assert documented[3] == HEADER_NETNS
        return in_namespace_argv(netns, _qemu_argv(documented[4:], lab, initrd, netns))
    assert documented[0] == "qemu-system-riscv64", documented
    argv = [lab.qemu, "-no-reboot"]
    replace = {"Image": lab.kernel, "initrd.gz": str(initrd), "console=ttyS0": KERNEL_CMDLINE}
    for word in documented[1:]:
        if word.startswith("@ARGS:"):
            argv += args_lines(CONFIGS / word.removeprefix("@ARGS:qemu-configs/"))
        else:
            argv.append(replace.get(word, word.replace("qemu-configs/", f"{CONFIGS}/")))
    return argv


@pytest.mark.parametrize("name", NAMES)
def test_each_configuration_boots_a_guest(name, lab, tap_network, tmp_path, monkeypatch,
                                          capsys):
    monkeypatch.chdir(tmp_path)
    commands = header_commands(CONFIGS / f"{name}.cfg")
    net = name.endswith("-net")
    script = NET_SCRIPT if net else default_script()
    initrd = guest_initramfs(lab, script).write(tmp_path / "initrd.gz")
    server = None
    try:
        for argv in commands:
            if argv[0] == "truncate":
                assert argv[1] == "-s"
                with open(argv[3], "wb") as f:
                    f.truncate(int(argv[2].rstrip("M")) << 20)
            elif argv[0] == "ip" and argv[1] != "netns" or argv[:3] == ["ip", "netns", "add"] \
                    or argv[:3] == ["ip", "netns", "del"]:
                continue  # the namespace and tap are the test's own (tap_network)
            elif argv[0] == "vfiouser-iommu" and "serve" in argv:
                server = _start_serve(argv, tmp_path / "server.log", tap_network.netns)
            elif argv[:3] == ["vfiouser-iommu", "lab", "dtb"]:
                dtb_argv = [a.replace("qemu-configs/", f"{CONFIGS}/") for a in argv[1:]]
                assert cli_main(dtb_argv) == 0
            else:
                qemu = _qemu_argv(argv, lab, initrd, tap_network.netns)
        run = run_guest(qemu, 240, echo=None)
    finally:
        if server is not None:
            stop_process(server)
    log = (tmp_path / "server.log").read_text() if server is not None else ""
    assert run.verdict.passed, (run.verdict.summary() + "\n" + "\n".join(run.console[-30:])
                                + "\n--- server log\n" + log[-2000:])
    results = {r.name for r in run.verdict.results}
    assert "iommu-probed" in results
    assert ("ping" in results) if net else ("virtio-blk-roundtrip" in results)
    if name.startswith("ours-"):
        assert "IODIR.INVAL_DDT DID=0x10 DV=0x1: done" in log
