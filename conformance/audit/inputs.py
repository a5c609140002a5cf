"""Inputs of ``rerouting audit``: the schedules (``--schedule``; the architecture is models.py) and the
solver's arguments, parsed and validated with errors that name the bad value and the valid choices.

Every user error raises :class:`AuditError`; ``audit.main`` turns it into a one-line message and exit
status 2. Nothing here prints.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rerouting.reference.archs import ArchSpec
from rerouting.reference.presets import PRESETS
from rerouting.reference.schedule import (
    POLICIES,
    RoutingConfig,
    RoutingError,
    Schedule,
    Scorer,
)

# The Reroute release's LLaVA-1.5 schedules (research/reroute.md §5.2), in the order they are reported.
RELEASE_FAMILIES: tuple[str, ...] = ("fastv_K3", "ours_vs_fastv", "pdrop_earlyL2", "ours_vs_pdrop")
RELEASE_TIERS: tuple[int, ...] = (192, 128, 64)
RELEASE_SCHEDULES: tuple[str, ...] = tuple(
    f"{family}_avg{tier}" for tier in RELEASE_TIERS for family in RELEASE_FAMILIES
)
QWEN_RELEASE_SCHEDULES: tuple[str, ...] = tuple(f"qwen25vl_{name}" for name in RELEASE_SCHEDULES)
# Names that stand for several presets at once ('release' on a Qwen model: the Qwen ones, hosts.py).
SCHEDULE_GROUPS: dict[str, tuple[str, ...]] = {
    "release": RELEASE_SCHEDULES,
    "qwen25vl_release": QWEN_RELEASE_SCHEDULES,
    "all": (*RELEASE_SCHEDULES, *sorted(set(PRESETS) - set(RELEASE_SCHEDULES))),
}
FILE_KEYS: tuple[str, ...] = ("name", "label", "layers", "keep", "unit", "policy", "scorer")
SCORER_KEYS: tuple[str, ...] = ("kind", "probe_layer", "query", "seed")
KV_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# A label in a schedule name: "..._avg64", "avg192", "ours-avg128.5".
_LABEL_IN_NAME = re.compile(r"avg(\d+(?:\.\d+)?)(?![\d.])")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.+\-=]+$")


class AuditError(ValueError):
    """A user input the audit cannot use; the message names the value, the option and the valid choices."""


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSchedule:
    """One schedule to audit.

    Attributes:
        name: the name the report uses (unique within an audit).
        config: schedule, native policy and scorer.
        source: ``"preset"``, ``"file"``, ``"solver"`` or ``"identical"`` (schedule-identical mode).
        origin: the preset name, the file path, or how the solver made it.
        label: the avg_T the schedule claims (from the name's ``avgNN``, a file's ``label``, or the
            solver's target); ``None`` when it claims nothing.
        label_source: where ``label`` came from.
        notes: free-text remarks shown in the report.
    """

    name: str
    config: RoutingConfig
    source: str
    origin: str
    label: float | None = None
    label_source: str | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        schedule, scorer = self.config.schedule, self.config.scorer
        return {
            "name": self.name,
            "source": self.source,
            "origin": self.origin,
            "layers": list(schedule.layers),
            "keep": list(schedule.keep),
            "unit": schedule.unit,
            "native_policy": self.config.policy,
            "scorer": {
                "kind": scorer.kind,
                "probe_layer": scorer.probe_layer,
                "query": scorer.query,
                "seed": scorer.seed,
            },
            "label": self.label,
            "label_source": self.label_source,
            "notes": list(self.notes),
        }


def label_from_name(name: str) -> float | None:
    """The avg_T a name claims (``fastv_K3_avg64`` → 64.0), or None."""
    found = _LABEL_IN_NAME.findall(name)
    return float(found[-1]) if found else None


def from_preset(name: str) -> AuditSchedule:
    config = PRESETS[name]
    label = label_from_name(name)
    return AuditSchedule(
        name=name,
        config=config,
        source="preset",
        origin=name,
        label=label,
        label_source="name" if label is not None else None,
    )


def _schedule_error(where: str, message: str) -> AuditError:
    return AuditError(f"--schedule {where}: {message}")


def _parse_entry(entry: Any, where: str, default_name: str) -> AuditSchedule:
    if not isinstance(entry, dict):
        raise _schedule_error(where, f"expected a mapping with keys {list(FILE_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(FILE_KEYS))
    if unknown:
        raise _schedule_error(where, f"unknown key(s) {unknown}; valid keys: {', '.join(FILE_KEYS)}")
    missing = [key for key in ("layers", "keep") if key not in entry]
    if missing:
        raise _schedule_error(where, f"missing key(s) {missing}; a schedule needs 'layers' and 'keep'")
    name = str(entry.get("name", default_name))
    if not _NAME_OK.match(name):
        raise _schedule_error(where, f"name {name!r} may only use letters, digits and _ . + - =")
    layers, keep = entry["layers"], entry["keep"]
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    keep = list(keep) if isinstance(keep, (list, tuple)) else [keep]
    unit = entry.get("unit", "ratio")
    policy = entry.get("policy", "reroute")
    if policy not in POLICIES:
        raise _schedule_error(where, f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    scorer_args = entry.get("scorer") or {}
    if not isinstance(scorer_args, dict):
        raise _schedule_error(where, f"scorer must be a mapping with keys {list(SCORER_KEYS)}")
    bad = sorted(set(scorer_args) - set(SCORER_KEYS))
    if bad:
        raise _schedule_error(where, f"unknown scorer key(s) {bad}; valid keys: {', '.join(SCORER_KEYS)}")
    try:
        config = RoutingConfig(
            Schedule(tuple(layers), tuple(keep), unit), policy=policy, scorer=Scorer(**scorer_args)
        )
    except (RoutingError, TypeError) as error:
        raise _schedule_error(where, str(error)) from None
    label, label_source = None, None
    if entry.get("label") is not None:
        label = entry["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not label > 0:
            raise _schedule_error(where, f"label {label!r} is not a positive number of visual tokens")
        label, label_source = float(label), "file"
    elif (label := label_from_name(name)) is not None:
        label_source = "name"
    return AuditSchedule(name, config, "file", where, label, label_source)


def load_schedule_file(path: Path) -> list[AuditSchedule]:
    """Schedules from a YAML or JSON file: one mapping, a list of mappings, or ``{schedules: [...]}``.

    Keys of a mapping: ``layers`` (decision layers), ``keep`` (one value per layer), ``unit``
    (``ratio``, default, or ``count``), ``policy`` (``reroute``, default, or ``remove``), and the
    optional ``name`` (default: the file's stem, ``stem-i`` for the i-th of several), ``label``
    (the avg_T the schedule claims) and ``scorer`` (``kind``, ``probe_layer``, ``query``, ``seed``).
    """
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise _schedule_error(where, f"cannot read the file: {error.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as error:
        raise _schedule_error(where, f"not valid JSON: {error}") from None
    except Exception as error:  # yaml.YAMLError and its subclasses
        raise _schedule_error(where, f"not valid YAML: {' '.join(str(error).split())}") from None
    if isinstance(data, dict) and "schedules" in data:
        if set(data) != {"schedules"} or not isinstance(data["schedules"], list):
            raise _schedule_error(where, "a file with 'schedules' must hold only that key, a list")
        data = data["schedules"]
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise _schedule_error(where, "the file holds no schedule")
    stem = re.sub(r"[^A-Za-z0-9_.+\-=]", "_", path.stem)
    return [
        _parse_entry(
            entry,
            where if len(entries) == 1 else f"{where}[{i}]",
            stem if len(entries) == 1 else f"{stem}-{i}",
        )
        for i, entry in enumerate(entries)
    ]


def resolve_schedules(
    values: Sequence[str], option: str = "--schedule", groups: dict[str, tuple[str, ...]] | None = None
) -> list[AuditSchedule]:
    """Every ``--schedule`` value: a preset name, a group (``release``, ``all``) or a YAML/JSON file.

    ``option`` is the command-line option the values came from, for the error message; ``groups`` the
    groups by name (default ``SCHEDULE_GROUPS``; ``hosts.schedule_groups`` for the model's own release).
    """
    groups = SCHEDULE_GROUPS if groups is None else groups
    found: list[AuditSchedule] = []
    for value in values:
        if value in PRESETS:
            found.append(from_preset(value))
        elif value in groups:
            found.extend(from_preset(name) for name in groups[value])
        elif Path(value).expanduser().is_file():
            found.extend(load_schedule_file(Path(value).expanduser()))
        else:
            looks_like_file = value.lower().endswith((".yaml", ".yml", ".json")) or "/" in value
            what = "no such file" if looks_like_file else "not a preset, a group or an existing file"
            raise AuditError(
                f"{option} {value!r}: {what}; valid presets: {', '.join(sorted(PRESETS))}; groups: "
                f"{', '.join(SCHEDULE_GROUPS)}; or a .yaml/.json schedule file"
            )
    check_unique(found)
    return found


def check_unique(schedules: Sequence[AuditSchedule]) -> None:
    seen: set[str] = set()
    for schedule in schedules:
        if schedule.name in seen:
            raise AuditError(f"--schedule: the name {schedule.name!r} is given twice; names must be unique")
        seen.add(schedule.name)


def check_fits(schedules: Sequence[AuditSchedule], arch: ArchSpec, num_visual: int) -> None:
    """[schedule.decision-layers] [schedule.keep-count] Every schedule must fit the host and N."""
    for schedule in schedules:
        sched = schedule.config.schedule
        try:
            sched.check_layers(arch.num_layers)
            for stage in range(sched.num_decisions):
                sched.keep_count(stage, num_visual)
        except RoutingError as error:
            where = f" (--schedule {schedule.origin})" if schedule.source == "file" else ""
            raise AuditError(
                f"schedule {schedule.name!r}{where} does not fit {arch.name} with N={num_visual}: {error}"
            ) from None


# ---------------------------------------------------------------------------------------------
# Small parsers for option values
# ---------------------------------------------------------------------------------------------


def parse_layers(value: str, option: str) -> tuple[int, ...]:
    """``"2,7,15,23"`` → ``(2, 7, 15, 23)``; the schedule rules check order and range later."""
    parts = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        raise AuditError(
            f"{option} {value!r}: expected comma-separated decoder layer indices such as 2,7,15,23"
        ) from None
    if not layers:
        raise AuditError(f"{option} {value!r}: expected at least one decoder layer index")
    return layers


def parse_shape(value: str) -> tuple[float, ...] | str:
    """``--shape``: ``flat`` (one ratio everywhere), ``geometric`` (λ, λ², ...), or relative weights ``1,1,0.5,0.25``."""
    if value in ("flat", "geometric", "identical"):
        return value
    parts = [p.strip() for p in value.split(",") if p.strip()]
    try:
        shape = tuple(float(p) for p in parts)
    except ValueError:
        raise AuditError(
            f"--shape {value!r}: expected 'flat', 'geometric' or comma-separated positive weights such as 1,1,0.5,0.25"
        ) from None
    if not shape or any(not (math.isfinite(c) and c > 0) for c in shape):
        raise AuditError(f"--shape {value!r}: every weight must be a positive finite number")
    return shape
