"""The conformance report: per rule and per test, what ran, what failed and why, what was skipped.

The pytest plugin (:mod:`.plugin`) attaches to every test report, as ``user_properties`` (so that
they travel from ``pytest -n`` workers): the rules the test names, the examples it ran and, for a
failure, the broken rule, the observed vs allowed error, the reproducer and Hypothesis's falsifying
example. :class:`Collector` gathers them and writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import attribution
from .hostcounts import host_counts, host_line
from .protocol import MARKER, CapabilityMissing, ConformanceFailure
from .rules import rules_of, spec_rules

# Examples run per test node id, counted by oracle.run_check (per process; workers report their own).
EXAMPLES: collections.Counter = collections.Counter()
# Examples per test node id and host family ("llava", "qwen2.5-vl"), for the drawn cases
HOST_EXAMPLES: collections.defaultdict = collections.defaultdict(collections.Counter)
_CURRENT: dict[str, str | None] = {"nodeid": None}


def set_current(nodeid: str | None) -> None:
    _CURRENT["nodeid"] = nodeid


def count_example(host: str | None = None) -> None:
    """One example of the current test; ``host``: the family of its case's host (None: no drawn host)."""
    EXAMPLES[_CURRENT["nodeid"]] += 1
    if host is not None:
        HOST_EXAMPLES[_CURRENT["nodeid"]][host] += 1


try:
    _GROUP: type = BaseExceptionGroup  # Python 3.11+
except NameError:  # pragma: no cover - Python 3.10: Hypothesis's backport
    from exceptiongroup import BaseExceptionGroup as _GROUP


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside a (nested) exception group, in order; the error itself if it is not a group."""
    if isinstance(error, _GROUP):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def failure_details(error: BaseException, text: str = "") -> dict[str, Any]:
    """Structured facts of a failure, from the exception object (in-process) or its text.

    An ``ExceptionGroup`` (Hypothesis found several distinct failures) is unpacked: ``failures`` lists
    each one with its rule, and the group's own fields are those of its most upstream failure
    (:func:`.attribution.first`); the others are listed as that test's ``symptoms``.
    """
    leaves = _leaves(error)
    if len(leaves) > 1 or leaves[0] is not error:
        parts = [_one_failure(leaf) for leaf in leaves]
        primary = attribution.first(parts) or parts[0]
        details = {**primary, "group": type(error).__name__, "failures": parts}
        details["symptoms"] = [p["rule"] for p in parts if p is not primary and p.get("rule")]
        return details
    return _one_failure(error)


def _one_failure(error: BaseException) -> dict[str, Any]:
    details: dict[str, Any] = {"type": type(error).__name__}
    if isinstance(error, ConformanceFailure):
        details.update(rule=error.rule, observed=error.observed, allowed=error.allowed)
    elif isinstance(error, CapabilityMissing):
        details.update(capability=error.capability)
    message = str(error).split(MARKER)[0].strip()
    details["message"] = message
    details["evidence"] = attribution.evidence(message)
    notes = "\n".join(getattr(error, "__notes__", []) or [])
    match = re.search(r"Reproduce with:\n((?:    .*\n?)+)", notes)
    if match:
        details["reproducer"] = "\n".join(line[4:] for line in match.group(1).rstrip().splitlines())
    falsifying = [n for n in getattr(error, "__notes__", []) or [] if not n.startswith("Reproduce with:")]
    if falsifying:
        details["falsifying_example"] = "\n".join(falsifying)
    return details


def parse_marker(text: str) -> dict[str, Any]:
    """The machine-readable line of a ConformanceFailure inside a report's text (last one wins)."""
    found = {}
    for line in text.splitlines():
        line = line.strip().lstrip("E").strip()
        if line.startswith(MARKER):
            with contextlib.suppress(json.JSONDecodeError):
                found = json.loads(line[len(MARKER) :])
    return found


@dataclass
class TestResult:
    __test__ = False  # not a pytest test class

    nodeid: str
    rules: list[str]
    outcome: str  # passed | failed | skipped | error
    examples: int = 0
    hosts: dict[str, int] = field(default_factory=dict)  # examples per host family
    duration_s: float = 0.0
    failure: dict[str, Any] | None = None
    skip_reason: str | None = None


