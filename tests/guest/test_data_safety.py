"""No data lost: virtio-blk's flushed writes survive every kind of death.

A Linux guest on our IOMMU runs `blklog` (lab/guest/blklog.c): 4 KiB records, one
O_DIRECT write each, an fsync every 4 records reported as "@@FLUSHED <seq>". Once the
log is well under way, something dies:

* server-sigterm: the server is asked to stop (SIGTERM);
* server-sigkill: the server is killed outright;
* qemu-crash: QEMU is killed outright (the server stays up and must let it go).

Then the host reads the image (lab/blklog.py) and checks, sector by sector, that
every record up to the last one the guest saw flushed is whole, and that no sector
anywhere is torn (a record written but not flushed may be whole, partly there or
absent, but each of its sectors is either entirely written or untouched).
"""

from __future__ import annotations

import signal

import pytest
from lifecycle import Qemu, qemu_argv, start_stack, wait_until

from vfiouser_iommu.lab.blklog import check
from vfiouser_iommu.lab.tools import guest_tool
from vfiouser_iommu.vfio_user.client import Client

pytestmark = pytest.mark.guest

RECORD_SECTORS = 8
FLUSH_EVERY = 4
MIN_FLUSHED = 40          # records flushed before the death
BOOT_TIMEOUT = 300
GRACE = 15                # seconds the guest is watched after a server death
SCRIPT = f"/bin/blklog /dev/vda {RECORD_SECTORS} {FLUSH_EVERY} 100000\n"


def _flushed(line: str) -> int:
    return int(line.split()[1]) if line.startswith("@@FLUSHED ") else -1


def _kill_server(stack, sig: int) -> None:
    stack.proc.send_signal(sig)
    stack.proc.wait(timeout=30)


DEATHS = {
    "server-sigterm": lambda stack, qemu: _kill_server(stack, signal.SIGTERM),
    "server-sigkill": lambda stack, qemu: _kill_server(stack, signal.SIGKILL),
    "qemu-crash": lambda stack, qemu: qemu.kill(signal.SIGKILL),
}


@pytest.mark.parametrize("death", DEATHS)
def test_flushed_records_survive(lab, tmp_path, death):
    tool = {"bin/blklog": guest_tool(lab, "blklog").read_bytes()}
    stack = start_stack(lab, tmp_path, disk_size=16 << 20)
    try:
        with Qemu(qemu_argv(lab, stack, SCRIPT, files=tool)) as qemu:
            started = qemu.wait_for(lambda line: _flushed(line) >= MIN_FLUSHED, BOOT_TIMEOUT)
            assert started, "\n".join(qemu.console[-30:]) + stack.server_log()[-3000:]
            seen = len(qemu.console)
            DEATHS[death](stack, qemu)
            if death.startswith("server"):
                qemu.drain(GRACE)
            flushed = max(_flushed(line) for line in qemu.console)
            after = [line for line in qemu.console[seen:] if line.startswith("@@")]
        result = check(stack.disk, RECORD_SECTORS)
        print(f"{death}: guest saw records 0..{flushed} flushed; image: {result.summary()}; "
              f"guest after the death: {after[-3:] or 'silent'}")
        assert not result.torn, result.summary()
        assert result.last_whole_prefix >= flushed, result.summary()
        if death == "server-sigterm":
            assert stack.proc.returncode == 0
        if death == "qemu-crash":
            # The server let QEMU go and serves the next client.
            assert wait_until(lambda: stack.server_log().count("virtio-blk: client") >= 2, 30)
            with Client(stack.socket_dir / "03.0.sock") as client:
                client.negotiate()
                assert client.device_info()[1] == 9
    finally:
        stack.stop()
