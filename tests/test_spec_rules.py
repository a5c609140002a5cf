"""Meta-test: spec rule IDs, reference docstrings and tests name each other consistently (spec/README.md)."""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

import pytest

RULE = re.compile(r"\*\*\[([a-z][a-z0-9-]*(?:\.[a-z0-9-]+)+)\]\*\*")
CITED = re.compile(r"\[([a-z][a-z0-9-]*(?:\.[a-z0-9-]+)+)\]")
ROOT = Path(__file__).resolve().parent.parent


def spec_rules() -> dict[str, str]:
    """Every rule ID defined in the spec, mapped to the file defining it."""
    rules: dict[str, str] = {}
    for entry in resources.files("rerouting.spec").iterdir():
        if entry.name.endswith(".md"):
            for rule in RULE.findall(entry.read_text(encoding="utf-8")):
                assert rule not in rules, f"rule {rule} is defined in both {rules[rule]} and {entry.name}"
                rules[rule] = entry.name
    return rules


def marked_rules(folder: str) -> dict[str, list[str]]:
    """Rule IDs named by ``@pytest.mark.spec(...)`` in ``folder``'s test files, with the tests naming them."""
    named: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or getattr(node.func, "attr", None) != "spec":
                continue
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    named.setdefault(arg.value, []).append(path.name)
    return named


def test_spec_defines_rules():
    rules = spec_rules()
    assert len(rules) >= 40, f"only {len(rules)} rules found in spec/"
    assert {name for name in rules.values()} >= {"routing.md", "scoring.md", "budget.md"}


@pytest.mark.parametrize("folder", ["tests", "conformance"])
def test_every_named_rule_exists(folder):
    unknown = {rule: files for rule, files in marked_rules(folder).items() if rule not in spec_rules()}
    assert not unknown, f"tests in {folder}/ name rules that spec/ does not define: {unknown}"


def test_every_rule_has_a_test():
    named = set(marked_rules("tests")) | set(marked_rules("conformance"))
    missing = sorted(set(spec_rules()) - named)
    assert not missing, f"spec rules without any test naming them: {missing}"


def test_reference_docstrings_cite_existing_rules():
    rules = spec_rules()
    for path in sorted((ROOT / "reference").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                first = ast.get_docstring(node).splitlines()[0]
                for rule in CITED.findall(first):
                    assert rule in rules, (
                        f"{path.name}:{node.name} cites [{rule}], which spec/ does not define"
                    )
