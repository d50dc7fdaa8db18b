"""Guest: Linux's riscv-iommu driver builds real page tables and our IOMMU walks them.

The project's test module (vfiouser_iommu/lab/kmod) is built from source for the lab's
kernel and loaded in a guest. Through exported kernel API only, it claims the
iommu-testdev's DMA, makes the driver allocate and attach paging domains, maps 4 KiB,
64 KiB (Svnapot), 2 MiB and 1 GiB pages and the top of the aperture, drives testdev DMAs
and checks data, unmaps (every page must then fault) and remaps; it writes MSI page
tables (flat basic-translate to the real IMSIC files of Linux IRQs, MRIF with a notice
MSI, invalid/misconfigured/unreachable MSI PTEs) and a Sv39x4/Sv48x4 G-stage under
Linux's first stage. One boot per capability set:

- Sv57 + S + NL (svpbmt=off): MSI, first stage, nested; the driver's S=1 and NL
  invalidations appear in our command log;
- Sv48 and Sv39 (sv57=off / sv48=off): first stage;
- the default capabilities (Svpbmt advertised): Linux 7.2 fails the paging-domain
  allocation with -EOPNOTSUPP (docs/svpbmt.md), and `lab boot` says so;
- QEMU's built-in riscv-iommu-pci with QEMU's iommu-testdev: the same module, side by
  side (QEMU's testdev has no read direction and no MSI registers).
"""

from __future__ import annotations

import re
import time

import pytest

from vfiouser_iommu.lab import kmod
from vfiouser_iommu.lab.boot import boot_ours, boot_reference
from vfiouser_iommu.lab.stack import Topology

pytestmark = pytest.mark.guest
GUEST_KO = "/kmod/vfiouser_iommu_test.ko"
TIMEOUT = 300

# check -> stack -> one-line outcome; what -> seconds. Printed when the module's tests end.
KMOD_OUTCOMES: dict[str, dict[str, str]] = {}
BOOT_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def side_by_side_table(request):
    """Print every check on both stacks, and the boot times, after this file's tests
    (like the qtest layer's side-by-side table, without needing -s)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not (KMOD_OUTCOMES or BOOT_SECONDS):
        return
    reporter.write_sep("=", "test kernel module: our IOMMU and QEMU's riscv-iommu-pci")
    width = max((len(name) for name in KMOD_OUTCOMES), default=10)
    for check, by_stack in KMOD_OUTCOMES.items():
        reporter.write_line(f"{check:<{width}}  ours: {by_stack.get('ours', '-')}")
        reporter.write_line(f"{'':<{width}}  qemu: {by_stack.get('qemu', '-')}")
    for what, seconds in BOOT_SECONDS.items():
        reporter.write_line(f"{what}: {seconds:.1f}s")


@pytest.fixture(scope="module")
def test_module(lab):
    """The test module's .ko, built from the project's sources for the lab's kernel."""
    started = time.monotonic()
    ko = kmod.build(lab.kbuild_for_modules())
    BOOT_SECONDS["module build (0 s when cached)"] = time.monotonic() - started
    return ko


def script(*runs: str) -> str:
    return "".join(f"kmod_run {GUEST_KO} checks={checks}\n" for checks in runs)


def explain(run) -> str:
    return (run.verdict.summary() + "\n--- console\n" + "\n".join(run.console[-60:])
            + "\n--- server log\n" + run.server_log[-3000:])


def results(run) -> dict:
    return {r.name: r for r in run.verdict.results}


def fields(detail: str) -> dict[str, str]:
    return dict(re.findall(r"(\S+?)=(\S+)", detail))


def boot_kmod(lab, ko, tmp_path, label, iommu_options, *runs):
    run = boot_ours(lab, script(*runs), timeout=TIMEOUT, echo=None, workdir=tmp_path,
                    topology=Topology.parse(f"01.0,{iommu_options}", []),
                    files={GUEST_KO: ko.read_bytes()})
    BOOT_SECONDS[f"boot {label}"] = run.seconds
    return run


def record(stack, run):
    for r in run.verdict.results:
        if r.name.startswith("kmod-"):
            outcome = "pass" if r.passed else "FAIL"
            KMOD_OUTCOMES.setdefault(r.name.removeprefix("kmod-"), {})[stack] = \
                f"{outcome} {r.detail}"[:150]


