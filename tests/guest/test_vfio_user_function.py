"""Guest: a Linux guest sees our iommu-testdev, served over vfio-user, in sysfs.

Proves the PCI function our server models is a real PCI function to Linux: the IDs and
class in sysfs are QEMU's iommu-testdev's, BAR0 is a 4 KiB 32-bit memory BAR that
Linux assigned, and the MSI-X capability is visible. The guest runs a busybox script
with the lab's kernel; the server is the real `vfiouser-iommu serve` command.
"""

from __future__ import annotations

import signal

import pytest

from vfiouser_iommu import topology
from vfiouser_iommu.lab.boot import guest_initramfs, kernel_args, machine_args, run_guest
from vfiouser_iommu.lab.stack import start_server_process

pytestmark = pytest.mark.guest

ADDR = "03.0"
BDF = f"0000:00:{ADDR}"
MEMORY = "512M"

SCRIPT = f"""
dev=/sys/bus/pci/devices/{BDF}
if [ -d "$dev" ]; then pass present "$dev"; else fail present "no $dev"; fi
pass vendor "$(cat $dev/vendor)"
pass device "$(cat $dev/device)"
pass class "$(cat $dev/class)"
pass subsystem "$(cat $dev/subsystem_vendor) $(cat $dev/subsystem_device)"
pass bar0 "$(head -n 1 $dev/resource)"
pass config "$(od -An -v -tx1 -N 96 $dev/config | tr -d '\\n')"
"""


@pytest.fixture(scope="module")
def guest(lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("vfu-guest")
    spec = f"iommu-testdev@{ADDR}"
    server = start_server_process(work, [spec])
    try:
        initrd = guest_initramfs(lab, SCRIPT, modules=[]).write(work / "initrd.gz")
        argv = (machine_args(lab, memory=MEMORY) + kernel_args(lab, initrd)
                + topology.qemu_vfio_user_args(work, [topology.parse_function(spec)], MEMORY))
        run = run_guest(argv, timeout=180, echo=None)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    # The script's end (@@DONE), not run.timed_out: run_guest can flag a guest that has
    # already powered off as timed out when QEMU closes its stdout before exiting.
    assert run.verdict.exit_status == 0, "\n".join(run.console[-30:])
    return {r.name: r for r in run.verdict.results}, run


def detail(guest, name):
    results, run = guest
    assert name in results, "\n".join(run.console[-30:])
    return results[name].detail.strip()


def test_function_is_present(guest):
    results, _ = guest
    assert results["present"].passed


def test_ids_and_class_are_qemus_iommu_testdev(guest):
    assert detail(guest, "vendor") == "0x1b36"
    assert detail(guest, "device") == "0x0005"
    assert detail(guest, "class") == "0x00ff00"
    assert detail(guest, "subsystem") == "0x1af4 0x1100"


def test_bar0_is_a_4k_memory_bar_linux_assigned(guest):
    start, end, flags = (int(x, 16) for x in detail(guest, "bar0").split())
    assert start != 0
    assert end - start + 1 == 0x1000
    assert flags & 0x200          # IORESOURCE_MEM
    assert not flags & 0x100000   # not 64-bit


def test_msix_capability_is_visible(guest):
    config = bytes.fromhex(detail(guest, "config").replace(" ", ""))
    ptr, caps = config[0x34], []
    while ptr and len(caps) < 16:
        caps.append(config[ptr])
        ptr = config[ptr + 1]
    assert 0x11 in caps
