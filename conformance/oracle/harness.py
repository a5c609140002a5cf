"""Errors and the harness: expected errors, and ``run_check`` (counts an example, attaches a reproducer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .. import report
from ..impls import Checked
from ..protocol import CapabilityMissing, check, fail
from .strategies import Case


def expect_error(rule: str, what: str, fn: Callable[[], Any], *, must_mention: Sequence[str]) -> None:
    """``fn()`` must raise a clear error naming one of ``must_mention`` (rule IDs), never run quietly ([routing.errors])."""
    try:
        fn()
    except CapabilityMissing:
        raise
    except Exception as error:  # the implementation's own error type is its choice
        text = str(error)
        check(
            any(m in text for m in must_mention),
            rule,
            f"{what}: raised {type(error).__name__}({text!r}), which names none of the rules {list(must_mention)} "
            "(routing.errors: an error names the value and the rule)",
        )
        return
    fail(rule, f"{what}: no error was raised (no silent fallback)", observed="no error", allowed="an error")


def _suite_module(name: str) -> str:
    # a test module imported by path is "conformance.test_x"; the installed name is "rerouting.conformance.test_x"
    return f"rerouting.{name}" if name.startswith("conformance.") else name


def repro(fn: Callable, impl: Checked, case: Case | None, kwargs: dict) -> str:
    args = ", ".join(
        [f"load_impl({impl.spec!r})"]
        + ([repr(case)] if case is not None else [])
        + [f"{k}={v!r}" for k, v in kwargs.items()]
    )
    return (
        "Reproduce with:\n"
        "    import torch\n"
        "    from rerouting.conformance.impls import load_impl\n"
        "    from rerouting.conformance.oracle.strategies import Case, HostSpec, Layout\n"
        "    from rerouting.reference import ClseParams, NuwaParams, RoutingConfig, Schedule, Scorer\n"
        f"    from {_suite_module(fn.__module__)} import {fn.__name__}\n"
        f"    {fn.__name__}({args})"
    )


def run_check(fn: Callable, impl: Checked, case: Case | None = None, **kwargs) -> None:
    """Run one example of a property: count it, and attach a reproducer to any failure."""
    report.count_example(host=None if case is None else case.host.family)
    try:
        if case is None:
            fn(impl, **kwargs)
        else:
            fn(impl, case, **kwargs)
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(repro(fn, impl, case, kwargs))
        raise
