"""`vfiouser-iommu inspect WHERE COMMAND ...`: the control socket from a shell.

WHERE is a `serve --socket-dir` folder or the control socket itself. Every command
prints a readable table, or the server's JSON reply with --json (for scripts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..control.client import ControlConnection, ControlError

HELP = """\
Ask a running `vfiouser-iommu serve` what its IOMMU is doing, through its control socket
(SOCKET_DIR/control.sock). Commands:

  registers                       every register, raw and decoded
  dc DID                          a device context, read live, with its DDT entries
  pc DID PID                      a process context, read live, with its PDT entries
  walk DID [PID] IOVA ACCESS [privileged]
                                  a translation without side effects, every step shown
                                  (ACCESS: read, write or execute)
  caches [--limit N]              the DDT/PDT caches, IOTLB, G-stage and MSI PTE caches
  faults [--count N]              the last fault records and the fault queue
  commands [--count N]            the last commands the command queue executed
  stats                           per endpoint DMA, translations, walks, faults; totals
  checker                         the invalidation checker's findings
  mode [check=on|off] [cache=spec|max|none] [negative=on|off]
                                  show (or switch) the introspection modes
  watch [--interval S]            live rates per endpoint (Ctrl-C stops)
  events [--count N]              print events (faults, commands, interrupts, stale uses)
  raw NAME [JSON]                 any control command, arguments as a JSON object

Numbers take any base Python reads (0x10, 16). Example:
  vfiouser-iommu inspect /tmp/vfu walk 0x10 0x80001000 write
"""

_ACCESS_WORDS = {"read", "write", "execute", "r", "w", "x"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="look inside a running server (control socket)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("where", metavar="SOCKET_DIR_OR_CONTROL_SOCKET")
    p.add_argument("command", metavar="COMMAND")
    p.add_argument("args", nargs="*", metavar="ARG")
    p.add_argument("--json", action="store_true", help="print the JSON reply")
    p.add_argument("--limit", type=int, help="caches: entries per cache (default 64)")
    p.add_argument("--count", type=int,
                   help="faults/commands: how many; watch/events: stop after this many")
    p.add_argument("--interval", type=float, default=1.0,
                   help="watch: seconds between refreshes (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for an answer (default: %(default)s)")
    p.set_defaults(func=cmd_inspect)


class UsageError(Exception):
    pass


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        with ControlConnection(args.where, timeout=args.timeout) as conn:
            return _run(conn, args)
    except UsageError as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    except (ControlError, TimeoutError, OSError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _run(conn: ControlConnection, args: argparse.Namespace) -> int:
    command = args.command
    if command == "watch":
        return watch(conn, args.interval, args.count, args.json)
    if command == "events":
        return events(conn, args.count, args.json)
    name, arguments, show = _request(command, args)
    reply = conn.execute(name, **arguments)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(show(reply))
    return 0


def _request(command: str, args) -> tuple[str, dict, object]:
    """(control command, its arguments, the printer of its reply)."""
    a = args.args
    simple = {"registers": ("query-registers", show_registers),
              "stats": ("query-stats", show_stats),
              "checker": ("query-checker", show_checker)}
    if command in simple:
        _want(a, 0, command)
        return simple[command][0], {}, simple[command][1]
    if command == "dc":
        _want(a, 1, "dc DID")
        return "query-device-context", {"did": a[0]}, show_device_context
    if command == "pc":
        _want(a, 2, "pc DID PID")
        return "query-process-context", {"did": a[0], "pid": a[1]}, show_process_context
    if command == "walk":
        return "walk", _walk_arguments(a), show_walk
    if command == "caches":
        return "query-caches", _maybe(limit=args.limit), show_caches
    if command == "faults":
        return "query-faults", _maybe(count=args.count), show_faults
    if command == "commands":
        return "query-commands", _maybe(count=args.count), show_commands
    if command == "mode":
        if not a:
            return "query-mode", {}, show_mode
        return "set-mode", _mode_arguments(a), show_mode
    if command == "raw":
        if not 1 <= len(a) <= 2:
            raise UsageError("raw NAME [JSON-ARGUMENTS]")
        try:
            arguments = json.loads(a[1]) if len(a) == 2 else {}
        except ValueError as e:
            raise UsageError(f"arguments are not JSON: {e}") from None
        return a[0], arguments, lambda reply: json.dumps(reply, indent=2)
    if command.startswith("query-") or command in ("set-mode",):
        return command, {}, lambda reply: json.dumps(reply, indent=2)
    raise UsageError(f"unknown command {command!r} (see --help)")


def _want(a: list, n: int, usage: str) -> None:
    if len(a) != n:
        raise UsageError(f"usage: {usage}")


def _maybe(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _walk_arguments(a: list[str]) -> dict:
    usage = "walk DID [PID] IOVA ACCESS [privileged]"
    privileged = bool(a) and a[-1] in ("privileged", "priv")
    if privileged:
        a = a[:-1]
    if len(a) == 3:
        did, iova, access = a
        pid = None
    elif len(a) == 4:
        did, pid, iova, access = a
    else:
        raise UsageError(usage)
    if access not in _ACCESS_WORDS:
        raise UsageError(f"{usage}: ACCESS is read, write or execute, not {access!r}")
    out = {"did": did, "iova": iova, "access": access, "privileged": privileged}
    if pid is not None:
        out["pid"] = pid
    return out


def _mode_arguments(a: list[str]) -> dict:
    out: dict = {}
    switch = {"on": True, "off": False}
    for item in a:
        key, _, value = item.partition("=")
        if key in ("check", "negative") and value in switch:
            out[key] = switch[value]
        elif key == "cache" and value:
            out[key] = value
        else:
            raise UsageError(f"mode: {item!r}: want check=on|off, cache=spec|max|none, "
                             "negative=on|off")
    return out


# -- tables ----------------------------------------------------------------------------------
def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    """Counts in decimal; addresses and raw values are passed in as `_hex` strings."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _hex(value) -> str:
    return "-" if value is None else f"{value:#x}"