def check(run, name):
    found = results(run).get(f"kmod-{name}")
    assert found is not None, f"no kmod-{name}\n" + explain(run)
    assert found.passed, f"kmod-{name}: {found.detail}\n" + explain(run)
    return fields(found.detail)


@pytest.fixture(scope="module")
def sv57(lab, test_module, tmp_path_factory):
    run = boot_kmod(lab, test_module, tmp_path_factory.mktemp("sv57"), "sv57+s+nl (msi, "
                    "paging, nested, alloc)", "svpbmt=off,s=on,nl=on",
                    "msi", "alloc,paging", "nested")
    record("ours", run)
    return run


def test_module_builds_from_source_for_the_lab_kernel(test_module):
    from vfiouser_iommu.lab.kbuild import vermagic

    assert vermagic(test_module).startswith("7.2.13+deb14-riscv64 SMP")


def test_every_check_passes_on_sv57_with_s_and_nl(sv57):
    assert not sv57.timed_out and sv57.verdict.passed, explain(sv57)


def test_driver_picks_sv57_and_every_mapping_size_is_walked_as_such(sv57):
    assert check(sv57, "paging-attach")["mode"] == "sv57"
    for name, size in (("4k", 0x1000), ("64k", 0x10000), ("2m", 0x200000),
                       ("1g", 0x40000000), ("top", 0x1000)):
        f = check(sv57, f"map-{name}")
        assert (f["write"], f["read"]) == ("0x0", "ok")
        # Our debug interface's translation of the IOVA: the leaf the driver wrote.
        assert int(f["leaf"], 16) == size, name
    assert check(sv57, "map-top")["iova"] == "0xfffffffffff000"


def test_unmap_faults_with_the_drivers_fault_line_and_remap_gives_new_data(sv57):
    for name in ("4k", "64k", "2m", "1g", "top"):
        f = check(sv57, f"unmap-{name}")
        assert f["faulted"].split("/")[0] == f["faulted"].split("/")[1] != "0"
    iova = check(sv57, "unmap-4k")["fault-iova"].removeprefix("0x")
    assert any(f"Fault 13 devid: 0x10 iotval: {iova} iotval2: 0" in line
               for line in sv57.console), explain(sv57)
    check(sv57, "remap-4k")
    assert int(check(sv57, "remap-table-as-2m")["leaf"], 16) == 0x200000


def test_s_and_nl_invalidations_appear_in_our_command_log(sv57):
    log = sv57.server_log
    napot = re.findall(r"IOTINVAL\.VMA ADDR=(0x[0-9a-f]+) S=0x1 (?:NL=0x1 )?PSCV=0x1", log)
    assert napot, explain(sv57)
    # The 64 KiB unmap at 0x20000000: ADDR 0x20007 (three trailing ones: 16 pages).
    assert "0x20007" in napot
    assert re.search(r"IOTINVAL\.VMA ADDR=0x[0-9a-f]+ S=0x1 NL=0x1 ", log)
    assert "stalled the queue" not in log


def test_msi_flat_interrupt_is_delivered_and_counted_by_linux(sv57):
    f = check(sv57, "msi-flat-delivered")
    before, after = (int(x) for x in f["count"].split("->"))
    assert after == before + 1


@pytest.mark.parametrize("name,cause", [("msi-pte-invalid", 262),
                                        ("msi-pte-misconfigured", 263),
                                        ("msi-pte-load-fault", 261)])
def test_bad_msi_ptes_block_the_interrupt_with_their_cause(sv57, name, cause):
    f = check(sv57, name)
    assert f["msi"] == "0xdead0002"
    assert any(f"Fault {cause} devid: 0x10 iotval: {f['iotval']}" in line
               for line in sv57.console), explain(sv57)
    assert re.search(rf"fault cause={cause} ttyp=3 did=0x10", sv57.server_log)


def test_mrif_sets_the_pending_bit_and_sends_the_notice(sv57):
    f = check(sv57, "msi-mrif")
    assert int(f["pending"], 16) >> 37 & 1
    before, after = (int(x) for x in f["notices"].split("->"))
    assert after == before + 1


@pytest.mark.parametrize("stage", ["sv39x4", "sv48x4"])
def test_first_stage_over_identity_and_window_g_stages(sv57, stage):
    check(sv57, f"nested-{stage}-identity")
    f = check(sv57, f"nested-{stage}-window")
    assert f["gpa"] != f["spa"]
    # Linux's unmap invalidation has GV=0: by the spec it need not touch GSCID 1.
    assert check(sv57, f"nested-{stage}-window-unmap")["after-unmap"] == "stale-hit"


