"""Progress of a conformance run: one line per finished test module, through pytest's terminal reporter.

A redrawn bar does not fit pytest's output (its dots, and CI logs that keep every ``\\r``), so each line says
where the run stands when a module finishes: modules done, rules checked so far (a rule counts once a test
naming it passed), examples run, elapsed time and an estimate of what is left (remaining tests at the mean
time per finished test; times formatted by tqdm).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import pytest
from tqdm import tqdm

from .rules import rules_of, spec_rules


class Progress:
    """A pytest plugin object (registered by the suite's plugin on the controlling process only)."""

    def __init__(self, config: pytest.Config, is_suite_item: Callable[[pytest.Item], bool]):
        self.config, self.is_suite_item = config, is_suite_item
        self.started = time.monotonic()
        self.pending: dict[str, set[str]] = {}  # test module -> node ids not finished yet
        self.rules: dict[str, tuple[str, ...]] = {}  # node id -> rules it names
        self.total = 0
        self.finished = 0
        self.examples = 0
        self.checked: set[str] = set()
        self.rules_total = len(spec_rules())

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        modules: dict[str, set[str]] = defaultdict(set)
        for item in session.items:
            if not self.is_suite_item(item):
                continue
            module = item.nodeid.split("::")[0]
            modules[module].add(item.nodeid)
            self.rules[item.nodeid] = tuple(rules_of(item.function)) if hasattr(item, "function") else ()
        self.pending, self.total = dict(modules), sum(len(ids) for ids in modules.values())

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        properties = dict(getattr(report, "user_properties", ()))
        if report.when == "call":
            self.examples += int(properties.get("examples", 0))
            if report.passed:
                self.checked.update(self.rules.get(report.nodeid, ()))
        if report.when != "teardown":
            return
        module = report.nodeid.split("::")[0]
        ids = self.pending.get(module)
        if ids is None or report.nodeid not in ids:
            return
        ids.discard(report.nodeid)
        self.finished += 1
        if not ids:
            self._line(module)

    def _line(self, module: str) -> None:
        elapsed = time.monotonic() - self.started
        left = elapsed / self.finished * (self.total - self.finished)
        done = sum(1 for ids in self.pending.values() if not ids)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        reporter.write_line(
            f"conformance: {module.rsplit('/', 1)[-1]} done ({done}/{len(self.pending)} modules, "
            f"{self.finished}/{self.total} tests): rules checked {len(self.checked)}/{self.rules_total}, "
            f"examples {self.examples}, elapsed {tqdm.format_interval(elapsed)}, "
            f"about {tqdm.format_interval(left)} left"
        )
