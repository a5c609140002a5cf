"""Rule IDs: those the spec defines (parsed from ``spec/*.md``) and those the suite's tests name.

The spec ships as the package ``rerouting.spec`` (Markdown files); a rule is defined where its ID
opens a paragraph in bold brackets, ``**[selection.tiebreak]**``. Conformance tests name the rules
they check with ``@pytest.mark.spec("selection.tiebreak", ...)``; code cites a rule in brackets on
its docstring's first line (``[selection.tiebreak] The k highest ...``).

This module is the project's only parser of spec rule IDs: the report, the suite's meta-tests, the
unit meta-tests (``tests/test_spec_rules.py``) and the traceability index (``coverage.py``) use it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import inspect
import pkgutil
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; annotations only
    from importlib.resources.abc import Traversable

# spec/README.md, "ID format": lower case, dot-separated segments of letters, digits and hyphens, two or more.
RULE_ID = r"[a-z][a-z0-9-]*(?:\.[a-z0-9-]+)+"
RULE = re.compile(rf"\*\*\[({RULE_ID})\]\*\*")  # a definition: **[selection.tiebreak]**
CITATION = re.compile(rf"\[({RULE_ID})\]")  # a citation: [selection.tiebreak]
SUITE_PACKAGE = "rerouting.conformance"
EXEMPT_MODULES = ("test_meta",)  # tests of the suite itself, not of a rule


@dataclass(frozen=True)
class Rule:
    """One definition of a rule: its ID, the spec file (``selection.md``) and the 1-based line."""

    id: str
    file: str
    line: int


def parse_spec(text: str, file: str) -> list[Rule]:
    """The rule definitions in one spec file's text, in order."""
    return [
        Rule(match.group(1), file, number)
        for number, line in enumerate(text.splitlines(), start=1)
        for match in RULE.finditer(line)
    ]


def spec_definitions(folder: Traversable | None = None) -> tuple[Rule, ...]:
    """Every rule definition in ``folder/*.md`` (default: the package ``rerouting.spec``), in spec order:
    files by name, rules as they appear. A rule defined twice appears twice (a meta-test forbids it)."""
    if folder is None:
        return _packaged_definitions()
    return _definitions(folder)


@functools.lru_cache(maxsize=1)
def _packaged_definitions() -> tuple[Rule, ...]:
    return _definitions(importlib.resources.files("rerouting.spec"))


def _definitions(folder: Traversable) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".md"):
            rules.extend(parse_spec(entry.read_text(encoding="utf-8"), entry.name))
    return tuple(rules)


@functools.lru_cache(maxsize=1)
def spec_rules() -> dict[str, str]:
    """Every rule ID defined in ``spec/*.md`` -> the file defining it (``importlib.resources``)."""
    rules: dict[str, str] = {}
    for rule in spec_definitions():
        rules.setdefault(rule.id, rule.file)
    return rules


def cited_rules(docstring: str | None) -> tuple[str, ...]:
    """The rule IDs a docstring cites in brackets on its first line (``"[a.b] [c.d] Does ..."``)."""
    if not docstring:
        return ()
    return tuple(CITATION.findall(docstring.strip().splitlines()[0]))


def rules_of(fn) -> tuple[str, ...]:
    """The rule IDs a test function names with ``@pytest.mark.spec``."""
    out: list[str] = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "spec":
            out.extend(mark.args)
    return tuple(out)


def suite_tests() -> dict[str, tuple[str, ...]]:
    """``module::test`` -> rule IDs, for every test function of the suite's ``test_*`` modules."""
    package = importlib.import_module(SUITE_PACKAGE)
    tests: dict[str, tuple[str, ...]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("test_") or info.name in EXEMPT_MODULES:
            continue
        module = importlib.import_module(f"{SUITE_PACKAGE}.{info.name}")
        for name, fn in inspect.getmembers(module, callable):
            if name.startswith("test_") and getattr(fn, "__module__", None) == module.__name__:
                tests[f"{info.name}::{name}"] = rules_of(fn)
    return tests


def marks_of(fn) -> tuple[str, ...]:
    return tuple(mark.name for mark in getattr(fn, "pytestmark", []))
