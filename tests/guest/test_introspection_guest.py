"""Guest: introspection of a live stock-Linux guest on our IOMMU.

One boot, with the invalidation checker on, caches at their largest, negative caching on
and `serve --trace`. While the guest moves data through virtio-blk, hostile control
clients hammer the control socket (garbage, a 16 MiB line, a subscriber that never
reads, connect/disconnect loops): the guest's checks must still pass, nothing crashes.
Then, at markers the guest prints, the test asks the live server through the control
socket: `walk` of a device the driver put in an identity domain (a DC-level walk: stock
Linux gives identity domains) and, after the guest provokes a DMA fault, of the device
whose context it invalidated; `query-caches` shows the device contexts the DMA filled
(and the negative one); `query-faults` has the fault. Finally the trace file is strict
trace-event JSON holding exactly the commands and faults the server's log shows.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import pytest

from vfiouser_iommu.control.client import ControlConnection
from vfiouser_iommu.lab.boot import boot_ours
from vfiouser_iommu.lab.stack import Topology

pytestmark = pytest.mark.guest
STRICTEST = "check=on,cache=max,negative=on"
BLK, RNG, TESTDEV = 0x18, 0x20, 0x10

SCRIPT = r"""
echo "@@PHASE hostile"
sleep 1
MIB=16
dd if=/dev/urandom of=/tmp/out bs=1M count=$MIB 2>/dev/null
want=$(md5sum < /tmp/out | cut -d' ' -f1)
dd if=/tmp/out of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M count=$MIB iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
if [ "$want" = "$got" ]; then pass blk-under-hostile-clients "$got"
else fail blk-under-hostile-clients "wrote $want read $got"; fi
bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ ${#bytes} -eq 64 ]; then pass rng-under-hostile-clients
else fail rng-under-hostile-clients; fi
echo "@@PHASE inspect"
dev=/sys/bus/pci/devices/0000:00:02.0
bar=$(printf '%d' "$(head -n1 $dev/resource | cut -d' ' -f1)")
echo 1 > $dev/enable
echo 1 > $dev/remove
devmem $((bar + 0x04)) 32 0x80001000
devmem $((bar + 0x08)) 32 0
devmem $((bar + 0x0c)) 32 4
devmem $((bar + 0x14)) 32 1
devmem $((bar + 0x00)) 32 >/dev/null
result=$(devmem $((bar + 0x10)) 32)
pass testdev-dma "$result"
echo "@@PHASE after-fault"
"""


class Hostile:
    """Threads that abuse the control socket until stopped."""

    def __init__(self, path):
        self.path = str(path)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0
        self.threads = [threading.Thread(target=t, daemon=True) for t in
                        (self.garbage, self.huge_line, self.never_reads, self.flapping)]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(self.path)
        return s

    def _loop(self, body):
        while not self.stop.is_set():
            self.rounds += 1
            try:
                body()
            except OSError:
                pass             # the server may drop us: that is its right
            except Exception as e:  # a bug in the test itself
                self.errors.append(repr(e))
                return

    def garbage(self):
        def body():
            with self._connect() as s:
                for junk in (os.urandom(300) + b"\n", b'{"execute":\n', b"[[[[[\n",
                             b'{"execute": "walk", "arguments": {"did": []}}\n'):
                    s.sendall(junk)
                s.recv(65536)
        self._loop(body)

    def huge_line(self):
        def body():
            with self._connect() as s:
                chunk = b"x" * (1 << 20)
                for _ in range(16):
                    s.sendall(chunk)
        self._loop(body)

    def never_reads(self):
        def body():
            with self._connect() as s:
                s.sendall(b'{"execute": "qmp_capabilities", '
                          b'"arguments": {"enable": ["events"]}}\n')
                s.setblocking(False)
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline and not self.stop.is_set():
                    try:
                        s.send(b'{"execute": "query-registers"}\n' * 32)
                    except BlockingIOError:
                        time.sleep(0.05)
        self._loop(body)

    def flapping(self):
        def body():
            s = self._connect()
            s.close()
        self._loop(body)


@pytest.fixture(scope="module")
def live(lab, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("introspection")
    control_path = workdir / "sockets" / "control.sock"
    trace = workdir / "trace.json"
    seen: dict = {}
    hostile = Hostile(control_path)

    def on_line(line: str) -> None:
        if line == "@@PHASE hostile":
            hostile.start()
        elif line == "@@PHASE inspect":
            hostile.finish()
            with ControlConnection(control_path) as c:
                seen["walk_blk"] = c.execute("walk", did=BLK, iova=0x8000_1000, access="write")
                seen["dc_blk"] = c.execute("query-device-context", did=BLK)
                seen["caches"] = c.execute("query-caches")
                seen["stats"] = c.execute("query-stats")
        elif line == "@@PHASE after-fault":
            with ControlConnection(control_path) as c:
                seen["walk_testdev"] = c.execute("walk", did=TESTDEV, iova=0x8000_1000,
                                                 access="write")
                seen["faults"] = c.execute("query-faults")
                seen["caches_after"] = c.execute("query-caches")
                seen["checker"] = c.execute("query-checker")

    run = boot_ours(lab, SCRIPT, timeout=240, echo=None, workdir=workdir,
                    topology=Topology(iommu_options=STRICTEST),
                    serve_args=["--trace", str(trace)], on_line=on_line)
    hostile.finish()
    return run, seen, trace, hostile


def explain(run) -> str:
    return (run.verdict.summary() + "\n--- console\n" + "\n".join(run.console[-30:])
            + "\n--- server log\n" + run.server_log[-3000:])


def test_the_guest_is_not_stalled_by_hostile_control_clients(live):
    run, seen, _, hostile = live
    assert not run.timed_out and run.verdict.passed, explain(run)
    assert not hostile.errors and hostile.rounds > 4
    assert "Traceback" not in run.server_log, explain(run)
    assert {"walk_blk", "walk_testdev"} <= set(seen), explain(run)


def test_walk_of_a_device_in_an_identity_domain(live):
    _, seen, _, _ = live
    walk = seen["walk_blk"]
    assert walk["result"]["address"] == 0x8000_1000 and walk["result"]["permissions"] == "rwx--"
    assert walk["steps"][-1]["structure"] == "device context"
    assert walk["steps"][-1]["decision"] == "valid"
    assert walk["steps"][-1]["fields"]["fsc"]["MODE"] == 0       # Bare: identity
    assert seen["dc_blk"]["valid"] and seen["dc_blk"]["cached"]["matches_memory"]


def test_walk_of_the_device_whose_context_the_driver_invalidated(live):
    _, seen, _, _ = live
    walk = seen["walk_testdev"]
    assert (walk["fault"]["cause"], walk["fault"]["name"]) == (258, "DDT entry not valid")
    assert walk["steps"][-1]["decision"] == "V=0"


def test_caches_hold_the_contexts_the_dma_filled(live):
    _, seen, _, _ = live
    dids = {e["did"] for e in seen["caches"]["ddt"]["entries"]}
    assert {BLK, RNG} <= dids
    assert seen["caches"]["mode"] == "max"
    endpoints = seen["stats"]["endpoints"]
    assert endpoints["virtio-blk@03.0"]["bytes_written"] >= 16 << 20
    assert endpoints["virtio-blk@03.0"]["bytes_read"] >= 16 << 20
    # negative=on: the testdev's invalid context is cached as such after its fault.
    negative = {e["did"] for e in seen["caches_after"]["negative"]["ddt"]["entries"]}
    assert TESTDEV in negative


def test_the_fault_is_in_query_faults_and_no_stale_use(live):
    _, seen, _, _ = live
    faults = [f for f in seen["faults"]["faults"] if f["cause"] == 258]
    assert faults and faults[-1]["device_id"] == TESTDEV and \
        faults[-1]["iotval"] == 0x8000_1000
    assert seen["checker"]["distinct"] == 0


def test_the_trace_holds_the_commands_and_faults_the_log_shows(live):
    run, _, trace, _ = live
    events = json.loads(trace.read_text())          # strict JSON: the server stopped
    log = run.server_log
    logged_commands = re.findall(r"cq\[\d+\] (\S+).*: done", log)
    traced_commands = [e["name"] for e in events if e["ph"] == "X"]
    assert traced_commands == logged_commands and traced_commands
    logged_faults = re.findall(r"fault cause=(\d+) ttyp=\d+ did=(0x[0-9a-f]+)", log)
    traced_faults = [(str(e["args"]["cause"]), hex(e["args"]["device_id"]))
                     for e in events if e["ph"] == "i" and e.get("cat") == "faults"]
    assert traced_faults == logged_faults and traced_faults
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert "virtio-blk@03.0 DMA MB/s" in counters
