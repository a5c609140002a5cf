"""``rerouting conform`` as a new user meets it: checks before it runs, reports only what ran, shows progress."""

from __future__ import annotations

import json

import pytest

from rerouting.conformance.cli import main as conform
from rerouting.conformance.report import TestResult, build_report


class NoPrefill:
    name = "no-prefill"


@pytest.mark.parametrize(
    ("impl", "message"),
    [
        (
            "nonexistent.module:thing",
            "--impl 'nonexistent.module:thing' cannot be loaded: ModuleNotFoundError",
        ),
        (f"{__name__}:NoPrefill", "which has no prefill(model, config, input_ids"),
        ("json", "is not 'reference', 'optimized' or 'package.module:object'"),
    ],
)
def test_an_unusable_impl_is_one_error_before_any_test(impl, message, tmp_path, capsys):
    assert conform(["--impl", impl, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("count", ["0", "-3", "many"])
def test_max_examples_must_be_a_positive_integer(count, capsys):
    with pytest.raises(SystemExit) as info:
        conform(["--max-examples", count])
    assert info.value.code == 2 and "argument --max-examples" in capsys.readouterr().err


def test_a_run_that_stops_early_leaves_no_earlier_report(tmp_path, capsys):
    (tmp_path / "report.md").write_text("an earlier run's report")
    (tmp_path / "report.json").write_text("{}")
    assert conform(["--impl", "reference", "--dtypes", "float8", "--out", str(tmp_path)]) == 4
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.json").exists()
    out = capsys.readouterr().out
    assert "no report: the run stopped before its tests ran (exit 4)" in out and "\nreport: " not in out


def test_progress_lines_and_the_header(tmp_path, capsys):
    code = conform(["--impl", "reference", "--out", str(tmp_path), "--max-examples", "1", "-k", "test_order"])
    assert code == 0
    out = capsys.readouterr().out
    assert "rerouting conformance: impl=reference" in out  # the header prints (no -q)
    line = next(line for line in out.splitlines() if line.startswith("conformance: test_selection.py done"))
    assert "rules checked 1/" in line and "elapsed" in line and "left" in line


def test_a_rule_counts_as_checked_only_when_a_test_naming_it_passed():
    results = [
        TestResult("t::passes", ["selection.order"], "passed", examples=3),
        TestResult("t::errors", ["selection.topk"], "error", failure={"type": "ValueError"}),
        TestResult("t::fails", ["selection.pool"], "failed", failure={"rule": "selection.pool"}),
    ]
    summary = build_report(results, {})["summary"]
    assert summary["rules_checked"] == 1
    assert summary["rules_errored"] == ["selection.topk"] and summary["errored_tests"] == ["t::errors"]
    assert summary["rules_failed"] == ["selection.pool"]
    json.dumps(summary)  # the report stays JSON
