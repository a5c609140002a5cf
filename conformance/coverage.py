"""Traceability index: for every spec rule, the code citing it and the tests naming it.

Reads a source checkout with ``ast`` (nothing is imported): the rule definitions of ``spec/*.md``
(through :mod:`rerouting.conformance.rules`), the first-line docstring citations of the functions,
methods and classes of ``reference/`` and ``optimized/``, the ``@pytest.mark.spec`` decorators of the
tests in ``tests/`` and ``conformance/test_*.py``, and the rule IDs passed as string constants to
``RoutingError``, ``ConformanceFailure``, ``fail`` and ``check``. Writes ``docs/coverage.md``::

    python -m rerouting.conformance.coverage            # regenerate docs/coverage.md
    python -m rerouting.conformance.coverage --check    # exit 1 if it is stale

Every path it records is relative to the checkout, so the file is the same wherever the repository lies.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .rules import Rule, cited_rules, spec_definitions

ROOT = Path(__file__).resolve().parent.parent  # the checkout, when run from one (editable install)
OUTPUT = "docs/coverage.md"
COMMAND = "python -m rerouting.conformance.coverage"
CODE = {"reference": "rerouting.reference", "optimized": "rerouting.optimized"}  # folder -> package
TEST_FILES = ("tests/test_*.py", "conformance/test_*.py")
NOT_OPTIMIZED = "n/a: computed from the trace"
MAX_TESTS = 6  # tests shown per row before "+N more"
# Callables whose argument at this position is a rule ID, and the folders where the name means that.
RULE_ARGUMENT = {"RoutingError": 0, "ConformanceFailure": 0, "fail": 0, "check": 1}
RULE_ARGUMENT_FOLDERS = {
    "RoutingError": ("reference", "optimized", "conformance"),
    "ConformanceFailure": ("conformance",),
    "fail": ("conformance",),  # conformance.protocol.fail(rule, message); pytest.fail is an attribute
    "check": ("conformance",),  # conformance.protocol.check(condition, rule, message)
}


@dataclass(frozen=True)
class Citation:
    """A function, method or class citing ``rule``: ``rerouting.reference.schedule.Schedule``."""

    rule: str
    name: str
    path: str  # relative to the checkout
    line: int


@dataclass(frozen=True)
class MarkedTest:
    """A test function and the rules its ``spec`` marks name: ``tests/test_selection.py::test_order``."""

    name: str
    rules: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class RuleArgument:
    """A rule ID given as a string constant to an error or check: ``RoutingError("schedule.presets", ...)``."""

    rule: str
    callee: str
    path: str
    line: int


@dataclass(frozen=True)
class Index:
    rules: tuple[Rule, ...]
    citations: tuple[Citation, ...]
    tests: tuple[MarkedTest, ...]
    arguments: tuple[RuleArgument, ...]

    def cited_by(self, rule: str, package: str) -> list[str]:
        return [c.name for c in self.citations if c.rule == rule and c.name.startswith(package + ".")]

    def tests_of(self, rule: str) -> list[str]:
        return [t.name for t in self.tests if rule in t.rules]


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _python_files(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(root: Path, folder: str, package: str, path: Path) -> str:
    parts = list(path.relative_to(root / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """Every function, method and class under ``body`` with its ``__qualname__`` (prefixed)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qualname = f"{prefix}{node.name}"
            yield qualname, node
            inner = f"{qualname}." if isinstance(node, ast.ClassDef) else f"{qualname}.<locals>."
            yield from _definitions(node.body, inner)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # definitions under `if TYPE_CHECKING:` etc.
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            for block in blocks:
                yield from _definitions(block, prefix)


def code_citations(root: Path = ROOT) -> list[Citation]:
    """First-line docstring citations in ``reference/`` and ``optimized/``, in file and line order."""
    out: list[Citation] = []
    for folder, package in CODE.items():
        for path in _python_files(root, folder):
            module = _module_name(root, folder, package, path)
            relative = path.relative_to(root).as_posix()
            for qualname, node in _definitions(_parse(path).body, ""):
                for rule in cited_rules(ast.get_docstring(node)):
                    out.append(Citation(rule, f"{module}.{qualname}", relative, node.lineno))
    return out


