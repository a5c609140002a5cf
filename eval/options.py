"""[eval.model-args] The ``--model_args`` of the ``rerouting`` lmms-eval model, checked before any weight loads.

``schedule`` is a preset name, a YAML/JSON schedule file (the audit's format, docs/audit.md), ``solve``
(the matched-budget solver: ``target_avg``, ``layers``, ``shape``) or ``none`` (the unrouted model).
Lists inside a model argument are written with ``/`` (``layers=2/7/15/23``): lmms-eval splits the
argument string at commas. Every error names the argument and its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rerouting.conformance.audit.inputs import AuditError, load_schedule_file
from rerouting.reference import PRESETS, RoutingConfig, RoutingError, Schedule
from rerouting.reference.schedule import POLICIES
from rerouting.reference.solver import solve_keep_ratios

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = ("flat", "geometric")


def model_args_error(message: str) -> RoutingError:
    return RoutingError("eval.model-args", message)


@dataclass(frozen=True)
class Routing:
    """What ``schedule`` / ``policy`` resolved to: the config (None: unrouted) and a name for the logs."""

    config: RoutingConfig | None
    name: str


def resolve_routing(
    schedule: str | None,
    policy: str | None,
    *,
    num_visual: int | None,
    num_layers: int,
    target_avg: float | None = None,
    layers: str | None = None,
    shape: str | None = None,
) -> Routing:
    """[eval.model-args] ``schedule=`` and ``policy=`` (and the solver's arguments) as a routing config.

    A preset or file keeps its own policy unless ``policy`` is given; ``solve`` defaults to ``reroute``.
    ``num_visual`` is the N the solver's target refers to (LLaVA: the model's own; Qwen: ``visual=``).
    """
    if policy is not None and policy not in POLICIES:
        raise model_args_error(f"policy={policy!r} is not one of {', '.join(POLICIES)}")
    solver_args = {"target_avg": target_avg, "layers": layers, "shape": shape}
    if schedule != "solve":
        given = [key for key, value in solver_args.items() if value is not None]
        if given:
            raise model_args_error(
                f"{', '.join(given)} apply to schedule=solve only, not schedule={schedule!r}"
            )
    if schedule is None:
        raise model_args_error(
            "schedule is required: a preset name, a .yaml/.json schedule file, 'solve' or 'none' (unrouted)"
        )
    if schedule == "none":
        if policy is not None:
            raise model_args_error(
                f"policy={policy!r} with schedule='none': the unrouted model has no policy"
            )
        return Routing(None, "none")
    if schedule == "solve":
        config = _solved(target_avg, layers, shape, num_visual, num_layers, policy or "reroute")
        name = f"solve_avg{target_avg:g}"
    elif schedule in PRESETS:
        config, name = PRESETS[schedule], schedule
    elif Path(schedule).expanduser().is_file():
        try:
            entries = load_schedule_file(Path(schedule).expanduser())
        except AuditError as error:
            raise model_args_error(f"schedule={schedule!r}: {error}") from None
        if len(entries) != 1:
            raise model_args_error(
                f"schedule={schedule!r} holds {len(entries)} schedules; give a file with one"
            )
        config, name = entries[0].config, entries[0].name
    else:
        raise model_args_error(
            f"schedule={schedule!r} is not a preset, an existing schedule file, 'solve' or 'none'; "
            f"valid presets: {', '.join(sorted(PRESETS))}"
        )
    if policy is not None:
        config = config.with_policy(policy)  # type: ignore[arg-type]
    try:
        config.schedule.check_layers(num_layers)
    except RoutingError as error:
        raise model_args_error(f"schedule={schedule!r} does not fit this model: {error}") from None
    return Routing(config, f"{name}/{config.policy}")


def _solved(
    target_avg: float | None,
    layers: str | None,
    shape: str | None,
    num_visual: int | None,
    num_layers: int,
    policy: str,
) -> RoutingConfig:
    """[eval.model-args] The solver's schedule: keep ratios whose nominal avg_T is ``target_avg`` at N."""
    if isinstance(target_avg, bool) or not isinstance(target_avg, (int, float)) or not target_avg > 0:
        raise model_args_error(f"schedule=solve needs target_avg=<visual tokens > 0>, got {target_avg!r}")
    if layers is None:
        raise model_args_error(
            "schedule=solve needs layers=<decision layers separated by '/'>, e.g. 2/7/15/23"
        )
    decision = parse_list(layers, "layers", int)
    weights: tuple[float, ...] | str
    shape = "flat" if shape is None else str(shape)
    if shape == "flat":
        weights = (1.0,) * len(decision)
    elif shape == "geometric":
        weights = "geometric"
    else:
        weights = parse_list(shape, "shape", float)
    if num_visual is None:
        raise model_args_error(
            "schedule=solve on a model whose N depends on the image (Qwen2.5-VL) needs visual=<N the target "
            "refers to>, e.g. visual=576"
        )
    try:
        solved = solve_keep_ratios(
            decision, weights, float(target_avg), num_visual=num_visual, num_layers=num_layers, policy=policy
        )
    except RoutingError as error:
        raise model_args_error(
            f"schedule=solve target_avg={target_avg!r} layers={layers!r}: {error}"
        ) from None
    return RoutingConfig(Schedule(tuple(decision), solved.ratios), policy=policy)  # type: ignore[arg-type]


def parse_list(value, name: str, kind: type) -> tuple:
    """``"2/7/15/23"`` (or one number) as a tuple of ``kind``; an error names the argument otherwise."""
    parts = [p for p in str(value).split("/") if p.strip()]
    try:
        items = tuple(kind(p) for p in parts)
    except ValueError:
        raise model_args_error(
            f"{name}={value!r}: expected {kind.__name__} values separated by '/', e.g. 2/7/15/23"
        ) from None
    if not items:
        raise model_args_error(f"{name}={value!r}: expected at least one value")
    return items


def resolve_dtype(value: str) -> torch.dtype:
    """``dtype=`` as a torch dtype."""
    if value not in DTYPES:
        raise model_args_error(f"dtype={value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[value]


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise model_args_error(f"{name}={value!r} is not an integer >= 1")
    return value
