"""The control socket: QMP-style JSON lines served from the vfio-user loop.

The server runs in a thread with an IOMMU function whose guest RAM and tables the test
writes before it starts; control clients talk to it over the real socket. Hostile
clients (garbage, broken JSON, huge lines, clients that never read, disconnects) must
neither crash the server nor stall the vfio-user functions.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
from control_stack import DATA, DID, IOVA, PSCID, Stack, raw_client, read_line
from iommu_tables import LEAF_RW  # on the path through control_stack

from vfiouser_iommu.control.client import ControlError
from vfiouser_iommu.control.server import MAX_CLIENTS, MAX_LINE, OUTPUT_LIMIT
from vfiouser_iommu.endpoints import testdev
from vfiouser_iommu.iommu.regs_layouts import CMD_IOFENCE, CMD_IOTINVAL


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.stop()


# -- protocol ----------------------------------------------------------------------------------
def test_greeting_and_the_socket_is_private(stack):
    assert stat.S_IMODE(os.stat(stack.path).st_mode) == 0o600
    with stack.connect() as c:
        assert c.greeting["QMP"]["capabilities"] == ["events"]
        version = c.execute("query-version")
        assert version["iommu"] and version["endpoints"] == ["iommu-testdev@02.0"]
        names = {e["name"] for e in c.execute("query-control-commands")}
        assert {"walk", "query-registers", "query-caches", "set-mode", "qmp_capabilities",
                "query-device-context", "query-process-context", "query-faults",
                "query-commands", "query-stats"} <= names


def test_errors_are_qmp_errors_and_ids_come_back(stack):
    sock = raw_client(stack.path)
    read_line(sock)
    cases = [
        (b'{"execute": "no-such", "id": 7}\n', "CommandNotFound", 7),
        (b'this is not json\n', "GenericError", None),
        (b'[1, 2]\n', "GenericError", None),
        (b'{"execute": 3}\n', "GenericError", None),
        (b'{"execute": "walk", "arguments": []}\n', "GenericError", None),
        (b'{"execute": "walk", "arguments": {"bogus": 1}, "id": "x"}\n', "GenericError", "x"),
        (b'{"execute": "walk", "arguments": {"did": "zz", "iova": 0}}\n', "GenericError", None),
        (b'{"execute": "walk", "arguments": {"did": 16, "iova": -1}}\n', "GenericError", None),
        (b'\xff\xfe garbage \x00\n', "GenericError", None),
        (b'[' * 60000 + b'\n', "GenericError", None),         # too deep for the parser
    ]
    for line, error_class, request_id in cases:
        sock.sendall(line)
        reply = read_line(sock)
        assert reply["error"]["class"] == error_class, (line[:40], reply)
        assert reply.get("id") == request_id
        assert "longer than" not in reply["error"]["desc"]
    sock.sendall(b'{"execute": "query-mode", "id": {"any": ["json"]}}\n')
    assert read_line(sock) == {"return": {"check": False, "cache": "spec", "negative": False,
                                          "trace_translations": False},
                               "id": {"any": ["json"]}}
    sock.close()


def test_a_line_too_long_is_refused_and_the_connection_goes_on(stack):
    sock = raw_client(stack.path)
    read_line(sock)
    sock.sendall(b'{"execute": "query-mode", "x": "' + b"a" * (MAX_LINE + 10))
    assert "longer than" in read_line(sock)["error"]["desc"]
    sock.sendall(b"a" * (3 * MAX_LINE) + b'"}\n')          # the rest of it is skipped
    sock.sendall(b'{"execute": "query-mode"}\n')
    assert read_line(sock)["return"]["cache"] == "spec"
    sock.close()


# -- commands -------------------------------------------------------------------------------
def test_walk_of_a_mapped_and_an_unmapped_iova(stack):
    with stack.connect() as c:
        mapped = c.execute("walk", did=DID, iova=IOVA + 0x123, access="write")
        assert mapped["result"]["address"] == DATA + 0x123
        structures = [s["structure"] for s in mapped["steps"]]
        assert structures == ["DDT entry", "DDT entry", "device context", "first-stage PTE",
                              "first-stage PTE", "first-stage PTE"]
        leaf = mapped["steps"][-1]
        assert (leaf["address"], leaf["raw"], leaf["decision"]) == \
            (stack.leaf, (DATA >> 12) << 10 | LEAF_RW, "leaf")
        assert leaf["fields"]["W"] == 1 and leaf["fields"]["address"] == DATA
        unmapped = c.execute("walk", did=hex(DID), iova=hex(IOVA + 0x1000), access="read")
        assert unmapped["fault"]["cause"] == 13
        assert unmapped["fault"]["name"] == "Read page fault"
        assert unmapped["steps"][-1]["decision"] == "V=0"
        assert len(unmapped["explain"]) == 2
        nodc = c.execute("walk", did=DID + 1, iova=0, access="read")
        assert (nodc["fault"]["cause"], nodc["fault"]["name"]) == (258, "DDT entry not valid")
    # The walk had no side effect: nothing cached, no fault record.
    iommu = stack.function.iommu
    assert len(iommu.caches.iotlb) == 0 and not iommu.caches.ddt
    assert not stack.function.observer.recent_faults


def test_query_caches_shows_the_iotlb_entry_a_dma_made(stack):
    assert stack.translate(IOVA).address == DATA
    with stack.connect() as c:
        caches = c.execute("query-caches")
        [entry] = caches["iotlb"]["entries"]
        assert (entry["iova"], entry["spa"], entry["size"], entry["pscid"]) == \
            (IOVA, DATA, 4096, PSCID)
        assert caches["ddt"]["entries"][0]["did"] == DID
        walked = c.execute("walk", did=DID, iova=IOVA, access="read")
        assert walked["iotlb"] == dict(walked["iotlb"], cached=True, matches_memory=True)


def test_device_and_process_contexts(stack):
    with stack.connect() as c:
        dc = c.execute("query-device-context", did=DID)
        assert dc["valid"] and dc["device_context"]["ta"]["PSCID"] == PSCID
        assert dc["device_context"]["fsc"]["PPN"] == stack.pt >> 12
        assert [s["structure"] for s in dc["steps"]] == ["DDT entry", "DDT entry",
                                                         "device context"]
        assert dc["address"] == dc["steps"][-1]["address"]
        missing = c.execute("query-device-context", did=DID + 1)
        assert not missing["valid"] and missing["fault"]["cause"] == 258
        with pytest.raises(ControlError, match="PDTV=0"):
            c.execute("query-process-context", did=DID, pid=1)


def test_registers_raw_and_decoded(stack):
    with stack.connect() as c:
        registers = {r["name"]: r for r in c.execute("query-registers")}
    assert registers["ddtp"]["fields"]["iommu_mode"] == 4
    assert registers["capabilities"]["fields"]["Sv39"] == 1
    assert registers["cqcsr"]["fields"]["cqen"] == 1 and registers["cqcsr"]["fields"]["cqon"] == 1


def test_stats_faults_and_commands(stack):
    view = stack.function.iommu.dma_view(DID)
    stack.on_loop(lambda: view.write(IOVA, b"x" * 100))
    stack.translate(IOVA + 0x1000)                   # a fault (cause 13)
    with stack.connect() as c:
        stats = c.execute("query-stats")
        endpoint = stats["endpoints"]["iommu-testdev@02.0"]
        assert (endpoint["writes"], endpoint["bytes_written"], endpoint["translations"]) == \
            (1, 100, 1)
        assert endpoint["faults"] == 1 and endpoint["iotlb_miss"] >= 1
        assert stats["faults"] == {"13": {"name": "Read page fault", "count": 1}}
        faults = c.execute("query-faults")
        assert faults["faults"][0]["cause"] == 13 and faults["faults"][0]["iotval"] == \
            IOVA + 0x1000
        assert faults["queue"]["csr_fields"]["fqon"] == 1 and faults["queue"]["tail"] == 1
        assert c.execute("query-commands")["commands"] == []
    stack.submit(CMD_IOTINVAL.encode(opcode=1, func3=0),          # removes the IOTLB entry
                 CMD_IOTINVAL.encode(opcode=1, func3=0),          # removes nothing
                 CMD_IOFENCE.encode(opcode=2, func3=0, PR=1, PW=1))
    with stack.connect() as c:
        stats = c.execute("query-stats")["commands"]
        assert stats["IOTINVAL.VMA"] == {"count": 2, "removed": 1, "removed_nothing": 1}
        assert stats["IOFENCE.C"] == {"count": 1}
        commands = c.execute("query-commands")["commands"]
        assert [(x["name"], x["removed"], x["outcome"]) for x in commands] == [
            ("IOTINVAL.VMA", 1, "done"), ("IOTINVAL.VMA", 0, "done"), ("IOFENCE.C", None, "done")]


def test_set_mode_and_the_checker_with_events(stack):
    with stack.connect() as c, stack.connect() as quiet:
        assert c.execute("set-mode", check=True, cache="max") == {
            "check": True, "cache": "max", "negative": False, "trace_translations": False}
        with pytest.raises(ControlError, match="cache"):
            c.execute("set-mode", cache="most")
        assert stack.function.iommu.needs_reference_path
        c.execute("qmp_capabilities", enable=["events"])
        stack.translate(IOVA)
        stack.builder.write_pte(stack.leaf, ((DATA + 0x1000) >> 12) << 10 | LEAF_RW, 8)
        stack.translate(IOVA)                          # stale use
        stack.translate(IOVA + 0x3000)                 # a fault
        events = {e["event"]: e for e in c.events(5)}
        deadline = time.monotonic() + 5
        while not {"STALE_USE", "FAULT"} <= set(events) and time.monotonic() < deadline:
            events.update({e["event"]: e for e in c.events(1)})
        stale = events["STALE_USE"]["data"]
        assert stale["structure"] == "first-stage PTE" and stale["required"].startswith(
            "IOTINVAL.VMA GV=0 PSCV=1 PSCID=0x7 AV=1")
        assert events["FAULT"]["data"]["cause"] == 13
        checker = c.execute("query-checker")
        assert checker["distinct"] == 1 and checker["stale_uses"][0]["count"] == 1
        assert quiet.events(0.2) == []                 # asked for none


def test_subscribe_to_some_events_only(stack):
    with stack.connect() as c:
        assert c.execute("subscribe", events=["STALE_USE"]) == {"events": ["STALE_USE"]}
        stack.translate(IOVA + 0x3000)                 # a fault: not subscribed
        assert c.events(0.3) == []
        c.execute("unsubscribe")


# -- hostile and broken clients --------------------------------------------------------------
def test_clients_that_never_read_cost_bounded_memory_and_stall_nothing(stack):
    hogs = []
    for _ in range(3):
        sock = raw_client(stack.path)
        sock.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["events"]}}\n')
        # Then a flood of requests, never reading a reply.
        sock.setblocking(False)
        try:
            for _ in range(2000):
                sock.send(b'{"execute": "query-registers"}\n' * 20)
        except BlockingIOError:
            pass
        hogs.append(sock)
    for _ in range(300):                               # events for the hogs to not read
        stack.translate(IOVA + 0x3000)
    client = stack.served.connect("dev")
    client.negotiate()
    started = time.monotonic()
    for _ in range(20):
        assert client.readl(0, testdev.DMA_RESULT) == testdev.RESULT_IDLE
    assert time.monotonic() - started < 30
    with stack.connect() as c:
        assert c.execute("query-mode")["cache"] == "spec"
    hog_state = stack.on_loop(lambda: [(len(cl.outbuf), cl.dropped)
                                       for cl in stack.control.clients.values()
                                       if cl.sock.fileno() != -1 and cl.events is not None])
    assert len(hog_state) == 3
    for buffered, dropped in hog_state:
        # Each hog's replies filled its buffer to the limit, no further; events dropped.
        assert OUTPUT_LIMIT <= buffered < OUTPUT_LIMIT + (256 << 10) and dropped > 0
    for sock in hogs:
        sock.close()
    client.close()


def test_disconnects_mid_line_and_too_many_clients(stack):
    for _ in range(20):
        sock = raw_client(stack.path)
        sock.sendall(b'{"execute": "query-re')
        sock.close()
    conns = [stack.connect() for _ in range(MAX_CLIENTS)]
    extra = raw_client(stack.path)
    assert "too many clients" in read_line(extra)["error"]["desc"]
    extra.close()
    for conn in conns:
        conn.close()
    deadline = time.monotonic() + 5
    while stack.on_loop(lambda: len(stack.control.clients)) and time.monotonic() < deadline:
        time.sleep(0.05)
    with stack.connect() as c:
        assert c.execute("query-mode")["check"] is False


def test_closing_removes_the_socket(tmp_path):
    s = Stack(tmp_path)
    s.stop()
    assert not (tmp_path / "control.sock").exists()
