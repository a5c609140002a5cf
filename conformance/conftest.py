"""Registers the suite's pytest plugin when pytest is pointed at this folder (``pytest conformance/``).

The plugin lives in :mod:`rerouting.conformance.plugin` so that ``pytest -p rerouting.conformance.plugin
--pyargs rerouting.conformance`` (or a ``pytest11`` entry point) can load it before options are
parsed; registering it here too would add every option twice, hence the check.
"""

from __future__ import annotations

from rerouting.conformance import plugin


def pytest_addhooks(pluginmanager) -> None:
    if not any(p is plugin for p in pluginmanager.get_plugins()):
        pluginmanager.register(plugin, "rerouting.conformance.plugin")
