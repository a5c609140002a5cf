"""The pytest plugin of the conformance suite: options, Hypothesis profiles, markers, the ``impl`` fixture, reporting.

Loaded by ``conformance/conftest.py`` when pytest is pointed at the folder, by ``-p
rerouting.conformance.plugin`` (needed with ``--pyargs``: pytest parses options before it imports a
package's conftest), or by a ``pytest11`` entry point.

Options: ``--impl reference|optimized|package.module:object`` (default ``$REROUTING_IMPL``, else
``reference``), ``--max-examples N``, ``--dtypes float32,bfloat16`` (``$REROUTING_DTYPES``; that is the default),
``--device cpu|cuda`` (default: cuda when available), ``--report-dir DIR``, ``--time-budget SECONDS``
(once spent, the remaining tests are skipped with that reason; the report says it is incomplete).

Profiles (Hypothesis settings): ``ci`` (loaded when ``CI`` is set: derandomized, no deadline, no
example database, few examples), ``dev`` (default locally) and ``nightly`` (1000 examples); pick
one with ``--hypothesis-profile``. ``--max-examples`` overrides the profile's count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from . import progress, report
from .impls import ENV_VAR, ImplementationError, check_impl, load_impl, missing_capabilities
from .oracle.hosts import FAMILIES, HOST_CLASSES, release_refuses
from .oracle.strategies import DTYPES, SETTINGS
from .rules import rules_of

_SUITE_DIR = Path(__file__).resolve().parent
_SLOW_OK = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
]

# No "explain" phase: it traces every line the failing example runs (sys.settrace), which through
# torch turns a 1 s shrink into minutes; the reproducer and labelled draws say what failed.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
DEFAULT_DTYPES = "float32,bfloat16"  # full precision and the low-precision tolerance path
PROFILES = {
    # CI: reproducible (derandomize; no database), no deadline (the first example builds models), few examples.
    "ci": settings(
        max_examples=15,  # 80-140 s for the whole suite on 2 shared CPU cores, float32 + bfloat16
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=_SLOW_OK,
        phases=_PHASES,
    ),
    "dev": settings(
        max_examples=25, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK, phases=_PHASES
    ),
    "nightly": settings(
        max_examples=1000, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK, phases=_PHASES
    ),
}
for _name, _profile in PROFILES.items():
    settings.register_profile(_name, _profile)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rerouting-conformance", "rerouting conformance suite")
    group.addoption(
        "--impl",
        default=None,
        help=f"implementation under test: reference, optimized or package.module:object (default ${ENV_VAR}, else reference)",
    )
    group.addoption(
        "--max-examples",
        type=int,
        default=None,
        help="Hypothesis examples per property (overrides the profile)",
    )
    group.addoption(
        "--dtypes",
        default=None,
        help="comma-separated dtypes under test (default $REROUTING_DTYPES, else float32,bfloat16)",
    )
    group.addoption(
        "--device", default=None, help="device under test: cpu or cuda (default: cuda when available)"
    )
    group.addoption("--report-dir", default=None, help="write report.json and report.md to this folder")
    group.addoption(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the run: once spent, the remaining tests are skipped (the report says so)",
    )


def _options(config: pytest.Config) -> dict:
    import torch

    dtypes = tuple(
        d.strip()
        for d in (config.getoption("dtypes") or os.environ.get("REROUTING_DTYPES") or DEFAULT_DTYPES).split(
            ","
        )
        if d.strip()
    )
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise pytest.UsageError(f"--dtypes: unknown {unknown}; valid: {sorted(DTYPES)}")
    device = config.getoption("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    impl = config.getoption("impl") or os.environ.get(ENV_VAR) or "reference"
    return {"impl": impl, "dtypes": dtypes, "device": device}


def _profile(config: pytest.Config) -> str:
    name = config.getoption("hypothesis_profile", None) or ("ci" if _in_ci() else "dev")
    count = config.getoption("max_examples")
    if count is not None:
        derived = f"{name}-max{count}"
        settings.register_profile(derived, settings.get_profile(name), max_examples=count)
        return derived
    return name


def drawn_families(impl) -> tuple[str, ...]:
    """The host families the suite draws for ``impl``: those its ``hosts`` attribute takes (all without one)
    and the installed transformers serves."""
    takes = lambda f: impl is None or impl.supports_host(HOST_CLASSES[f])  # noqa: E731
    return tuple(f for f in FAMILIES if takes(f) and release_refuses(f) is None)


def skipped_families(impl) -> dict[str, str]:
    """Per family not drawn for ``impl``: why (the transformers release, or its ``hosts`` attribute)."""
    hosts = list(getattr(getattr(impl, "impl", None), "hosts", None) or ())
    out = {}
    for f in FAMILIES:
        if (refused := release_refuses(f)) is not None:
            out[f] = refused
        elif impl is not None and not impl.supports_host(HOST_CLASSES[f]):
            out[f] = f"{impl.name} declares hosts {hosts}, not {HOST_CLASSES[f]}"
    return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "spec(*rule_ids): the spec rule IDs a test checks")
    config.addinivalue_line("markers", "gpu: needs a CUDA device and an NVIDIA driver; skipped without one")
    options = _options(config)
    SETTINGS.dtypes, SETTINGS.device = options["dtypes"], options["device"]
    config._rerouting_options = options
    if _targets_suite(config):  # before collection: @given captures the default settings when decorating
        count = config.getoption("max_examples")
        if count is not None and count < 1:
            raise pytest.UsageError(f"--max-examples {count}: a property needs at least 1 example")
        try:  # one clear error before any test runs, not one traceback per test
            config._rerouting_impl = check_impl(options["impl"])
        except ImplementationError as error:
            raise pytest.UsageError(str(error)) from None
        SETTINGS.families = drawn_families(config._rerouting_impl)
        if not hasattr(config, "workerinput"):
            config.pluginmanager.register(
                progress.Progress(config, _is_suite_item), "rerouting-conformance-progress"
            )
        settings.load_profile(_profile(config))
        # Tiny CPU models gain nothing from intra-op threads, and OpenMP barriers stall for seconds
        # when the cores are shared (measured: 0.04 s vs 8 s per example on 2 busy cores).
        import torch

        torch.set_num_threads(1)
    config._rerouting_deadline = _deadline(config)
    out = config.getoption("report_dir")
    if out and not hasattr(
        config, "workerinput"
    ):  # the controller of pytest -n collects the workers' reports
        meta = {**options, "dtypes": ",".join(options["dtypes"]), "profile": _profile(config)}
        meta["max_examples"] = settings.get_profile(meta["profile"]).max_examples
        meta["hosts_drawn"] = list(SETTINGS.families)
        meta["hosts_skipped"] = skipped_families(getattr(config, "_rerouting_impl", None))
        if config.getoption("time_budget") is not None:
            meta["time_budget_s"] = config.getoption("time_budget")
        config.pluginmanager.register(
            report.Collector(out_dir=out, meta=meta), "rerouting-conformance-report"
        )
        _terminate_as_interrupt()


def _deadline(config: pytest.Config) -> float | None:
    budget = config.getoption("time_budget", None)
    if budget is not None and budget <= 0:
        raise pytest.UsageError(f"--time-budget {budget:g}: give a positive number of seconds")
    return None if budget is None else time.monotonic() + budget


def _terminate_as_interrupt() -> None:
    """SIGTERM (a CI timeout, ``kill``) ends the run like Ctrl-C, so that the report is still written."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, interrupt)


