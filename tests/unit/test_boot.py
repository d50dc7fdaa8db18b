"""run_guest: console streaming, the verdict, and nothing left running after a timeout.

A shell script stands in for QEMU here; the real QEMU is in tests/guest."""

import time

from vfiouser_iommu.lab.boot import run_guest


def fake_qemu(tmp_path, body):
    script = tmp_path / "qemu"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return [str(script)]


def alive(pid: int) -> bool:
    """Running, not just a zombie waiting for whoever inherited it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_finished_guest_gives_its_verdict_and_the_console(tmp_path):
    seen = []
    run = run_guest(fake_qemu(tmp_path, 'echo boot\necho "@@INIT 0.5"\n'
                              'echo "@@RESULT x pass fine"\necho "@@DONE 0"\n'),
                    timeout=20, echo=None, on_line=seen.append)
    assert run.verdict.passed and not run.timed_out and run.returncode == 0
    assert run.console == seen == ["boot", "@@INIT 0.5", "@@RESULT x pass fine", "@@DONE 0"]
    assert run.init_seconds is not None


def test_a_timeout_kills_qemu_and_everything_it_started(tmp_path):
    pids = tmp_path / "pids"
    argv = fake_qemu(tmp_path, f'sleep 300 &\necho $! > {pids}\necho $$ >> {pids}\n'
                               'echo "@@RESULT x pass"\nsleep 300\n')
    started = time.monotonic()
    run = run_guest(argv, timeout=1.5, echo=None)
    assert run.timed_out and not run.verdict.passed
    assert time.monotonic() - started < 15
    # Signalled processes may take a moment to be scheduled and die on a loaded machine.
    deadline = time.monotonic() + 10
    for pid in map(int, pids.read_text().split()):
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"process {pid} survived the timeout"


def test_a_partial_last_line_is_kept(tmp_path):
    run = run_guest(fake_qemu(tmp_path, 'printf "@@RESULT a pass\\n@@DONE 0\\nno newline"\n'),
                    timeout=20, echo=None)
    assert run.console[-1] == "no newline" and run.verdict.passed
