"""Guest: a stock Linux guest whose riscv-iommu driver runs on OUR IOMMU.

One boot (vfiouser_iommu/lab/guest/our_iommu.sh, which `smoke` runs too) proves the
driver probes our vfio-user function, its MSI-X vectors are wired, every endpoint sits
in an IOMMU group, the driver's commands complete in our command queue, virtio-blk and
virtio-rng do their DMA through our translation, and a DMA fault provoked in the guest
reaches the fault queue, raises the IOMMU's interrupt and is printed by the driver. A
second boot (lab/guest/reboot.sh) reboots the guest: QEMU resets our functions and the
driver probes again.

Both boots run our IOMMU with the invalidation checker on, every cache at its largest and
negative caching on (`check=on,cache=max,negative=on`, docs/introspection.md): the stock
driver must work there too and get no stale-use warning. (The third boot, another
topology, keeps the default modes; `make demo` and the benchmarks run the default too.)
"""

import hashlib
import re

import pytest

from vfiouser_iommu.lab.boot import boot_ours, default_script
from vfiouser_iommu.lab.stack import Topology

pytestmark = pytest.mark.guest
STRICTEST = "check=on,cache=max,negative=on"


def boot(lab, workdir, script, **kwargs):
    return boot_ours(lab, default_script(script), timeout=240, echo=None,
                     workdir=workdir, topology=Topology(iommu_options=STRICTEST), **kwargs)


def assert_no_stale_use(run) -> None:
    """The checker ran (its summary is in the log) and found nothing."""
    assert "invalidation checker: 0 distinct stale use(s), 0 use(s) in all" in \
        run.server_log, explain(run)
    assert "stale use of" not in run.server_log, explain(run)


def explain(run) -> str:
    return (run.verdict.summary() + "\n--- console\n" + "\n".join(run.console[-30:])
            + "\n--- server log\n" + run.server_log[-3000:])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ours")


@pytest.fixture(scope="module")
def run(lab, workdir):
    return boot(lab, workdir, "our_iommu.sh")


def result(run, name):
    found = [r for r in run.verdict.results if r.name == name]
    assert found, f"the guest reported no {name}\n" + explain(run)
    assert found[0].passed, f"{name}: {found[0].detail}\n" + explain(run)
    return found[0]


def test_guest_finishes_and_every_check_passes(run):
    assert not run.timed_out and run.verdict.passed, explain(run)


def test_no_stale_use_with_the_checker_on_and_caches_at_their_largest(run):
    assert_no_stale_use(run)


def test_the_fault_record_is_followed_by_its_walk_in_the_log(run):
    log = run.server_log
    fault = log.index("fault cause=258 ttyp=3 did=0x10")
    walk = log.index("walk: DDT.L", fault)
    assert log.index("walk: cause 258 (DDT entry not valid): device context at", walk)


def test_driver_probes_our_device_without_errors(run):
    assert "riscv-iommu@0000:00:01.0" in result(run, "iommu-probed").detail
    result(run, "driver-no-errors")


def test_iommu_msix_vectors_appear_in_proc_interrupts(run):
    assert "PCI-MSIX-0000:00:01.0" in result(run, "iommu-msix").detail


@pytest.mark.parametrize("bdf", ["0000:00:02.0", "0000:00:03.0", "0000:00:04.0"])
def test_every_endpoint_is_in_an_iommu_group(run, bdf):
    result(run, f"iommu-group-{bdf}")


def test_server_log_shows_the_drivers_commands_completing(run):
    for command in (r"IODIR\.INVAL_DDT: done", r"IODIR\.INVAL_DDT DID=0x10 DV=0x1: done",
                    r"IOTINVAL\.VMA: done", r"IOFENCE\.C PW=0x1 PR=0x1: done"):
        assert re.search(command, run.server_log), command
    assert "stalled the queue" not in run.server_log


def test_virtio_blk_round_trip_and_the_data_is_in_the_image(run, workdir):
    md5 = result(run, "virtio-blk-roundtrip").detail.split()[-1]
    with open(workdir / "disk.img", "rb") as f:
        on_disk = hashlib.md5(f.read(32 << 20)).hexdigest()
    assert on_disk == md5


def test_virtio_rng_gives_bytes(run):
    assert len(result(run, "virtio-rng").detail) == 64


def test_dma_fault_reaches_the_driver_with_cause_and_device_id(run):
    detail = result(run, "dma-fault-reported").detail
    assert "0xDEAD0002" in detail              # the testdev saw its DMA fail
    assert "Fault 258 devid: 0x10 iotval: 80001000 iotval2: 0" in detail
    result(run, "fault-interrupt")
    # TTYP 3: an untranslated write (the testdev writes its pattern).
    assert re.search(r"fault cause=258 ttyp=3 did=0x10 pid=- iotval=0x80001000", run.server_log)


def test_reboot_resets_our_functions_and_the_driver_probes_again(lab, tmp_path):
    rebooted = boot(lab, tmp_path, "reboot.sh", reboot=True)
    assert not rebooted.timed_out and rebooted.verdict.passed, explain(rebooted)
    names = {r.name for r in rebooted.verdict.results}
    assert {"first-boot-probe", "second-boot-probe", "second-boot-virtio-blk"} <= names
    assert rebooted.server_log.count("riscv-iommu: device reset") >= 2
    assert len(re.findall(r"IODIR\.INVAL_DDT: done", rebooted.server_log)) == 2
    assert_no_stale_use(rebooted)


def test_another_topology_iommu_at_05_and_blk_at_02(lab, tmp_path):
    topology = Topology.parse("05.0", ["virtio-blk@02.0", "virtio-rng@04.0"])
    run = boot_ours(lab, default_script(), timeout=240, echo=None, workdir=tmp_path,
                    topology=topology)
    assert run.verdict.passed, explain(run)
    results = {r.name: r for r in run.verdict.results}
    assert "riscv-iommu@0000:00:05.0" in results["iommu-probed"].detail
    assert results["iommu-group-0000:00:02.0"].passed
    assert results["virtio-blk-roundtrip"].passed