TIME_BUDGET_SKIP = "time budget"  # how the plugin's skip reasons start once --time-budget is spent


@dataclass(eq=False)  # a pytest plugin object must be hashable
class Collector:
    """A pytest plugin object collecting :class:`TestResult` s; writes the report at session end.

    The report is written however the session ends: all tests run, ``-x``/``--maxfail`` stopped it, the
    time budget ran out, or Ctrl-C (pytest runs ``pytest_sessionfinish`` on ``KeyboardInterrupt``). The
    tests collected but never reported are listed as not run, and the report says why it is incomplete.
    """

    out_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    results: dict[str, TestResult] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    collected: dict[str, list[str]] = field(default_factory=dict)  # nodeid -> rules, when collected here

    def pytest_collection_finish(self, session) -> None:
        for item in session.items:
            function = getattr(item, "function", None)
            self.collected[item.nodeid] = list(rules_of(function)) if function is not None else []

    def pytest_runtest_logreport(self, report) -> None:
        props = dict(report.user_properties)
        result = self.results.get(report.nodeid)
        if result is None:
            result = self.results[report.nodeid] = TestResult(
                report.nodeid, list(props.get("rules", [])), "passed"
            )
        result.rules = list(props.get("rules", result.rules))
        result.examples = max(result.examples, int(props.get("examples", 0)))
        for host, count in dict(props.get("hosts") or {}).items():
            result.hosts[host] = max(result.hosts.get(host, 0), int(count))
        result.duration_s += float(getattr(report, "duration", 0.0))
        if report.skipped:
            result.outcome = "skipped"
            longrepr = report.longrepr
            result.skip_reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        elif report.failed:
            result.outcome = "failed" if report.when == "call" else "error"
            failure = dict(props.get("failure") or {})
            text = getattr(report, "longreprtext", "") or str(report.longrepr)
            for key, value in parse_marker(text).items():
                failure.setdefault(key, value)
            failure.setdefault("message", text[-2000:])
            result.failure = failure

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.out_dir is not None:
            write(self.build(stopped=_stop_reason(session, exitstatus)), self.out_dir)

    def build(self, stopped: str | None = None) -> dict[str, Any]:
        not_run = {n: r for n, r in self.collected.items() if n not in self.results}
        return build_report(
            list(self.results.values()),
            {**self.meta, "duration_s": round(time.time() - self.started, 2)},
            not_run=not_run,
            stopped=stopped,
        )


def _stop_reason(session, exitstatus) -> str | None:
    """Why the session ended before running every test: Ctrl-C, ``-x``/``--maxfail``, or None."""
    if int(exitstatus) == 2:  # pytest.ExitCode.INTERRUPTED
        return f"interrupted ({getattr(session, 'shouldstop', None) or 'KeyboardInterrupt'})"
    for reason in (getattr(session, "shouldfail", None), getattr(session, "shouldstop", None)):
        if reason:
            return f"stopped early ({reason})"
    return None


def _completion(
    results: list[TestResult], not_run: dict[str, list[str]], stopped: str | None
) -> dict[str, Any]:
    """Whether the run is complete, and if not why: stopped early, time budget spent, tests not run."""
    budget = [
        r.nodeid
        for r in results
        if r.outcome == "skipped"
        and (r.skip_reason or "").startswith((TIME_BUDGET_SKIP, f"Skipped: {TIME_BUDGET_SKIP}"))
    ]
    reasons = [stopped] if stopped else []
    if budget:
        reasons.append(f"time budget spent: {len(budget)} tests skipped")
    if not_run:
        reasons.append(f"{len(not_run)} collected tests not run")
    return {
        "complete": not reasons,
        "reason": "; ".join(reasons) or None,
        "skipped_for_time": budget,
        "not_run_tests": sorted(not_run),
    }


