"""Guest: virtio-net behind our IOMMU, on a tap in a network namespace the test makes.

Each test module gets its own namespace with a tap (pyroute2, `tap_network` in
tests/conftest.py); nothing it sends can leave that namespace, and it is gone after
the module (and removed at the next run if a crash left it).

- The tap alone (no guest): the endpoint opens the tap inside the namespace, and an
  ARP exchange crosses it both ways.
- One boot (vfiouser_iommu/lab/guest/virtio_net.sh), IOMMU 01.0 + virtio-net 02.0 + virtio-blk 03.0:
  the driver probes the endpoint in an IOMMU group; pings of three sizes up to the MTU,
  none lost; TCP both ways with matching MD5s while virtio-blk works; the IOMMU's own
  event counts grow with the traffic; the log shows the driver attaching the endpoint
  (IODIR.INVAL_DDT for its device ID) and the endpoint's traffic through its DMA view.
- One boot with `offload=off`: the same traffic, intact, in wire-sized frames.
- One boot with the endpoint outside the DTB's iommu-map: its device context never
  becomes valid, its first DMA faults, the server logs the fault and stops the device,
  the guest's driver prints the fault record and its pings fail: no hang.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import time

import pytest

from vfiouser_iommu.endpoints import build_endpoint
from vfiouser_iommu.lab.boot import boot_ours, default_script
from vfiouser_iommu.lab.netns import TcpPeer
from vfiouser_iommu.lab.stack import Topology

pytestmark = pytest.mark.guest
PINGS = 1000
MIB = 4
NET_DID = 0x10  # 02.0


def explain(run) -> str:
    return (run.verdict.summary() + "\n--- console\n" + "\n".join(run.console[-30:])
            + "\n--- server log\n" + run.server_log[-3000:])


def result(run, name):
    found = [r for r in run.verdict.results if r.name == name]
    assert found, f"the guest reported no {name}\n" + explain(run)
    assert found[0].passed, f"{name}: {found[0].detail}\n" + explain(run)
    return found[0]


# -- the tap alone -------------------------------------------------------------------------------
def _arp_request(src_mac: bytes, src_ip: str, dst_ip: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, socket.inet_aton(src_ip),
                      bytes(6), socket.inet_aton(dst_ip))
    return b"\xff" * 6 + src_mac + b"\x08\x06" + arp


def test_endpoint_opens_the_tap_inside_the_namespace(tap_network):
    function = build_endpoint("virtio-net", {"tap": tap_network.tap,
                                             "netns": tap_network.netns})
    fd = function.device.fd
    try:
        mac = bytes.fromhex("02aabbccddee")
        os.write(fd, bytes(12) + _arp_request(mac, "10.0.2.99", tap_network.address))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1)[0]:
                continue
            frame = os.read(fd, 4096)[12:]
            if frame[:6] == mac and frame[12:14] == b"\x08\x06":
                assert socket.inet_ntoa(frame[28:32]) == tap_network.address  # the sender
                break
        else:
            pytest.fail("no ARP reply from the namespace")
    finally:
        function.device.close()


# -- a guest on the tap ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def net_run(lab, tap_network, tmp_path_factory):
    size = MIB << 20
    sink = TcpPeer(tap_network, 5001, "sink", size)
    source = TcpPeer(tap_network, 5002, "source", size)
    topology = Topology.parse("01.0", [tap_network.endpoint_spec("02.0"), "virtio-blk@03.0"])
    script = f"PINGS={PINGS}\nMIB={MIB}\n" + default_script("virtio_net.sh")
    run = boot_ours(lab, script, timeout=300, echo=None, topology=topology,
                    workdir=tmp_path_factory.mktemp("net"))
    sink.join(10)
    source.join(10)
    return run, sink, source


def test_guest_finishes_and_every_check_passes(net_run):
    run, _, _ = net_run
    assert not run.timed_out and run.verdict.passed, explain(run)


def test_driver_probes_the_endpoint_in_an_iommu_group(net_run):
    run, _, _ = net_run
    assert "virtio_net" in result(run, "net-probed").detail
    result(run, "net-iommu-group")
    features = result(run, "net-features").detail
    assert features[32] == "1" and features[33] == "1"  # VERSION_1, ACCESS_PLATFORM
    # Linux takes every offload we offer: CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN,
    # HOST_TSO4/6, HOST_ECN, MRG_RXBUF (and MAC, MTU).
    for bit in (0, 1, 3, 5, 7, 8, 9, 11, 12, 13, 15):
        assert features[bit] == "1", (bit, features)


@pytest.mark.parametrize("size", [56, 1000, 1472])
def test_pings_up_to_the_mtu_none_lost(net_run, size):
    detail = result(net_run[0], f"ping-{size}").detail
    assert f"{PINGS} packets received, 0% packet loss" in detail


def test_tcp_to_the_namespace_arrives_intact(net_run):
    run, sink, _ = net_run
    detail = result(run, "tcp-to-host").detail
    assert not sink.error and sink.nbytes == MIB << 20, sink.error
    assert detail.endswith(sink.md5)


def test_tcp_from_the_namespace_arrives_intact(net_run):
    run, _, source = net_run
    detail = result(run, "tcp-from-host").detail
    assert not source.error, source.error
    assert detail == f"{MIB << 20} bytes md5 {source.md5}"


def test_virtio_blk_works_during_network_traffic(net_run):
    result(net_run[0], "blk-meanwhile")


def test_no_errors_in_the_guest_interface_statistics(net_run):
    stats = dict(kv.split("=") for kv in result(net_run[0], "net-stats").detail.split())
    assert int(stats["rx_packets"]) >= 3 * PINGS and int(stats["tx_packets"]) >= 3 * PINGS
    for counter in ("rx_errors", "tx_errors", "rx_length_errors", "rx_dropped"):
        assert stats[counter] == "0", stats


def test_the_iommu_counted_the_dma_it_translated(net_run):
    run, _, _ = net_run
    m = re.findall(r"riscv-iommu: client left; events so far: .*untranslated_req=(\d+)",
                   run.server_log)
    assert m, run.server_log[-2000:]
    # Every frame each way is at least one buffer access and its ring accesses.
    assert int(m[-1]) >= 2 * 2 * 3 * PINGS, m


def test_the_log_shows_the_driver_attaching_the_endpoint_and_its_traffic(net_run):
    run, _, _ = net_run
    assert re.search(rf"IODIR\.INVAL_DDT DID={NET_DID:#x} DV=0x1: done", run.server_log)
    m = re.search(r"virtio-net\[vfu-net-[\d-]+/tap0\]: reset; since the last one: (.*)",
                  run.server_log)
    assert m, run.server_log[-2000:]
    stats = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    assert stats["rx_packets"] >= 3 * PINGS and stats["tx_packets"] >= 3 * PINGS
    assert set(stats) == {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes"}, stats  # no drop
    # Segmentation offload both ways: TCP moved frames larger than the 1514-byte wire
    # frames, so on average the pings and the 2 x 4 MiB took fewer, larger frames.
    tcp_frames = {d: stats[f"{d}_packets"] - 3 * PINGS for d in ("rx", "tx")}
    assert all(stats[f"{d}_bytes"] / n > 1514 for d, n in tcp_frames.items()), stats
    assert "device needs reset" not in run.server_log


# -- the endpoint's device context never valid -----------------------------------------------------
FAULT_SCRIPT = r"""
dev=/sys/bus/pci/devices/0000:00:02.0
eth=$(ls $dev/virtio*/net 2>/dev/null | head -n 1)
if [ -e $dev/iommu_group ]; then fail outside-map "in group $(readlink $dev/iommu_group)"
else pass outside-map "no iommu_group"; fi
ip link set "$eth" up
ip addr add 10.0.2.15/24 dev "$eth"
out=$(ping -c 3 -W 2 -w 6 10.0.2.2 2>&1 | grep 'packets transmitted')
case "$out" in
    *" 0 packets received"*) pass ping-fails "$out" ;;
    *) fail ping-fails "$out" ;;
