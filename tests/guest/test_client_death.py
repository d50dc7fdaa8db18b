"""Client death and reconnect, with real QEMU: the server outlives every QEMU it serves.

Each round attaches a new QEMU to the IOMMU, the iommu-testdev, virtio-blk and
virtio-rng functions of one long-lived server, then SIGKILLs it at a bad moment:

* "dma": a Linux guest boots on our IOMMU, starts O_DIRECT writes and reads on
  virtio-blk and reads on virtio-rng in loops, and dies in the middle of them;
* "cmdq": a qtest QEMU points the IOMMU's command queue at 65 536 commands, rings the
  doorbell and dies while the server is still executing them.

After each death the server must drop that client's maps and eventfds, log the
disconnects, keep serving a function QEMU never had (the witness, 05.0, driven by the
test), and take the next QEMU, whose guest boots and probes the IOMMU again. After each
round the server's fds and VMAs are back to what they were after the first round, and
its memory does not keep growing.

CI runs STRESS_ROUNDS rounds (default 3: dma, cmdq, dma); `make stress` runs 20.
"""

from __future__ import annotations

import os
import random
import re
import signal

import pytest
from lifecycle import ProcessUsage, Qemu, qemu_argv, start_stack, wait_until

from vfiouser_iommu import topology
from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.lab.pci import PciBus
from vfiouser_iommu.lab.qtest import QTest
from vfiouser_iommu.vfio_user.client import Client

pytestmark = pytest.mark.guest

ROUNDS = int(os.environ.get("STRESS_ROUNDS", "3"))
CQ_COMMANDS = 1 << 16
CQ_BASE = 0x8100_0000          # guest RAM, aligned to the queue's 1 MiB
BOOT_TIMEOUT = 300
# RSS may grow while Python's allocator settles; a leak per round would pass this soon.
RSS_SLACK_KIB = 16 << 10

BUSY = r"""
if [ -e /sys/class/iommu/riscv-iommu@0000:00:01.0 ]; then pass iommu-probed
else fail iommu-probed "no riscv-iommu@0000:00:01.0"; fi
(while :; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=8 oflag=direct 2>/dev/null
    dd if=/dev/vda of=/dev/null bs=64k count=8 iflag=direct 2>/dev/null
done) &
(while :; do dd if=/dev/hwrng of=/dev/null bs=64 count=8 2>/dev/null; done) &
sleep 2
echo "@@BUSY"
sleep 100000
"""

DISCONNECT = re.compile(r": client (disconnected|closed mid-message|connection error)")


def _disconnects(stack) -> int:
    return len(DISCONNECT.findall(stack.server_log()))


def _dma_round(lab, stack) -> str:
    with Qemu(qemu_argv(lab, stack, BUSY)) as qemu:
        busy = qemu.wait_for(lambda line: "@@BUSY" in line, BOOT_TIMEOUT)
        probed = any("@@RESULT iommu-probed pass" in line for line in qemu.console)
        assert busy and probed, "the guest did not boot and probe the IOMMU:\n" + \
            "\n".join(qemu.console[-30:]) + "\n--- server\n" + stack.server_log()[-3000:]
        qemu.drain(random.uniform(0.0, 1.5))   # somewhere in the middle of the DMA
        qemu.kill(signal.SIGKILL)
    return "guest booted, killed mid-DMA"


def _cmdq_round(lab, stack) -> str:
    before = _disconnects(stack)
    functions = [f for f in stack.functions if f.addr != "05.0"]
    args = topology.vfio_user_device_args(stack.socket_dir, functions)
    with QTest(args, memory=stack.memory, memory_backend="memory-backend-memfd,share=on",
               lab=lab) as qt:
        iommu = PciBus(qt).at(1, 0)
        iommu.assign_bars()
        iommu.enable()
        bar = iommu.bars[0].addr
        qt.memwrite(CQ_BASE, (1).to_bytes(16, "little") * CQ_COMMANDS)   # IOTINVAL.VMA
        log2sz = CQ_COMMANDS.bit_length() - 1
        qt.writeq(bar + 0x18, (CQ_BASE >> 12) << 10 | (log2sz - 1))   # cqb
        qt.writel(bar + 0x48, 1)                                        # cqcsr.cqen
        done_before = stack.server_log().count("IOTINVAL.VMA: done")
        qt.writel(bar + 0x24, CQ_COMMANDS - 1)                          # cqt: ring
        qt.kill(signal.SIGKILL)
    assert wait_until(lambda: _disconnects(stack) >= before + 4, 60)
    done = stack.server_log().count("IOTINVAL.VMA: done") - done_before
    assert done < CQ_COMMANDS - 1, "the command queue was idle when QEMU died"
    return f"killed with {done} of {CQ_COMMANDS - 1} commands executed"


def _settled(stack, fds: int | None) -> ProcessUsage:
    """The server's usage once its disconnects are done (their log lines come first):
    once it holds `fds` fds (within 10 s), or, without `fds`, once its count stays put."""
    pid = stack.proc.pid
    if fds is None:
        counts = [ProcessUsage.of(pid).fds]
        wait_until(lambda: counts.append(ProcessUsage.of(pid).fds) or counts[-1] == counts[-2],
                   10, step=0.5)
    else:
        wait_until(lambda: ProcessUsage.of(pid).fds == fds, 10)
    return ProcessUsage.of(pid)


ROUND_KINDS = {"dma": _dma_round, "cmdq": _cmdq_round}


def test_qemu_dies_and_a_new_one_attaches_round_after_round(lab, tmp_path):
    stack = start_stack(lab, tmp_path)
    witness = Client(stack.socket_dir / "05.0.sock")
    witness.negotiate()
    usage: list[ProcessUsage] = []
    stopped = None
    try:
        for round_ in range(ROUNDS):
            kind = ("dma", "cmdq")[round_ % 2]
            before = _disconnects(stack)
            outcome = ROUND_KINDS[kind](lab, stack)
            # Every function QEMU had is let go, and the witness never noticed.
            assert wait_until(lambda b=before: _disconnects(stack) >= b + 4, 60), \
                stack.server_log()[-3000:]
            assert witness.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
            assert stack.proc.poll() is None, stack.server_log()[-3000:]
            usage.append(_settled(stack, usage[0].fds if usage else None))
            print(f"round {round_} ({kind}): {outcome}; server {usage[-1]}")
        # The next QEMU attaches: the last round's guest proves it once more.
        _dma_round(lab, stack)
        assert wait_until(lambda: _disconnects(stack) >= 4 * (ROUNDS + 1), 60)
        final = _settled(stack, usage[0].fds)
        print(f"after {ROUNDS + 1} QEMUs: server {final}")
        assert final.fds == usage[0].fds, \
            f"fds {usage[0].fd_targets} -> {final.fd_targets}"
        assert final.vmas <= usage[0].vmas, f"VMAs {usage[0].vmas} -> {final.vmas}"
        assert final.rss_kib <= usage[0].rss_kib + RSS_SLACK_KIB, \
            f"RSS {usage[0].rss_kib} KiB -> {final.rss_kib} KiB"
        witness.close()
        stopped = stack.stop()
    finally:
        witness.close()
        stack.stop()
    assert stopped == 0, "serve did not exit cleanly on SIGTERM"
