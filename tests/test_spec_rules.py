"""Meta-test: spec rule IDs, reference docstrings and tests name each other consistently (spec/README.md).

Every rule ID is parsed by ``rerouting.conformance.rules``; the code and tests citing them are read by
``rerouting.conformance.coverage``, which also writes the traceability index ``docs/coverage.md``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from rerouting.conformance import coverage
from rerouting.conformance.rules import spec_definitions, spec_rules

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def index() -> coverage.Index:
    return coverage.build_index(ROOT)


def marked_rules(folder: str) -> dict[str, list[str]]:
    """Rule IDs named by ``@pytest.mark.spec(...)`` in ``folder``'s test files, with the tests naming them."""
    named: dict[str, list[str]] = {}
    for test in index().tests:
        if test.name.startswith(f"{folder}/"):
            for rule in test.rules:
                named.setdefault(rule, []).append(test.name)
    return named


def test_spec_defines_rules():
    rules = spec_rules()
    assert len(rules) >= 40, f"only {len(rules)} rules found in spec/"
    assert {name for name in rules.values()} >= {"routing.md", "scoring.md", "budget.md"}


def test_each_rule_is_defined_once():
    rules: dict[str, str] = {}
    for definition in spec_definitions():
        rule = definition.id
        assert rule not in rules, f"rule {rule} is defined in both {rules[rule]} and {definition.file}"
        rules[rule] = definition.file


def test_the_checkout_spec_is_the_packaged_spec():
    assert spec_definitions(ROOT / "spec") == spec_definitions(), "spec/ and rerouting.spec differ"


@pytest.mark.parametrize("folder", ["tests", "conformance"])
def test_every_named_rule_exists(folder):
    assert marked_rules(folder), f"no @pytest.mark.spec(...) found in {folder}/test_*.py"
    unknown = {rule: files for rule, files in marked_rules(folder).items() if rule not in spec_rules()}
    assert not unknown, f"tests in {folder}/ name rules that spec/ does not define: {unknown}"


def test_every_rule_has_a_test():
    named = set(marked_rules("tests")) | set(marked_rules("conformance"))
    missing = sorted(set(spec_rules()) - named)
    assert not missing, f"spec rules without any test naming them: {missing}"


@pytest.mark.parametrize("folder", ["reference", "optimized"])
def test_docstrings_cite_existing_rules(folder):
    rules = spec_rules()
    citations = [c for c in index().citations if c.path.startswith(f"{folder}/")]
    assert citations, f"no docstring in {folder}/ cites a rule on its first line"
    for citation in citations:
        rule = citation.rule
        assert rule in rules, f"{citation.path}:{citation.name} cites [{rule}], which spec/ does not define"


def test_errors_name_existing_rules():
    arguments = index().arguments
    # the scan finds what it looks for: RoutingError in reference/, check/fail in conformance/
    assert any(a.callee == "RoutingError" and a.rule == "schedule.presets" for a in arguments), arguments
    assert {"check", "fail"} <= {a.callee for a in arguments if a.path.startswith("conformance/")}
    unknown = [
        f"{a.path}:{a.line} {a.callee}({a.rule!r}, ...)" for a in arguments if a.rule not in spec_rules()
    ]
    assert not unknown, f"errors and checks name rules that spec/ does not define: {unknown}"


def test_coverage_has_a_row_per_rule():
    rows = [line for line in coverage.render(index()).splitlines() if line.startswith("| `")]
    ids = [row.split("`")[1] for row in rows]
    assert len(ids) >= 49, f"only {len(ids)} rows"
    assert ids == [rule.id for rule in spec_definitions()], "coverage rows are not the spec's rules in order"
    assert str(ROOT) not in "\n".join(rows), "coverage.md must hold paths relative to the checkout"


def test_coverage_row_format():
    text = coverage.render(index())
    row = next(line for line in text.splitlines() if line.startswith("| `selection.tiebreak` |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    line = next(rule.line for rule in spec_definitions() if rule.id == "selection.tiebreak")
    assert cells[1] == f"`spec/selection.md:{line}`", cells
    assert "`selection.select_topk`" in cells[3], cells  # optimized/selection.py cites it
    assert "conformance/test_selection.py::test_tiebreak" in cells[4], cells
    # a rule no optimized function cites says where it comes from instead
    assert f"| {coverage.NOT_OPTIMIZED} |" in text
    assert coverage.COMMAND in text.splitlines()[2]


def test_coverage_md_is_current():
    expected = coverage.render(index())
    path = ROOT / coverage.OUTPUT
    actual = path.read_text(encoding="utf-8") if path.exists() else ""
    assert actual == expected, f"{coverage.OUTPUT} is stale: run `{coverage.COMMAND}` and commit the result"


def test_the_scans_read_what_they_claim(tmp_path):
    """The scanners on a small fake checkout: qualnames, marks, and a wrong rule ID they must report."""
    for folder in ("reference", "optimized", "conformance", "tests"):
        (tmp_path / folder).mkdir()
    (tmp_path / "reference" / "mod.py").write_text(
        'class A:\n    def f(self):\n        """[selection.topk] Doc."""\n'
        '        raise RoutingError("no.such-rule", "message")\n',
        encoding="utf-8",
    )
    (tmp_path / "optimized" / "mod.py").write_text("def g():\n    pass\n", encoding="utf-8")
    (tmp_path / "conformance" / "oracle.py").write_text(
        'import pytest\ncheck(ok, "selection.pool", "m")\nfail("selection.order", "m")\npytest.fail("prose")\n',
        encoding="utf-8",
    )
    (tmp_path / "tests" / "test_x.py").write_text(
        'import pytest\npytestmark = [pytest.mark.spec("layout.sequence")]\n\n'
        '@pytest.mark.spec("selection.topk", "selection.order")\ndef test_a():\n    pass\n',
        encoding="utf-8",
    )
    citations = coverage.code_citations(tmp_path)
    assert [(c.rule, c.name) for c in citations] == [("selection.topk", "rerouting.reference.mod.A.f")]
    tests = coverage.marked_tests(tmp_path)
    assert [(t.name, t.rules) for t in tests] == [
        ("tests/test_x.py::test_a", ("layout.sequence", "selection.topk", "selection.order"))
    ]
    arguments = coverage.rule_arguments(tmp_path)
    assert sorted((a.callee, a.rule) for a in arguments) == [
        ("RoutingError", "no.such-rule"),
        ("check", "selection.pool"),
        ("fail", "selection.order"),
    ]
