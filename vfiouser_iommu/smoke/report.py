"""Results of a smoke run and the three ways they are shown: a terminal summary, KTAP,
and JUnit XML.

KTAP is the kernel's own test output format (Documentation/dev-tools/ktap.rst, as
kselftest and KUnit print it): a version line, a plan `1..N`, one `ok`/`not ok` line
per test, `#` diagnostic lines, and subtests indented by four spaces before the result
line that sums them up. A smoke run is one top-level test per suite (a guest boot) with
one subtest per check; each check's time and, on failure, the console and server-log
lines that explain it go into diagnostic lines. `parse_ktap` reads the format back and
enforces its grammar, so tests (and users) can check a file.

JUnit XML is written with `junitparser`: one <testsuite> per suite, one <testcase> per
check with its time, a <failure> whose text holds the evidence, and <system-out> with
the check's detail. GitLab, GitHub and Jenkins all read this shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

KTAP_VERSION = "KTAP version 1"
_RESULT = re.compile(r"^(ok|not ok) (\d+)(?: -)?(?: ([^#]*?))?\s*(?:# (.*))?$")
_PLAN = re.compile(r"^1\.\.(\d+)$")
_VERSION = re.compile(r"^(KTAP version 1|TAP version 1[34])$")
_INDENT = "    "


@dataclass
class Check:
    """One check of a smoke run."""

    name: str
    passed: bool
    seconds: float = 0.0
    detail: str = ""
    evidence: list[str] = field(default_factory=list)  # console/server-log lines on failure
    skipped: str | None = None                         # why, when the check did not run

    @property
    def status(self) -> str:
        return "skip" if self.skipped is not None else "pass" if self.passed else "fail"


@dataclass
class Suite:
    """The checks of one guest boot (or host-side step)."""

    name: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # diagnostics for the whole suite

    @property
    def passed(self) -> bool:
        return all(c.passed or c.skipped is not None for c in self.checks)

    @property
    def skipped(self) -> bool:
        return bool(self.checks) and all(c.skipped is not None for c in self.checks)


def _clean(text: str) -> str:
    """A KTAP description: one line, no '#' (it starts a directive)."""
    return " ".join(text.replace("#", "").split())


def _diagnostics(lines: list[str], indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in lines]


def _check_lines(number: int, check: Check) -> list[str]:
    directive = f" # SKIP {_clean(check.skipped)}" if check.skipped is not None else ""
    word = "ok" if check.passed or check.skipped is not None else "not ok"
    out = [f"{_INDENT}{word} {number} {_clean(check.name)}{directive}",
           f"{_INDENT}# {check.name}: {check.status} in {check.seconds:.3f}s"
           + (f": {_clean(check.detail)[:300]}" if check.detail else "")]
    if not check.passed and check.skipped is None:
        out += _diagnostics(check.evidence, _INDENT)
    return out


def ktap(suites: list[Suite], header: list[str] | None = None) -> str:
    """The run as KTAP: one top-level test per suite, one subtest per check."""
    lines = [KTAP_VERSION, f"1..{len(suites)}", *_diagnostics(header or [], "")]
    for number, suite in enumerate(suites, start=1):
        lines += [f"{_INDENT}{KTAP_VERSION}", f"{_INDENT}# Subtest: {_clean(suite.name)}",
                  f"{_INDENT}1..{len(suite.checks)}", *_diagnostics(suite.notes, _INDENT)]
        for k, check in enumerate(suite.checks, start=1):
            lines += _check_lines(k, check)
        counts = {s: sum(c.status == s for c in suite.checks) for s in ("pass", "fail", "skip")}
        lines.append(f"# {suite.name}: pass:{counts['pass']} fail:{counts['fail']} "
                     f"skip:{counts['skip']} total:{len(suite.checks)} "
                     f"time:{suite.seconds:.1f}s")
        directive = " # SKIP all checks skipped" if suite.skipped else ""
        word = "ok" if suite.passed else "not ok"
        lines.append(f"{word} {number} {_clean(suite.name)}{directive}")
    return "\n".join(lines) + "\n"


def write_junit(suites: list[Suite], path: Path, name: str = "vfiouser-iommu smoke") -> None:
    """The run as JUnit XML at `path`."""
    from junitparser import Failure, JUnitXml, Skipped, TestCase, TestSuite

    xml = JUnitXml(name)
    for suite in suites:
        ts = TestSuite(suite.name)
        ts.time = round(suite.seconds, 3)
        for check in suite.checks:
            case = TestCase(check.name, f"smoke.{suite.name}", round(check.seconds, 3))
            if check.skipped is not None:
                case.result = [Skipped(check.skipped)]
            elif not check.passed:
                failure = Failure(check.detail[:500] or "failed", "check failed")
                failure.text = "\n".join(check.evidence)
                case.result = [failure]
            if check.detail:
                case.system_out = check.detail
            ts.add_testcase(case)
        ts.update_statistics()
        xml.add_testsuite(ts)
    xml.update_statistics()
    xml.write(str(path), pretty=True)


# -- reading KTAP back ------------------------------------------------------------------------

@dataclass
class KtapTest:
    number: int
    name: str
    ok: bool
    directive: str | None
    subtests: list[KtapTest] = field(default_factory=list)


class KtapError(ValueError):
    pass


def parse_ktap(text: str) -> list[KtapTest]:
    """Parse and validate KTAP (version line, plan, numbered results, indented
    subtests); return the top-level tests. KtapError names the first offending line."""
    lines = [line for line in text.splitlines() if line.strip()]
    tests, end = _parse_block(lines, 0, "")
    if end != len(lines):
        raise KtapError(f"line {end + 1}: unexpected {lines[end]!r}")
    return tests


def _parse_block(lines: list[str], pos: int, indent: str) -> tuple[list[KtapTest], int]:
    def body(i: int) -> str:
        return lines[i][len(indent):]

    if pos >= len(lines) or not lines[pos].startswith(indent) or \
            not _VERSION.match(body(pos)):
        raise KtapError(f"line {pos + 1}: want a KTAP version line")
    pos += 1
    while pos < len(lines) and body(pos).startswith("#"):
        pos += 1
    if pos >= len(lines) or not _PLAN.match(body(pos)):
        raise KtapError(f"line {pos + 1}: want a plan line 1..N")
    planned = int(_PLAN.match(body(pos)).group(1))
    pos += 1
    tests: list[KtapTest] = []
    pending: list[KtapTest] = []
    while pos < len(lines) and lines[pos].startswith(indent):
        text = body(pos)
        if text.startswith(_INDENT):
            pending, pos = _parse_block(lines, pos, indent + _INDENT)
            continue
        if text.startswith("#"):
            pos += 1
            continue
        m = _RESULT.match(text)
        if m is None:
            if _VERSION.match(text) and len(tests) == planned:
                break
            raise KtapError(f"line {pos + 1}: not a KTAP line: {lines[pos]!r}")
        number = int(m.group(2))
        if number != len(tests) + 1:
            raise KtapError(f"line {pos + 1}: test {number}, want {len(tests) + 1}")
        directive = m.group(4)
        test = KtapTest(number, (m.group(3) or "").strip(), m.group(1) == "ok", directive,
                        pending)
        if pending and test.ok and any(not t.ok for t in pending):
            raise KtapError(f"line {pos + 1}: {test.name!r} ok but a subtest failed")
        tests.append(test)
        pending = []
        pos += 1
    if len(tests) != planned:
        raise KtapError(f"plan 1..{planned} but {len(tests)} results")
    return tests, pos
