"""Per-host example counts of the report: how many drawn examples ran on each host family.

``oracle.run_check`` counts each example under its case's family (``report.count_example(host=...)``);
a family the implementation does not take (its ``hosts`` attribute) is not drawn, and the report says why.
"""

from __future__ import annotations

from typing import Any


def host_counts(results: list, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per host family: the examples drawn on it, the tests that drew it, and why it was not drawn (if so)."""
    out: dict[str, dict[str, Any]] = {
        family: {"examples": 0, "tests": 0} for family in meta.get("hosts_drawn", ())
    }
    for family, reason in dict(meta.get("hosts_skipped") or {}).items():
        out[family] = {"examples": 0, "tests": 0, "skipped": reason}
    for result in results:
        for family, count in result.hosts.items():
            entry = out.setdefault(family, {"examples": 0, "tests": 0})
            entry["examples"] += count
            entry["tests"] += 1 if count else 0
    return out


def host_line(summary: dict[str, Any]) -> list[str]:
    hosts = summary.get("hosts") or {}
    if not hosts:
        return []
    parts = [
        f"{family} {entry['examples']} examples in {entry['tests']} tests"
        + (f" (not drawn: {entry['skipped']})" if entry.get("skipped") else "")
        for family, entry in hosts.items()
    ]
    return [f"- hosts (drawn cases): {'; '.join(parts)}"]
