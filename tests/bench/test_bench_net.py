"""Benchmark: virtio-net between a guest and a network namespace, ours vs QEMU's.

Four stacks, each a guest whose virtio-net sits at 02.0 behind an IOMMU at 01.0 and
whose wire is a tap in a namespace the benchmark makes (pyroute2):

- `qemu`: QEMU's riscv-iommu-pci + its own virtio-net-pci (defaults: checksum and
  segmentation offloads, mergeable receive buffers), vhost off, QEMU in the namespace;
- `ours`: our IOMMU + our virtio-net over vfio-user (the server opens the tap), with
  its default offloads (checksum, TSO4/6, ECN, mergeable receive buffers);
- `qemu-plain` and `ours-plain`: the same two with no offload and no MRG_RXBUF
  (virtio-net-pci properties; our `offload=off`): one frame per wire frame.

Per boot, measured between the guest and the namespace (10.0.2.15 <-> 10.0.2.2):

- TCP to the namespace and from it (busybox nc in the guest, Python in the namespace),
  MB/s as the namespace's side timed it;
- UDP packet rate, guest to namespace: `netbench` (vfiouser_iommu/lab/guest/netbench.c)
  sends 64-byte datagrams as fast as the guest's stack takes them; the rate is what
  arrived in the namespace per second;
- ping round trips per second (busybox `ping -A`, one in flight: 1000 / average RTT).

Stacks alternate, each booted REPEATS times; medians and the ratios ours/QEMU are
printed. The 2-core lab machine is shared: trust the ratios of one run more than any
absolute number. Nothing here fails on time; it fails only if a guest does not finish.

Run: .venv/bin/python -m pytest tests/bench/test_bench_net.py -s -m bench
Larger: VFU_NET_BENCH_MIB=32 VFU_NET_BENCH_UDP=40000 VFU_NET_BENCH_REPEATS=5 (same
command). The defaults (4 MiB, 10000 datagrams, 3 boots per stack) keep `make test` short.
"""

from __future__ import annotations

import os
import re
import statistics

import pytest

from vfiouser_iommu.lab.boot import boot_ours
from vfiouser_iommu.lab.netns import TcpPeer, UdpCounter, boot_reference_net
from vfiouser_iommu.lab.stack import Topology
from vfiouser_iommu.lab.tools import guest_tool

pytestmark = pytest.mark.bench

MIB = int(os.environ.get("VFU_NET_BENCH_MIB", "4"))
REPEATS = int(os.environ.get("VFU_NET_BENCH_REPEATS", "3"))
UDP_PACKETS = int(os.environ.get("VFU_NET_BENCH_UDP", "10000"))
PINGS = 500
# virtio-net-pci properties that leave it the features ours offers.
PLAIN = (",csum=off,guest_csum=off,gso=off,host_tso4=off,host_tso6=off,host_ecn=off,"
         "host_ufo=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,"
         "mrg_rxbuf=off")

SCRIPT = f"""
eth=$(ls /sys/bus/pci/devices/0000:00:02.0/virtio*/net | head -n 1)
ip link set "$eth" up
ip addr add 10.0.2.15/24 dev "$eth"
ping -c 1 -W 10 10.0.2.2 >/dev/null || fail reach "no reply from 10.0.2.2"
echo "@@PING $(ping -A -q -c {PINGS} -s 56 10.0.2.2 | tail -n 1)"
/bin/netbench udp-send 10.0.2.2 6000 64 {UDP_PACKETS}
dd if=/dev/urandom of=/tmp/out bs=1M count={MIB} 2>/dev/null
got=$(nc 10.0.2.2 5001 < /tmp/out)
[ "$got" = "$(md5sum < /tmp/out | cut -d' ' -f1)" ] || fail tcp-out "md5 $got"
rm /tmp/out
nc 10.0.2.2 5002 | md5sum > /tmp/in.md5
echo "@@TCPIN $(cat /tmp/in.md5)"
pass bench done
"""
PING_RE = re.compile(r"@@PING round-trip min/avg/max = [\d.]+/([\d.]+)/")