def _fields(fields: dict) -> str:
    """Non-zero fields as NAME=value (hex above 9), nested ones as NAME[...]."""
    parts = []
    for k, v in fields.items():
        if isinstance(v, dict):
            parts.append(f"{k}[{_fields(v) or '0'}]")
        elif isinstance(v, bool) or not isinstance(v, int):
            if v:
                parts.append(f"{k}={v}")
        elif v:
            parts.append(f"{k}={v:#x}" if v > 9 else f"{k}={v}")
    return " ".join(parts)


def _size(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and not size & ((1 << shift) - 1):
            return f"{size >> shift} {unit}"
    return f"{size} B"


def show_registers(regs: list[dict]) -> str:
    rows = [[r["name"], _hex(r["offset"]), _hex(r["value"]), _fields(r.get("fields", {}))]
            for r in regs if r["value"] or not r["name"].startswith(("iohpm", "msi_"))]
    return table(rows, ["register", "offset", "value", "fields (non-zero)"]) + \
        "\n(zero HPM and MSI table registers not shown; --json has them all)"


def _steps(steps: list[dict]) -> str:
    rows = []
    for s in steps:
        raw = " ".join(f"{w:#x}" for w in (s["raw"] if isinstance(s["raw"], list)
                                             else [s["raw"]]))
        level = s["level"] if s["structure"].endswith(("PTE", "entry")) else None
        if s["structure"] == "MSI PTE":
            level = None
        where = f"{s['address']:#x}" + (f" (GPA {s['gpa']:#x})" if s.get("gpa") is not None
                                         else "")
        rows.append([s["structure"], level, where, raw, s["decision"], _fields(s["fields"])])
    return table(rows, ["structure", "level", "address", "raw", "decision", "fields"])


def show_walk(w: dict) -> str:
    r = w["request"]
    head = (f"walk: device {r['device_id']:#x}"
            + ("" if r["process_id"] is None else f" process {r['process_id']:#x}")
            + f" IOVA {r['iova']:#x} {r['access']}"
            + (" privileged" if r["privileged"] else ""))
    out = [head, _steps(w["steps"])]
    if "result" in w:
        res = w["result"]
        out.append(f"result: {res['address']:#x} ({_size(res['page_size'])} page, "
                   f"{res['permissions']})" + (f", GPA {res['gpa']:#x}" if res["gpa"] else "")
                   + (" [MSI]" if res["msi"] else ""))
        for update in w.get("would_set_ad", []):
            out.append(f"(a real walk would set A/D at {update['address']:#x}: "
                       f"{update['old']:#x} -> {update['new']:#x})")
    else:
        f = w["fault"]
        out.append(f"fault: cause {f['cause']} ({f['name']}): {f['check']}")
    if "iotlb" in w:
        i = w["iotlb"]
        out.append("IOTLB: no entry" if not i["cached"] else
                   f"IOTLB: cached {i['iova']:#x} ({_size(i['size'])}) -> {i['spa']:#x} "
                   f"({'matches' if i['matches_memory'] else 'DIFFERS FROM'} memory)")
    return "\n".join(out)


def show_device_context(d: dict) -> str:
    out = [f"device {d['did']:#x}: " + (f"device context at {d['address']:#x}"
                                        if "address" in d else "no device context")]
    out.append(_steps(d["steps"]))
    if "fault" in d:
        out.append(f"fault: cause {d['fault']['cause']} ({d['fault']['name']})")
    if "device_context" in d:
        for name, value in d["device_context"].items():
            out.append(f"  {name}: "
                       f"{(_fields(value) or '0') if isinstance(value, dict) else _hex(value)}")
    if "cached" in d:
        out.append(f"cached: {'matches memory' if d['cached']['matches_memory'] else 'DIFFERS'}"
                   + (" (negative entry)" if d["cached"].get("negative") else ""))
    return "\n".join(out)


def show_process_context(p: dict) -> str:
    out = [f"device {p['did']:#x} process {p['pid']:#x}", _steps(p["steps"])]
    if "process_context" in p:
        for name, value in p["process_context"].items():
            out.append(f"  {name}: {_fields(value) or '0'}")
    if "fault" in p:
        out.append(f"fault: cause {p['fault']['cause']} ({p['fault']['name']}): "
                   f"{p['fault']['check']}")
    return "\n".join(out)


def show_caches(c: dict) -> str:
    out = [f"cache mode {c['mode']}; limits " +
           ", ".join(f"{k} {v}" for k, v in c["limits"].items())]
    out.append("hits " + _fields(c["stats"]["hits"]) + "; misses " +
               _fields(c["stats"]["misses"]))
    sections = [("device contexts", c["ddt"], ["did", "tc", "iohgatp", "ta", "fsc", "pscid"]),
                ("process contexts", c["pdt"], ["did", "pid", "ta", "fsc", "pscid"]),
                ("IOTLB", c["iotlb"], ["gscid", "pscid", "iova", "size", "spa", "gpa",
                                       "permissions", "global"]),
                ("G-stage", c["gtlb"], ["gscid", "iova", "size", "spa", "permissions"]),
                ("MSI PTEs", c["msi"], ["gscid", "msipt", "index", "file_gpa", "dw0"])]
    for name, negative_key in (("negative DCs", "ddt"), ("negative PCs", "pdt"),
                               ("negative IOTLB", "iotlb"), ("negative G-stage", "gtlb"),
                               ("negative MSI PTEs", "msi")):
        if "negative" in c:
            section = c["negative"][negative_key]
            columns = {"ddt": ["did"], "pdt": ["did", "pid"],
                       "iotlb": ["gscid", "pscid", "iova", "size"],
                       "gtlb": ["gscid", "iova", "size"],
                       "msi": ["gscid", "msipt", "index", "file_gpa"]}[negative_key]
            sections.append((name, section, columns))
    for name, section, columns in sections:
        out.append(f"\n{name}: {section['count']} entr{'y' if section['count'] == 1 else 'ies'}")
        if section["entries"]:
            out.append(table([[_entry_cell(k, e.get(k)) for k in columns]
                              for e in section["entries"]], columns))
    return "\n".join(out)


def _entry_cell(column: str, value) -> str:
    if column == "size":
        return _size(value)
    if isinstance(value, int) and not isinstance(value, bool) and column not in ("index",):
        return _hex(value)
    return _cell(value)


def show_faults(f: dict) -> str:
    q = f["queue"]
    out = [f"fault queue at {q['base']:#x}: {q['entries']} entries, head {q['head']}, tail "
           f"{q['tail']}; fqcsr {_fields(q['csr_fields']) or '0'}; {f['total']} fault(s)"]
    rows = [[time.strftime("%H:%M:%S", time.localtime(x["time"])), x["cause"], x["name"],
             x["ttyp"], _hex(x["device_id"]), _hex(x["process_id"]), _hex(x["iotval"]),
             _hex(x["iotval2"])] for x in f["faults"]]
    out.append(table(rows, ["time", "cause", "name", "ttyp", "did", "pid", "iotval",
                            "iotval2"]))
    return "\n".join(out)


def show_commands(c: dict) -> str:
    q = c["queue"]
    out = [f"command queue at {q['base']:#x}: {q['entries']} entries, head {q['head']}, "
           f"tail {q['tail']}; cqcsr {_fields(q['csr_fields']) or '0'}"]
    rows = [[time.strftime("%H:%M:%S", time.localtime(x["time"])), x["index"], x["command"],
             x["outcome"], x["removed"], x["duration_us"]] for x in c["commands"]]
    out.append(table(rows, ["time", "cq", "command", "outcome", "removed", "us"]))
    return "\n".join(out)


def show_stats(s: dict) -> str:
    out = [f"uptime {s['uptime']:.1f} s"]
    rows = []
    for name, e in s.get("endpoints", {}).items():
        rows.append([name, _hex(e["device_id"]), e.get("reads", 0), e.get("writes", 0),
                     e.get("bytes_read", 0) + e.get("bytes_written", 0),
                     e.get("translations", 0), e.get("iotlb_miss", 0), e.get("ddt_walk", 0),
                     e.get("faults", 0), _ratio(e.get("hit_ratio"))])
    if rows:
        out.append(table(rows, ["endpoint", "did", "reads", "writes", "bytes", "translations",
                                "iotlb miss", "dc walks", "faults", "hit ratio"]))
    if s.get("commands"):
        out.append("\ncommands: " + ", ".join(
            f"{k} {v.get('count', 0)}" + (
                f" (removed {v['removed']} entries; {v['removed_nothing']} removed nothing)"
                if "removed" in v else "") for k, v in s["commands"].items()))
    if s.get("faults"):
        out.append("faults: " + ", ".join(f"{k} {v['name']} x{v['count']}"
                                          for k, v in s["faults"].items()))
    if s.get("interrupts"):
        out.append("interrupts: " + ", ".join(f"vector {k} x{v}"
                                              for k, v in s["interrupts"].items()))
    if "stale_uses" in s:
        out.append(f"stale uses: {s['stale_uses']}")
    return "\n".join(out)


def _ratio(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def show_checker(c: dict) -> str:
    if not c.get("check"):
        return "the invalidation checker is off (inspect WHERE mode check=on)"
    out = [f"{c['distinct']} distinct stale use(s), {c['uses']} use(s) in all"]
    for s in c["stale_uses"]:
        out.append(f"[{s['count']}x] {s['message']}")
    if c["invalidations"]:
        out.append("invalidations that removed nothing: " + ", ".join(
            f"{k} {c['removed_nothing'].get(k, 0)} of {n}"
            for k, n in sorted(c["invalidations"].items())))
    return "\n".join(out)


def show_mode(m: dict) -> str:
    return (f"check={'on' if m['check'] else 'off'} cache={m['cache']} "
            f"negative={'on' if m['negative'] else 'off'}")


# -- live views ------------------------------------------------------------------------------
def watch(conn: ControlConnection, interval: float, count: int | None, as_json: bool) -> int:
    """Refresh per-endpoint rates every `interval` seconds."""
    previous = conn.execute("query-stats")
    shown = 0
    tty = sys.stdout.isatty() and not as_json
    while count is None or shown < count:
        time.sleep(interval)
        now = conn.execute("query-stats")
        rates = stats_rates(previous, now)
        if as_json:
            print(json.dumps(rates), flush=True)
        else:
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(show_rates(rates), flush=True)
        previous = now
        shown += 1
    return 0


def stats_rates(before: dict, after: dict) -> dict:
    """Per-second rates between two `query-stats` replies."""
    dt = max(after["time"] - before["time"], 1e-6)
    endpoints = {}
    for name, e in after.get("endpoints", {}).items():
        b = before.get("endpoints", {}).get(name, {})

        def delta(key, e=e, b=b):
            return e.get(key, 0) - b.get(key, 0)

        translations = delta("translations")
        walks = delta("iotlb_miss") + delta("ddt_walk") + delta("pdt_walk")
        endpoints[name] = {
            "dma_mb_s": (delta("bytes_read") + delta("bytes_written")) / dt / 1e6,
            "requests_s": (delta("reads") + delta("writes")) / dt,
            "translations_s": translations / dt,
            "faults_s": delta("faults") / dt,
            "hit_ratio": None if not translations else max(0.0, 1 - walks / translations)}

    def total(section):
        return sum(v.get("count", 0) for v in after.get(section, {}).values()) - \
            sum(v.get("count", 0) for v in before.get(section, {}).values())

    return {"interval": dt, "endpoints": endpoints, "commands_s": total("commands") / dt,
            "faults_s": total("faults") / dt,
            "stale_uses": after.get("stale_uses", 0)}


def show_rates(r: dict) -> str:
    rows = [[name, f"{e['dma_mb_s']:.2f}", f"{e['requests_s']:.0f}",
             f"{e['translations_s']:.0f}", f"{e['faults_s']:.1f}", _ratio(e["hit_ratio"])]
            for name, e in r["endpoints"].items()]
    head = (f"vfiouser-iommu, every {r['interval']:.1f} s: {r['commands_s']:.1f} commands/s, "
            f"{r['faults_s']:.1f} faults/s, {r['stale_uses']} stale use(s)")
    return head + "\n" + table(rows, ["endpoint", "DMA MB/s", "requests/s", "translations/s",
                                      "faults/s", "no-walk ratio"])


def events(conn: ControlConnection, count: int | None, as_json: bool) -> int:
    conn.execute("qmp_capabilities", enable=["events"])
    shown = 0
    while count is None or shown < count:
        for event in conn.events(3600):
            if as_json:
                print(json.dumps(event), flush=True)
            else:
                print(f"{event['event']}: {_event_text(event)}", flush=True)
            shown += 1
            if count is not None and shown >= count:
                break
    return 0


def _event_text(event: dict) -> str:
    d = event["data"]
    kind = event["event"]
    if kind == "FAULT":
        return (f"cause {d['cause']} ({d['name']}) did {d['device_id']:#x} "
                f"iotval {d['iotval']:#x} iotval2 {d['iotval2']:#x}")
    if kind == "COMMAND":
        return f"cq[{d['index']}] {d['command']}: {d['outcome']}" + (
            "" if d["removed"] is None else f" (removed {d['removed']})")
    if kind == "STALE_USE":
        return d["message"]
    return json.dumps(d)