def _is_suite_item(item: pytest.Item) -> bool:
    """A test of this suite, however it was imported (``rerouting.conformance.x`` or ``conformance.x``)."""
    return Path(str(item.path)).resolve().parent == _SUITE_DIR


def _targets_suite(config: pytest.Config) -> bool:
    """Whether the run's arguments name this suite (the profile is global: leave other runs alone)."""
    for arg in config.args:
        path = arg.split("::")[0]
        if path.startswith("rerouting.conformance"):
            return True
        resolved = (Path(config.invocation_params.dir) / path).resolve()
        if resolved == _SUITE_DIR or _SUITE_DIR in resolved.parents:
            return True
    return False


def pytest_report_header(config: pytest.Config) -> list[str]:
    options = getattr(config, "_rerouting_options", None) or _options(config)
    env = {k: v for k, v in os.environ.items() if k.startswith("REROUTING_") or k == "CI"}
    profile = _profile(config)
    lines = [
        f"rerouting conformance: impl={options['impl']} profile={profile} "
        f"max_examples={settings.get_profile(profile).max_examples} dtypes={','.join(options['dtypes'])} "
        f"device={options['device']} env={env}"
    ]
    checked = getattr(config, "_rerouting_impl", None)
    if checked is not None and missing_capabilities(checked):
        lines.append(
            f"  not implemented (their checks fail by name): {', '.join(missing_capabilities(checked))}"
        )
    return lines


@pytest.fixture(scope="session")
def impl(request: pytest.FixtureRequest):
    """The implementation under test (``--impl``), wrapped so missing capabilities fail by name."""
    checked = getattr(request.config, "_rerouting_impl", None)
    return checked if checked is not None else load_impl(request.config._rerouting_options["impl"])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    report.set_current(item.nodeid)
    deadline = getattr(item.config, "_rerouting_deadline", None)
    if deadline is not None and _is_suite_item(item) and time.monotonic() > deadline:
        budget = item.config.getoption("time_budget")
        pytest.skip(
            f"{report.TIME_BUDGET_SKIP} of {budget:g} s spent before this test started (--time-budget)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    if _is_suite_item(item):
        props = [
            ("rules", list(rules_of(item.function)) if hasattr(item, "function") else []),
            ("examples", report.EXAMPLES[item.nodeid]),
            ("hosts", dict(report.HOST_EXAMPLES[item.nodeid])),
        ]
        if call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
            props.append(("failure", report.failure_details(call.excinfo.value, str(call.excinfo.value))))
        keys = {k for k, _ in props}
        item.user_properties[:] = [p for p in item.user_properties if p[0] not in keys] + props
    yield


def _properties(rep) -> dict:
    return dict(getattr(rep, "user_properties", ()))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    """List every skip with its reason and rules, and every failure with the rule it broke."""
    skipped = terminalreporter.stats.get("skipped", [])
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    # a collection error's report (CollectReport) has no user_properties
    suite = [r for r in skipped + failed if "conformance" in r.nodeid or _properties(r).get("rules")]
    if not suite:
        return
    terminalreporter.section("rerouting conformance")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rules = _properties(rep).get("rules", [])
        terminalreporter.write_line(f"SKIPPED {rep.nodeid} [{', '.join(rules)}]: {reason}")
    for rep in failed:
        props = _properties(rep)
        failure = props.get("failure") or report.parse_marker(getattr(rep, "longreprtext", ""))
        broken = failure.get("rule") or failure.get("capability") or failure.get("type", "error")
        terminalreporter.write_line(
            f"FAILED {rep.nodeid} [{', '.join(props.get('rules', []))}]: broke {broken}"
        )