def _boot(stack: str, lab, net, tool):
    if stack.startswith("ours"):
        options = {"offload": "off"} if stack == "ours-plain" else {}
        topology = Topology.parse("01.0", [net.endpoint_spec("02.0", **options)])
        return boot_ours(lab, SCRIPT, 900, echo=None, topology=topology, verbose=0,
                         files=tool)
    return boot_reference_net(lab, net, SCRIPT, 900, echo=None, files=tool,
                              net_options=PLAIN if stack == "qemu-plain" else "")


def _measure(stack: str, lab, net, tool) -> dict[str, float]:
    size = MIB << 20
    sink = TcpPeer(net, 5001, "sink", size)
    source = TcpPeer(net, 5002, "source", size)
    udp = UdpCounter(net, 6000)
    run = _boot(stack, lab, net, tool)
    sink.join(10)
    source.join(10)
    udp.stop()
    console = "\n".join(run.console)
    assert run.verdict.passed and not sink.error and not source.error, (
        f"{stack}: {run.verdict.summary()} {sink.error} {source.error}\n"
        + "\n".join(run.console[-20:]))
    assert f"@@TCPIN {source.md5}" in console, run.console[-20:]
    ping = PING_RE.search(console)
    assert ping, run.console[-20:]
    return {
        "tcp_out": sink.mbytes_per_second,
        "tcp_in": source.mbytes_per_second,
        "udp_pps": udp.rate,
        "udp_lost": 1 - udp.count / UDP_PACKETS,
        "ping_rt": 1000 / float(ping.group(1)),
    }


def test_virtio_net_ours_vs_qemu(lab, tap_network):
    tool = {"bin/netbench": guest_tool(lab, "netbench").read_bytes()}
    stacks = ("qemu", "ours", "qemu-plain", "ours-plain")
    samples: dict[str, list[dict[str, float]]] = {s: [] for s in stacks}
    for _ in range(REPEATS):
        for stack in stacks:
            samples[stack].append(_measure(stack, lab, tap_network, tool))
    med = {s: {k: statistics.median(x[k] for x in samples[s]) for k in samples[s][0]}
           for s in stacks}
    rows = [
        (f"TCP guest -> namespace, {MIB} MiB (MB/s)", "tcp_out", "{:.1f}"),
        (f"TCP namespace -> guest, {MIB} MiB (MB/s)", "tcp_in", "{:.1f}"),
        (f"UDP 64 B guest -> namespace, {UDP_PACKETS} sent (packets/s)", "udp_pps", "{:.0f}"),
        ("ping -A round trips/s (56 B)", "ping_rt", "{:.0f}"),
    ]
    print(f"\nvirtio-net, medians of {REPEATS} boots per stack (qemu: riscv-iommu-pci + "
          "virtio-net-pci; ours: our IOMMU + virtio-net over vfio-user; plain: no offloads, "
          "no MRG_RXBUF)")
    print("| measure | qemu | ours | ours/qemu | qemu-plain | ours-plain | plain ours/qemu |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, key, fmt in rows:
        q, o = med["qemu"][key], med["ours"][key]
        qp, op = med["qemu-plain"][key], med["ours-plain"][key]
        print(f"| {label} | {fmt.format(q)} | {fmt.format(o)} | {o / q:.2f} "
              f"| {fmt.format(qp)} | {fmt.format(op)} | {op / qp:.2f} |")
    print("UDP datagrams lost on the way (median): "
          + ", ".join(f"{s} {med[s]['udp_lost']:.1%}" for s in stacks))
    for stack in stacks:
        print(f"{stack} samples: " + "; ".join(
            " ".join(f"{k}={v:.1f}" for k, v in x.items()) for x in samples[stack]))