esac
sleep 1
line=$(dmesg | grep 'Fault 258 devid: 0x10' | head -n 1)
if [ -n "$line" ]; then pass driver-prints-fault "$line"
else fail driver-prints-fault "$(dmesg | grep -i -E 'iommu|virtio' | tail -n 5 | tr '\n' '|')"; fi
"""


def test_endpoint_outside_the_iommu_map_faults_and_the_guest_sees_errors(lab, tap_network,
                                                                         tmp_path):
    topology = Topology.parse("01.0", [tap_network.endpoint_spec("02.0"), "virtio-rng@03.0"])
    topology.outside_iommu_map = ["02.0"]
    run = boot_ours(lab, FAULT_SCRIPT, timeout=240, echo=None, topology=topology,
                    workdir=tmp_path)
    assert not run.timed_out and run.verdict.passed, explain(run)
    # The IOMMU: "DDT entry not valid" (cause 258) for device 0x10, an untranslated read
    # (TTYP 2): the first ring access.
    assert re.search(rf"fault cause=258 ttyp=2 did={NET_DID:#x}", run.server_log), \
        run.server_log[-2000:]
    assert re.search(r"virtio-net: device needs reset: queue \d: DMA read .*IOMMU fault cause 258",
                     run.server_log), run.server_log[-2000:]


def test_the_namespace_and_tap_are_gone_after_the_network_is_removed(tap_network):
    from vfiouser_iommu.lab.netns import TapNetwork

    assert tap_network.exists and tap_network.tap_exists()
    with TapNetwork() as other:
        assert other.netns != tap_network.netns and other.tap_exists()
    assert not other.exists and not other.tap_exists()


def test_a_namespace_left_by_a_killed_run_is_removed_by_the_next(tmp_path):
    import signal
    import subprocess
    import sys

    from vfiouser_iommu.lab.netns import our_namespaces, remove_leftovers

    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom vfiouser_iommu.lab.netns import TapNetwork\n"
         "net = TapNetwork().create()\nprint(net.netns, flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
        assert name in our_namespaces()
        assert name not in remove_leftovers()  # its process is alive: not a leftover
    finally:
        child.send_signal(signal.SIGKILL)     # no finalizer runs
        child.wait()
        child.stdout.close()
    assert name in our_namespaces()
    assert name in remove_leftovers()
    assert name not in our_namespaces()


def test_without_offloads_linux_uses_one_small_buffer_per_frame(lab, tap_network, tmp_path):
    """offload=off: no CSUM/TSO/MRG_RXBUF offered; the same traffic crosses intact in
    wire-sized frames (Linux's "small buffers" receive path)."""
    size = 2 << 20
    sink = TcpPeer(tap_network, 5001, "sink", size)
    source = TcpPeer(tap_network, 5002, "source", size)
    topology = Topology.parse("01.0", [tap_network.endpoint_spec("02.0", offload="off"),
                                       "virtio-blk@03.0"])
    script = "PINGS=100\nMIB=2\n" + default_script("virtio_net.sh")
    run = boot_ours(lab, script, timeout=300, echo=None, topology=topology, workdir=tmp_path)
    sink.join(10)
    source.join(10)
    assert run.verdict.passed, explain(run)
    features = result(run, "net-features").detail
    assert [features[b] for b in (0, 1, 7, 11, 15)] == ["0"] * 5, features
    assert result(run, "tcp-to-host").detail.endswith(sink.md5) and sink.nbytes == size
    assert result(run, "tcp-from-host").detail == f"{size} bytes md5 {source.md5}"
    m = re.search(r"virtio-net\[.*\]: reset; since the last one: (.*)", run.server_log)
    stats = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    assert set(stats) == {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes"}, stats
    assert stats["tx_bytes"] / stats["tx_packets"] <= 1514
    assert stats["rx_bytes"] / stats["rx_packets"] <= 1514
