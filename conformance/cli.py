"""``rerouting conform``: run the conformance suite against an implementation and write its report.

    rerouting conform --impl optimized [--max-examples N] [--out DIR] [--profile ci|dev|nightly]
                      [--dtypes float32,bfloat16] [--device cpu|cuda] [-n auto] [--time-budget SECONDS]
                      [-x] [--maxfail N] [-- extra pytest args]

Runs ``pytest -p rerouting.conformance.plugin --pyargs rerouting.conformance`` in-process with the
report collector on, writes ``DIR/report.json`` and ``DIR/report.md`` (default ``rerouting-conform``)
and returns pytest's exit code (0 = every rule passed). The report is written however the run ends
(all tests, ``-x``/``--maxfail``, ``--time-budget`` spent, Ctrl-C); an incomplete one says so.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

PROFILES = ("ci", "dev", "nightly")
REPORT_FILES = ("report.json", "report.md")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: a property needs at least 1 example")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g}: give a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerouting conform", description="Run the rerouting conformance suite against an implementation."
    )
    parser.add_argument(
        "--impl",
        default=None,
        help="reference, optimized or package.module:object (default $REROUTING_IMPL, else reference)",
    )
    parser.add_argument(
        "--max-examples", type=_at_least_one, default=None, help="Hypothesis examples per property (>= 1)"
    )
    parser.add_argument("--out", default="rerouting-conform", help="folder for report.json and report.md")
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help="Hypothesis profile (default: ci when $CI is set, else dev)",
    )
    parser.add_argument("--dtypes", default=None, help="dtypes under test, e.g. float32,bfloat16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("-n", "--numprocesses", default=None, help="pytest-xdist workers (e.g. auto)")
    parser.add_argument(
        "-k", dest="keyword", default=None, help="only tests matching this pytest -k expression"
    )
    parser.add_argument(
        "--time-budget",
        type=_positive_seconds,
        default=None,
        help="seconds for the run: once spent, the remaining tests are skipped and the report says so",
    )
    parser.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first failing test")
    parser.add_argument("--maxfail", type=_at_least_one, default=None, help="stop after N failing tests")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    return parser


PLUGIN = "rerouting.conformance.plugin"


def _plugin_autoloaded() -> bool:
    """Whether a ``pytest11`` entry point loads the plugin already (``-p`` would then register it twice)."""
    from importlib.metadata import entry_points

    return any(ep.value.split(":")[0] == PLUGIN for ep in entry_points(group="pytest11"))


def pytest_arguments(options: argparse.Namespace) -> list[str]:
    args = [] if _plugin_autoloaded() else ["-p", PLUGIN]
    # not -q: the header says what runs. The filter: anyio is imported (through transformers) before pytest
    # starts in this process, so pytest cannot assertion-rewrite its plugin and says so; nothing here uses it.
    rewrite = "ignore:Module already imported so cannot be rewritten; anyio:pytest.PytestAssertRewriteWarning"
    args += ["--pyargs", "rerouting.conformance", "-p", "no:cacheprovider", "-W", rewrite]
    args += ["--report-dir", str(Path(options.out).resolve())]
    if options.impl:
        args += ["--impl", options.impl]
    if options.max_examples is not None:
        args += ["--max-examples", str(options.max_examples)]
    if options.profile:
        args += ["--hypothesis-profile", options.profile]
    if options.dtypes:
        args += ["--dtypes", options.dtypes]
    if options.device:
        args += ["--device", options.device]
    if options.numprocesses:
        args += ["-n", str(options.numprocesses)]
    if options.keyword:
        args += ["-k", options.keyword]
    if options.time_budget is not None:
        args += ["--time-budget", f"{options.time_budget:g}"]
    if options.exitfirst:
        args += ["-x"]
    if options.maxfail is not None:
        args += ["--maxfail", str(options.maxfail)]
    return args + list(options.pytest_args)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return pytest's exit code. ``argv`` excludes the program name (and ``conform``)."""
    import pytest

    from .impls import ImplementationError, check_impl

    options = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:  # before pytest starts: one line, not a traceback per test
        check_impl(options.impl)
    except ImplementationError as error:
        print(f"rerouting conform: {error}", file=sys.stderr)
        return 2
    out = Path(options.out)
    for name in REPORT_FILES:  # an earlier run's report must never pass for this run's
        (out / name).unlink(missing_ok=True)
    args = pytest_arguments(options)
    started = time.time()
    code = int(pytest.main(args))
    print(f"rerouting conform: exit {code} in {time.time() - started:.1f} s; pytest {shlex.join(args)}")
    if all((out / name).exists() for name in REPORT_FILES):
        print(f"report: {out / 'report.md'} and {out / 'report.json'}{_incomplete(out)}")
    else:
        print(f"no report: the run stopped before its tests ran (exit {code})")
    return code


def _incomplete(out: Path) -> str:
    """`` (incomplete: why)`` when the report says the run stopped early, else ``""``."""
    import json

    try:
        summary = json.loads((out / "report.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return ""
    return "" if summary.get("complete", True) else f" (incomplete: {summary.get('reason')})"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
