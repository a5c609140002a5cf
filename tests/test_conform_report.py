"""The conformance report: root causes apart from symptoms, ExceptionGroups unpacked, incomplete runs reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from builtins import BaseExceptionGroup, ExceptionGroup  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10: Hypothesis's backport
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

from rerouting.conformance.attribution import attribute, evidence, rule_rank
from rerouting.conformance.cli import main as conform
from rerouting.conformance.protocol import CapabilityMissing, ConformanceFailure
from rerouting.conformance.report import TestResult, build_report, failure_details, render_markdown


def failed(test: str, rule: str, message: str = "an exact fact differs") -> TestResult:
    return TestResult(
        f"t::{test}", [rule], "failed", failure={"rule": rule, "message": f"[rule {rule}] {message}"}
    )


KEYS = "sample 0, layer 0 keys: max error 7.8e-01 > allowed 5.2e-07"
SCORES = "sample 0, decision 1 (layer 1): score of visual token 2 is 0.23, truth 0.22"
LOGITS = "logits of sample 0: max error 5.1e-05 > allowed 6.8e-08"


def test_spec_files_are_ordered_by_dependence():
    order = ["layout.sequence", "schedule.stages", "scoring.scorer", "selection.topk", "routing.output"]
    order += ["cache.contents", "budget.kv.bytes"]
    assert sorted(reversed(order), key=rule_rank) == order
    assert rule_rank("routing.active-set") < rule_rank("routing.active.positions")  # the file's own order
    assert [evidence(m) for m in (KEYS, SCORES, LOGITS, "decode logits of sample 0: max error 1")] == [
        "kv",
        "scores",
        "logits",
        "decode",
    ]
    assert evidence("sample 0: pool [0, 1] != [0, 1, 2] (remove)") == "structure"


def test_the_root_cause_is_the_most_upstream_failure_of_the_run():
    """A RoPE bug as the oracle reports it: the KV check names positions, the rest fail downstream under their own rules."""
    results = [
        failed("test_sequence", "layout.text-set", LOGITS),
        failed("test_projection", "scoring.probe.projection", SCORES),
        failed("test_positions", "routing.active.positions", KEYS),
        failed("test_active_set", "routing.active.positions", KEYS),
        failed("test_output", "routing.output", LOGITS),
        failed("test_decode", "cache.decode.equiv", "decode logits of sample 0: max error 1.6e-04"),
        TestResult("t::test_order", ["selection.order"], "passed", examples=3),
        TestResult(
            "t::test_stub", ["routing.equiv.remove"], "failed", failure={"capability": "forced_selection"}
        ),
    ]
    report = build_report(results, {})
    summary, attributed = report["summary"], report["attribution"]
    assert summary["root_cause"] == "routing.active.positions"
    assert [r["test"] for r in attributed["root_causes"]] == ["t::test_positions", "t::test_active_set"]
    assert summary["symptom_rules"] == [
        "cache.decode.equiv",
        "layout.text-set",
        "routing.output",
        "scoring.probe.projection",
    ]
    assert attributed["unattributed"] == ["t::test_stub"]
    markdown = render_markdown(report)
    assert "**root cause: `routing.active.positions`**" in markdown
    assert "downstream symptoms (4 failures under 4 rules" in markdown
    json.dumps(report)


def test_among_exact_failures_the_spec_order_decides():
    results = [
        failed("test_kv_entries", "budget.kv.entries"),
        failed("test_pool", "selection.pool"),
        failed("test_visual_set", "layout.visual-set"),
        failed("test_outputs", "routing.output", LOGITS),
    ]
    summary = build_report(results, {})["summary"]
    assert summary["root_cause"] == "layout.visual-set"
    assert summary["symptom_rules"] == ["budget.kv.entries", "routing.output", "selection.pool"]


def test_no_failure_no_root_cause():
    report = build_report([TestResult("t::ok", ["selection.order"], "passed")], {})
    assert report["summary"]["root_cause"] is None and attribute([])["root_causes"] == []
    assert "root cause" not in render_markdown(report)


def test_an_exception_group_is_unpacked_into_its_failures():
    group = ExceptionGroup(
        "Hypothesis found 3 distinct failures.",
        [
            ConformanceFailure("routing.output", LOGITS, observed=5.1e-05, allowed=6.8e-08),
            ConformanceFailure("selection.order", "sample 0: selection [2, 1] is not ascending"),
            CapabilityMissing("decode_step", "my-router"),
        ],
    )
    details = failure_details(group, str(group))
    assert details["rule"] == "selection.order" and details["group"] == "ExceptionGroup"
    assert [f.get("rule") for f in details["failures"]] == ["routing.output", "selection.order", None]
    assert details["symptoms"] == ["routing.output"]
    result = TestResult("t::test_output", ["routing.output"], "failed", failure=details)
    report = build_report([result], {})
    assert report["summary"]["rules_broken"] == ["selection.order"]
    markdown = render_markdown(report)
    assert (
        "a crash, not a failed check" not in markdown and "3 distinct failures (ExceptionGroup)" in markdown
    )
    nested = BaseExceptionGroup(
        "outer", [ExceptionGroup("inner", [ConformanceFailure("layout.sequence", "x")])]
    )
    assert failure_details(nested)["rule"] == "layout.sequence"


def test_an_incomplete_run_says_so():
    results = [
        TestResult("t::a", ["selection.order"], "passed"),
        TestResult("t::b", ["selection.topk"], "skipped", skip_reason="Skipped: time budget of 1 s spent"),
    ]
    summary = build_report(
        results, {}, not_run={"t::c": ["selection.pool"]}, stopped="interrupted (KeyboardInterrupt)"
    )["summary"]
    assert not summary["complete"] and summary["not_run_tests"] == ["t::c"]
    assert (
        summary["reason"]
        == "interrupted (KeyboardInterrupt); time budget spent: 1 tests skipped; 1 collected tests not run"
    )
    assert "selection.pool" in summary["rules_not_run"] and summary["rules_skipped"] == ["selection.topk"]
    assert build_report(results[:1], {})["summary"]["complete"]


def test_a_spent_time_budget_still_writes_the_report(tmp_path, capsys):
    code = conform(
        [
            *("--impl", "reference", "--out", str(tmp_path), "--max-examples", "1"),
            *("--time-budget", "0.001", "-k", "test_order or test_pool or test_topk"),
        ]
    )
    assert code == 0, code  # skips are not failures
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert not summary["complete"] and summary["reason"].startswith("time budget spent")
    assert summary["skipped"] >= 2 and set(summary["skipped_for_time"]) and summary["rules_skipped"]
    markdown = (tmp_path / "report.md").read_text()
    assert "**INCOMPLETE: time budget spent" in markdown and "--time-budget" in markdown
    assert "(incomplete: time budget spent" in capsys.readouterr().out


@pytest.mark.parametrize("budget", ["0", "-1", "soon"])
def test_time_budget_must_be_positive(budget, capsys):
    with pytest.raises(SystemExit) as info:
        conform(["--time-budget", budget])
    assert info.value.code == 2 and "argument --time-budget" in capsys.readouterr().err


def test_a_mutant_run_reports_its_root_cause(tmp_path):
    """Renumbered RoPE positions fail the forward tests under their own rules; the report names the root cause.

    In a fresh process: Hypothesis state left by the in-process runs above must not shrink this one.
    """
    command = [sys.executable, "-m", "rerouting", "conform"]
    command += ["--impl", "test_conformance_suite:RenumberedPositions", "--out", str(tmp_path)]
    command += [
        "--profile",
        "ci",
        "--max-examples",
        "3",
        "-k",
        "test_positions or test_text_set or test_projection",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["failed"] >= 2 and report["summary"]["complete"], report["summary"]
    assert report["summary"]["root_cause"] == "routing.active.positions", report["attribution"]
    assert set(report["summary"]["symptom_rules"]) <= {"layout.text-set", "scoring.probe.projection"}
    assert "**root cause: `routing.active.positions`**" in (tmp_path / "report.md").read_text()


def test_a_run_stopped_by_maxfail_writes_an_incomplete_report(tmp_path, capsys):
    code = conform(
        [
            *("--impl", "test_conformance_suite:RandomScorerProbeSizes", "--out", str(tmp_path), "-x"),
            *("--profile", "ci", "--max-examples", "2", "-k", "test_random or test_order"),
        ]
    )
    assert code == 1, code
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["failed"] == 1 and not summary["complete"], summary
    assert summary["reason"].startswith("stopped early (stopping after 1 failures)"), summary["reason"]
    assert summary["not_run_tests"] == ["conformance/test_selection.py::test_order"], summary
    assert "selection.order" in summary["rules_not_run"]
    assert "(incomplete: stopped early" in capsys.readouterr().out
