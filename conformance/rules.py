"""Rule IDs: those the spec defines (parsed from ``spec/*.md``) and those the suite's tests name.

The spec ships as the package ``rerouting.spec`` (Markdown files); a rule is defined where its ID
opens a paragraph in bold brackets, ``**[selection.tiebreak]**``. Conformance tests name the rules
they check with ``@pytest.mark.spec("selection.tiebreak", ...)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import inspect
import pkgutil
import re

RULE = re.compile(r"\*\*\[([a-z0-9][a-z0-9.\-]*)\]\*\*")
SUITE_PACKAGE = "rerouting.conformance"
EXEMPT_MODULES = ("test_meta",)  # tests of the suite itself, not of a rule


@functools.lru_cache(maxsize=1)
def spec_rules() -> dict[str, str]:
    """Every rule ID defined in ``spec/*.md`` -> the file defining it (``importlib.resources``)."""
    rules: dict[str, str] = {}
    root = importlib.resources.files("rerouting.spec")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".md"):
            continue
        for rule in RULE.findall(entry.read_text(encoding="utf-8")):
            rules.setdefault(rule, entry.name)
    return rules


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
