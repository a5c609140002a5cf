"""Tests of the suite itself: every spec rule is tested, every test names real rules, nothing is skipped silently."""

from __future__ import annotations

from rerouting.conformance.report import TestResult, build_report, render_markdown
from rerouting.conformance.rules import marks_of, spec_rules, suite_tests


def test_spec_defines_rules():
    rules = spec_rules()
    assert len(rules) >= 40, f"only {len(rules)} rule IDs parsed from rerouting.spec/*.md: {sorted(rules)}"
    assert all(rule.split(".")[0] + ".md" == where for rule, where in rules.items()), (
        "a rule ID's first segment is the file that defines it: "
        + str({r: w for r, w in rules.items() if r.split(".")[0] + ".md" != w})
    )


def test_every_rule_has_a_test():
    covered = {rule for rules in suite_tests().values() for rule in rules}
    missing = sorted(set(spec_rules()) - covered)
    assert not missing, f"spec rules with no conformance test: {missing}"


def test_every_test_names_existing_rules():
    defined = spec_rules()
    unnamed = [test for test, rules in suite_tests().items() if not rules]
    unknown = {test: [r for r in rules if r not in defined] for test, rules in suite_tests().items()}
    unknown = {t: r for t, r in unknown.items() if r}
    assert not unnamed, f"tests without @pytest.mark.spec(...): {unnamed}"
    assert not unknown, f"tests naming rules the spec does not define: {unknown}"


def test_no_static_skips():
    """Coverage never shrinks silently: no test carries a skip/skipif/xfail mark (runtime skips state a reason)."""
    import importlib

    offenders = []
    for test in suite_tests():
        module, name = test.split("::")
        fn = getattr(importlib.import_module(f"rerouting.conformance.{module}"), name)
        if set(marks_of(fn)) & {"skip", "skipif", "xfail"}:
            offenders.append(test)
    assert not offenders, f"statically skipped tests: {offenders}"


def test_report_lists_skips_with_reasons():
    results = [
        TestResult(
            "conformance/test_memory.py::test_reroute_memory",
            ["routing.bypass"],
            "skipped",
            skip_reason="no CUDA device",
        ),
        TestResult("conformance/test_cache.py::test_contents", ["cache.contents"], "passed", examples=5),
    ]
    report = build_report(results, {"impl": "reference"})
    assert report["skips"] == [
        {"test": results[0].nodeid, "rules": ["routing.bypass"], "reason": "no CUDA device"}
    ], report["skips"]
    markdown = render_markdown(report)
    assert "no CUDA device" in markdown and "routing.bypass" in markdown, markdown
    assert report["rules"]["cache.contents"]["status"] == "passed"