def _rule_table(
    results: list[TestResult], not_run: dict[str, list[str]], defined: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Per rule: its spec file, tests, examples and status."""
    rules: dict[str, dict[str, Any]] = {
        r: {"file": f, "tests": [], "examples": 0, "status": "not run"} for r, f in defined.items()
    }
    # A rule failed if any of its tests failed, passed if one passed (a skipped GPU-only test does not
    # undo the CPU tests of the same rule), "error" if its tests only errored (setup, not a check: nothing
    # was checked), skipped if all its tests were skipped.
    rank = {"not run": 0, "skipped": 1, "error": 2, "passed": 3, "failed": 4}
    for result in results:
        for rule in result.rules:
            entry = rules.setdefault(rule, {"file": None, "tests": [], "examples": 0, "status": "not run"})
            entry["tests"].append(result.nodeid)
            entry["examples"] += result.examples
            if rank[result.outcome] > rank[entry["status"]]:
                entry["status"] = result.outcome
    for nodeid, test_rules in not_run.items():
        for rule in test_rules:
            rules.setdefault(rule, {"file": None, "tests": [], "examples": 0, "status": "not run"})
            rules[rule]["tests"].append(nodeid)
    return rules


def build_report(
    results: list[TestResult],
    meta: dict[str, Any],
    *,
    not_run: dict[str, list[str]] | None = None,
    stopped: str | None = None,
) -> dict[str, Any]:
    """The JSON report: summary, per-rule status, root causes, failures, skips, per-test results.

    ``not_run``: tests collected but never reported (nodeid -> rules); ``stopped``: why the session
    ended early (then the report is marked incomplete).
    """
    defined = spec_rules()
    not_run = not_run or {}
    rules = _rule_table(results, not_run, defined)
    checked = {rule for r in results if r.outcome == "passed" for rule in r.rules}  # a test naming it passed
    outcomes = collections.Counter(r.outcome for r in results)
    failures = [
        {"test": r.nodeid, "rules": r.rules, **(r.failure or {})}
        for r in results
        if r.outcome in ("failed", "error")
    ]
    skips = [
        {"test": r.nodeid, "rules": r.rules, "reason": r.skip_reason}
        for r in results
        if r.outcome == "skipped"
    ]
    summary = {
        "tests": len(results),
        "passed": outcomes["passed"],
        "failed": outcomes["failed"],
        "errors": outcomes["error"],
        "skipped": outcomes["skipped"],
        "not_run": len(not_run),
        "examples": sum(r.examples for r in results),
        "hosts": host_counts(results, meta),
        "rules_defined": len(defined),
        "rules_checked": len(checked & set(defined)),
        "rules_errored": sorted(r for r, e in rules.items() if e["status"] == "error"),
        "errored_tests": sorted(r.nodeid for r in results if r.outcome == "error"),
        "rules_failed": sorted(r for r, e in rules.items() if e["status"] == "failed"),
        "rules_broken": sorted({f["rule"] for f in failures if f.get("rule")}),  # named by failed checks
        "rules_skipped": sorted(r for r, e in rules.items() if e["status"] == "skipped"),
        "rules_not_run": sorted(r for r, e in rules.items() if e["status"] == "not run"),
        **_completion(results, not_run, stopped),
    }
    attributed = attribution.attribute(failures)
    summary["root_cause"] = attributed["root_cause"]
    summary["symptom_rules"] = sorted({s["rule"] for s in attributed["symptoms"]})
    return {
        "meta": meta,
        "summary": summary,
        "attribution": attributed,
        "rules": rules,
        "failures": failures,
        "skips": skips,
        "tests": [asdict(r) for r in results],
    }


def render_markdown(report: dict[str, Any]) -> str:
    meta, summary = report["meta"], report["summary"]
    lines = [
        f"# Conformance report: `{meta.get('impl', '?')}`",
        "",
        "| | |",
        "|---|---|",
    ]
    for key in ("impl", "profile", "max_examples", "dtypes", "device", "duration_s", "command"):
        if key in meta:
            lines.append(f"| {key} | `{meta[key]}` |")
    lines += ["", "## Summary", ""]
    if not summary.get("complete", True):
        lines.append(f"- **INCOMPLETE: {summary['reason']}.** What is below is what ran before the stop.")
    lines += [
        f"- tests: {summary['tests']} ({summary['passed']} passed, {summary['failed']} failed, "
        f"{summary['errors']} errors, {summary['skipped']} skipped"
        + (f", {summary['not_run']} not run" if summary.get("not_run") else "")
        + f"); examples run: {summary['examples']}",
        f"- rules: {summary['rules_checked']} of {summary['rules_defined']} checked (a test naming the rule "
        "passed); "
        f"errored, not checked: {', '.join(summary['rules_errored']) or 'none'}; "
        f"tests failed for: {', '.join(summary['rules_failed']) or 'none'}; "
        f"broken (named by the failing checks): {', '.join(summary['rules_broken']) or 'none'}; "
        f"skipped: {', '.join(summary.get('rules_skipped', [])) or 'none'}; "
        f"not run: {', '.join(summary['rules_not_run']) or 'none'}",
    ]
    lines += host_line(summary)
    lines += _attribution_lines(report.get("attribution"))
    lines += ["", "## Failures", ""]
    if not report["failures"]:
        lines.append("None.")
    for failure in report["failures"]:
        lines += _failure_lines(failure)
    lines += ["", "## Skips", ""]
    if not report["skips"]:
        lines.append("None.")
    else:
        lines += ["| test | rules | reason |", "|---|---|---|"]
        lines += [f"| `{s['test']}` | {', '.join(s['rules'])} | {s['reason']} |" for s in report["skips"]]
    lines += ["", "## Rules", "", "| rule | status | examples | tests |", "|---|---|---|---|"]
    for rule, entry in sorted(report["rules"].items()):
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in entry["tests"])
        lines.append(f"| `{rule}` | {entry['status']} | {entry['examples']} | {tests} |")
    return "\n".join(lines) + "\n"


def _failure_lines(failure: dict[str, Any]) -> list[str]:
    """One failure's section of report.md."""
    lines: list[str] = []
    rule = failure.get("rule") or ", ".join(failure["rules"])
    lines += [f"### `{rule}`: `{failure['test']}`", ""]
    if failure.get("capability"):
        lines.append(f"- missing capability: **{failure['capability']}**")
    elif not failure.get("rule") and failure.get("type"):
        lines.append(f"- raised `{failure['type']}` (a crash, not a failed check)")
    if failure.get("failures"):
        named = ", ".join(f"`{p.get('rule') or p.get('type')}`" for p in failure["failures"])
        lines.append(
            f"- {len(failure['failures'])} distinct failures ({failure.get('group')}): {named}; "
            "the most upstream is shown"
        )
    if failure.get("observed") is not None or failure.get("allowed") is not None:
        lines.append(f"- observed: `{failure.get('observed')}`; allowed: `{failure.get('allowed')}`")
    lines.append(f"- test rules: {', '.join(f'`{r}`' for r in failure['rules'])}")
    lines += ["", "```text", str(failure.get("message", "")).strip()[:3000], "```", ""]
    if failure.get("reproducer"):
        lines += ["Minimal reproducer:", "", "```python", failure["reproducer"], "```", ""]
    if failure.get("falsifying_example"):
        lines += [
            "Hypothesis's falsifying example:",
            "",
            "```text",
            failure["falsifying_example"][:3000],
            "```",
            "",
        ]
    return lines


def _attribution_lines(attributed: dict[str, Any] | None) -> list[str]:
    """The summary's root causes and symptoms (see :mod:`.attribution`)."""
    if not attributed or not attributed["root_cause"]:
        return []
    roots = ", ".join(f"`{r['test'].split('::')[-1]}`" for r in attributed["root_causes"])
    lines = [f"- **root cause: `{attributed['root_cause']}`** (failed in {roots})"]
    symptoms = attributed["symptoms"]
    if symptoms:
        by_rule = collections.defaultdict(list)
        for entry in symptoms:
            by_rule[entry["rule"]].append(entry["test"].split("::")[-1])
        lines.append(
            f"- downstream symptoms ({len(symptoms)} failures under {len(by_rule)} rules, likely caused by the "
            f"root cause; fix it first): "
            + "; ".join(f"`{rule}` ({', '.join(tests)})" for rule, tests in sorted(by_rule.items()))
        )
    if attributed["unattributed"]:
        lines.append(
            f"- failures naming no rule (crashes, missing capabilities): {len(attributed['unattributed'])}"
        )
    return lines


def write(report: dict[str, Any], out_dir: Path | str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
