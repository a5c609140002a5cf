"""Units and cells shared by the writers of ``rerouting audit`` (stdout, report.md, report.tex).

Units: T = 1e12 (G, M for small models), MiB = 2**20 bytes (KiB for tiny models).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

T = 1e12
G = 1e9
MiB = 2**20
KiB = 2**10
CONVENTION_TITLES = {"true": "true", "fastv": "FastV", "pdrop": "PDrop", "nuwa": "Nüwa"}
CONVENTION_UNITS = {"true": "FLOPs", "fastv": "MACs", "pdrop": "MACs", "nuwa": "FLOPs"}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def flops_unit(report: dict) -> tuple[float, str]:
    """The FLOP prefix of every table of a report, from its dense decoder count: T, G, M or k."""
    dense = report["dense"]["flops"]["true"]
    for scale, prefix in ((T, "T"), (G, "G"), (1e6, "M")):
        if dense >= scale:
            return scale, prefix
    return 1e3, "k"


def bytes_unit(report: dict) -> tuple[int, str]:
    """The byte unit of every KV table of a report: MiB, or KiB for tiny models."""
    return (MiB, "MiB") if report["dense"]["kv"]["bytes"] >= 10 * MiB else (KiB, "KiB")


def fp(report: dict) -> str:
    """'T', 'G', ...: the FLOP prefix, for headers ("TFLOPs", "T MACs")."""
    return flops_unit(report)[1]


def bu(report: dict) -> str:
    return bytes_unit(report)[1]


def fl(report: dict, value: int | float) -> str:
    return f"{value / flops_unit(report)[0]:.3f}"


def by(report: dict, value: int | float) -> str:
    return f"{value / bytes_unit(report)[0]:.1f}"


def pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def fmt_bytes(value: int) -> str:
    if value >= MiB:
        return f"{value / MiB:.1f} MiB"
    if value >= KiB:
        return f"{value / KiB:g} KiB"
    return f"{value} B"


def fmt_num(value: float) -> str:
    return f"{value:g}"


def rows(report: dict) -> Iterable[tuple[dict, dict]]:
    """(schedule, run) pairs in report order."""
    for schedule in report["schedules"]:
        for run in schedule["runs"]:
            yield schedule, run


def policy_cell(run: dict) -> str:
    return run["policy"] + ("*" if run.get("native") else "")


def flagged(run: dict) -> bool:
    return bool(run.get("label_check") and run["label_check"]["flagged"])


def label_cell(schedule: dict) -> str:
    return "–" if schedule.get("label") is None else fmt_num(schedule["label"])


def keep_cell(values: Sequence[float], unit: str) -> str:
    if unit == "count":
        return ", ".join(str(int(v)) for v in values) + " tokens"
    return ", ".join(f"{v:g}" for v in values)


def stage_lengths(layers: Sequence[int], num_layers: int) -> list[int]:
    bounds = [*layers, num_layers]
    return [b - a for a, b in itertools.pairwise(bounds)]


def md_table(header: Sequence[str], body: Iterable[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)
