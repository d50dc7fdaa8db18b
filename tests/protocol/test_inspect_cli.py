"""`vfiouser-iommu inspect`: the control commands from a shell, as tables and as JSON."""

from __future__ import annotations

import json

import pytest
from control_stack import DATA, DID, IOVA, Stack

from vfiouser_iommu.cli import main


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.stop()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_walk_table_and_json(stack, capsys):
    code, out, _ = run(capsys, stack.path, "walk", hex(DID), hex(IOVA), "write")
    assert code == 0
    assert "first-stage PTE" in out and f"result: {DATA:#x} (4 KiB page, rw---)" in out
    code, out, _ = run(capsys, stack.path.parent, "walk", DID, hex(IOVA + 0x1000), "read",
                       "--json")
    assert code == 0 and json.loads(out)["fault"]["name"] == "Read page fault"


def test_every_command_prints_something(stack, capsys):
    stack.translate(IOVA)
    stack.translate(IOVA + 0x1000)
    for argv in (["registers"], ["dc", DID], ["caches"], ["faults"], ["commands"],
                 ["stats"], ["checker"], ["mode"], ["raw", "query-version"]):
        code, out, err = run(capsys, stack.path, *argv)
        assert code == 0 and out.strip() and not err, argv
    code, out, _ = run(capsys, stack.path, "caches")
    assert f"{IOVA:#x}" in out and f"{DATA:#x}" in out
    code, out, _ = run(capsys, stack.path, "faults")
    assert "Read page fault" in out


def test_mode_switch_from_the_shell(stack, capsys):
    code, out, _ = run(capsys, stack.path, "mode", "check=on", "cache=max")
    assert (code, out.strip()) == (0, "check=on cache=max negative=off")
    assert stack.function.iommu.checker is not None
    code, _, err = run(capsys, stack.path, "mode", "cache=most")
    assert code == 1 and "cache" in err


def test_watch_prints_rates(stack, capsys):
    view = stack.function.iommu.dma_view(DID)
    stack.on_loop(lambda: view.write(IOVA, bytes(4096)))
    code, out, _ = run(capsys, stack.path, "watch", "--count", "1", "--interval", "0.1",
                       "--json")
    rates = json.loads(out)
    assert code == 0 and "iommu-testdev@02.0" in rates["endpoints"]


def test_usage_and_connection_errors(stack, capsys, tmp_path):
    assert run(capsys, stack.path, "walk", DID)[0] == 2
    assert run(capsys, stack.path, "walk", DID, IOVA, "sideways")[0] == 2
    assert run(capsys, stack.path, "frobnicate")[0] == 2
    code, _, err = run(capsys, tmp_path / "nowhere", "stats")
    assert code == 1 and "cannot connect" in err
    code, _, err = run(capsys, stack.path, "dc", "0x1000000")
    assert code == 1 and "did" in err