def _spec_mark_rules(node: ast.expr) -> list[str]:
    """The string arguments of ``pytest.mark.spec(...)`` (or ``mark.spec(...)``); [] for other marks."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or node.func.attr != "spec":
        return []
    owner = node.func.value
    if not (
        (isinstance(owner, ast.Attribute) and owner.attr == "mark")
        or (isinstance(owner, ast.Name) and owner.id == "mark")
    ):
        return []
    return [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def _module_marks(module: ast.Module) -> list[str]:
    """Rules of a module-level ``pytestmark = pytest.mark.spec(...)`` (or a list of marks)."""
    rules: list[str] = []
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            for value in values:
                rules += _spec_mark_rules(value)
    return rules


def _decorated(decorators: list[ast.expr]) -> list[str]:
    return [rule for decorator in decorators for rule in _spec_mark_rules(decorator)]


def marked_tests(root: Path = ROOT) -> list[MarkedTest]:
    """Every test function of ``tests/test_*.py`` and ``conformance/test_*.py`` with the rules it names."""
    out: list[MarkedTest] = []
    for pattern in TEST_FILES:
        folder, glob = pattern.split("/")
        for path in sorted((root / folder).glob(glob)):
            module = _parse(path)
            prefix = f"{path.relative_to(root).as_posix()}::"
            inherited = _module_marks(module)
            for node in module.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                    rules = inherited + _decorated(node.decorator_list)
                    out.append(MarkedTest(prefix + node.name, tuple(dict.fromkeys(rules)), node.lineno))
                elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith(
                            "test"
                        ):
                            rules = (
                                inherited + _decorated(node.decorator_list) + _decorated(item.decorator_list)
                            )
                            name = f"{prefix}{node.name}::{item.name}"
                            out.append(MarkedTest(name, tuple(dict.fromkeys(rules)), item.lineno))
    return out


def _callee(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute) and node.func.attr in ("RoutingError", "ConformanceFailure"):
        return node.func.attr  # schedule.RoutingError(...); a bare-name-only callee (fail, check) never is
    return None


def rule_arguments(root: Path = ROOT) -> list[RuleArgument]:
    """Rule IDs given as string constants to ``RoutingError`` (reference/, optimized/, conformance/) and
    to ``ConformanceFailure``, ``fail`` and ``check`` (conformance/), by position or as ``rule=``."""
    out: list[RuleArgument] = []
    for folder in ("reference", "optimized", "conformance"):
        for path in _python_files(root, folder):
            for node in ast.walk(_parse(path)):
                if not isinstance(node, ast.Call):
                    continue
                callee = _callee(node)
                if callee not in RULE_ARGUMENT or folder not in RULE_ARGUMENT_FOLDERS[callee]:
                    continue
                position = RULE_ARGUMENT[callee]
                candidates = node.args[position : position + 1] + [
                    k.value for k in node.keywords if k.arg == "rule"
                ]
                for arg in candidates:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        out.append(
                            RuleArgument(arg.value, callee, path.relative_to(root).as_posix(), node.lineno)
                        )
    return out


def build_index(root: Path = ROOT) -> Index:
    root = Path(root)
    return Index(
        rules=spec_definitions(root / "spec"),
        citations=tuple(code_citations(root)),
        tests=tuple(marked_tests(root)),
        arguments=tuple(rule_arguments(root)),
    )


def _cell(items: Sequence[str], limit: int | None = None) -> str:
    shown = list(items if limit is None else items[:limit])
    cell = "<br>".join(f"`{item}`" for item in shown)
    if limit is not None and len(items) > limit:
        cell += f"<br>+{len(items) - limit} more"
    return cell.replace("|", "\\|")


def _short(name: str, package: str) -> str:
    return name.removeprefix(package + ".")


def render(index: Index) -> str:
    """The text of ``docs/coverage.md``: one row per rule, in spec order."""
    lines = [
        "# Spec traceability",
        "",
        f"Generated by `{COMMAND}` (writes this file; `--check` only compares); do not edit by hand. "
        "A unit test fails when it is stale.",
        "",
        "One row per rule of [`spec/`](../spec/README.md), in spec order (files by name, rules as they "
        "appear): where it is defined, the functions of `rerouting.reference` and `rerouting.optimized` "
        "citing it on their docstring's first line, and the tests naming it with `@pytest.mark.spec` "
        "(`tests/` are unit tests, `conformance/` the conformance suite).",
        "",
        "| rule | defined at | reference | optimized | tests |",
        "|---|---|---|---|---|",
    ]
    for rule in index.rules:
        reference = [_short(n, CODE["reference"]) for n in index.cited_by(rule.id, CODE["reference"])]
        optimized = [_short(n, CODE["optimized"]) for n in index.cited_by(rule.id, CODE["optimized"])]
        tests = index.tests_of(rule.id)
        lines.append(
            f"| `{rule.id}` | `spec/{rule.file}:{rule.line}` | {_cell(reference) or 'none'} "
            f"| {_cell(optimized) or NOT_OPTIMIZED} | {_cell(tests, MAX_TESTS) or 'none'} |"
        )
    cited_ref = sum(1 for r in index.rules if index.cited_by(r.id, CODE["reference"]))
    cited_opt = sum(1 for r in index.rules if index.cited_by(r.id, CODE["optimized"]))
    tested = sum(1 for r in index.rules if index.tests_of(r.id))
    lines += [
        "",
        f"{len(index.rules)} rules: {cited_ref} cited by the reference, {cited_opt} by the optimized path, "
        f"{tested} named by a test. Function names are relative to `rerouting.reference` and "
        "`rerouting.optimized`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=f"Write {OUTPUT} (the traceability index).")
    parser.add_argument("--root", type=Path, default=ROOT, help="the source checkout (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT} is stale; write nothing")
    args = parser.parse_args(argv)
    root: Path = args.root
    if not all((root / folder).is_dir() for folder in ("spec", "reference", "optimized", "tests", "docs")):
        parser.error(
            f"{root} is not a source checkout of rerouting (an editable install, `pip install -e .`)"
        )
    text, target = render(build_index(root)), root / OUTPUT
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            print(f"{OUTPUT} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