def test_svpbmt_off_lets_the_driver_allocate(sv57):
    assert check(sv57, "paging-domain-alloc")["svpbmt"] == "0"


@pytest.fixture(scope="module")
def sv39_negative(lab, test_module, tmp_path_factory):
    return boot_kmod(lab, test_module, tmp_path_factory.mktemp("sv39"), "sv39 (paging, "
                     "check=on,cache=max,negative=on)",
                     "svpbmt=off,sv57=off,sv48=off,check=on,cache=max,negative=on", "paging")


def test_first_stage_sv48_with_the_invalidation_checker(lab, test_module, tmp_path):
    """The Sv48 boot also runs the invalidation checker with every cache at its largest:
    Linux's own map/unmap/remap flows (every page size, S and NL aside) use no stale
    entry."""
    run = boot_kmod(lab, test_module, tmp_path, "sv48 (paging, check=on,cache=max)",
                    "svpbmt=off,sv57=off,check=on,cache=max", "paging")
    assert run.verdict.passed, explain(run)
    assert check(run, "paging-attach")["mode"] == "sv48"
    for name in ("4k", "64k", "2m", "1g", "top"):
        check(run, f"map-{name}")
        check(run, f"unmap-{name}")
    assert "invalidation checker: 0 distinct stale use(s)" in run.server_log, explain(run)


def test_first_stage_sv39(sv39_negative):
    run = sv39_negative
    assert check(run, "paging-attach")["mode"] == "sv39"
    for name in ("4k", "64k", "2m", "1g", "top"):
        check(run, f"map-{name}")
        check(run, f"unmap-{name}")
    check(run, "remap-table-as-2m")


def test_negative_caching_catches_linux_mapping_a_faulted_iova_without_invalidating(
        sv39_negative):
    """negative=on (a deliberate deviation: V=0 PTEs cached until invalidated). Linux maps
    pages without any invalidation, as the spec lets it (no iotlb_sync_map), so the
    module's remap of an IOVA whose DMA just faulted still faults here, and the checker
    names the cached V=0 PTE and the invalidation it would need. Everything else passes."""
    run = sv39_negative
    failed = [r.name for r in run.verdict.results if not r.passed]
    assert failed == ["kmod-remap-4k"], explain(run)
    assert fields(results(run)["kmod-remap-4k"].detail)["write"] == "0xdead0002"
    iova = fields(results(run)["kmod-remap-4k"].detail)["iova"]
    stale = [line for line in run.server_log.splitlines()
             if "WARNING: stale use of" in line]                # not the summary's copy
    assert len(stale) == 1, explain(run)
    assert "invalidation checker: 1 distinct stale use(s)" in run.server_log
    assert "first-stage PTE (level 0, V=0)" in stale[0]
    assert "is cached as not valid (V=0) but memory now holds a valid one" in stale[0]
    assert f"missing IOTINVAL.VMA GV=0 PSCV=1 PSCID=0x1 AV=1 ADDR={iova}" in stale[0]


def test_svpbmt_advertised_makes_linux_7_2_fail_paging_domains(lab, test_module, tmp_path):
    run = boot_kmod(lab, test_module, tmp_path, "default caps (alloc)", "", "alloc")
    found = results(run)["kmod-paging-domain-alloc"]
    assert not found.passed and fields(found.detail) == {"err": "-95", "svpbmt": "1"}, \
        explain(run)
    assert any("svpbmt=off" in hint for hint in run.hints)


def test_same_module_on_qemus_riscv_iommu_pci(lab, test_module):
    run = boot_reference(lab, script("msi", "alloc,paging", "nested"), timeout=TIMEOUT,
                         echo=None, files={GUEST_KO: test_module.read_bytes()}, testdev=True)
    BOOT_SECONDS["boot reference (msi, paging, nested, alloc)"] = run.seconds
    record("qemu", run)
    r = results(run)
    assert r["kmod-setup"].passed and fields(r["kmod-setup"].detail)["ours"] == "0", \
        explain(run)
    assert not run.hints
    # What QEMU's model does is recorded, not judged: the table at the end shows it.
    assert "kmod-paging-attach" in r
