"""[budget.avg-tokens] The matched-budget solver of ``rerouting audit``: solved and schedule-identical
schedules, and the default checks against the release's hand-solved ratios (research/reroute.md §5.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import nominal_visual_counts, schedule_trace
from rerouting.reference.flops import avg_visual_tokens
from rerouting.reference.presets import PRESETS
from rerouting.reference.schedule import RoutingConfig, RoutingError, Schedule
from rerouting.reference.solver import solve_keep_ratios, solve_scale

from .common import LABEL_TOLERANCE
from .inputs import AuditError, AuditSchedule, from_preset

# The release's matched-budget shapes, checked by the default audit (research/reroute.md §5.2).
DEFAULT_SOLVES: tuple[tuple[str, tuple[int, ...], tuple[float, ...] | str, str], ...] = (
    ("ours_vs_pdrop", (2, 7, 15, 23), (1.0, 1.0, 0.5, 0.25), "ours_vs_pdrop_avg{tier}"),
    ("pdrop_earlyL2", (2, 7, 15, 23), "geometric", "pdrop_earlyL2_avg{tier}"),
    ("fastv_K3", (3,), "flat", "fastv_K3_avg{tier}"),
)
DEFAULT_IDENTICAL = ("fastv_K3_avg{tier}", (7, 15, 23), "ours_vs_fastv_avg{tier}")
# The same checks at the release's Qwen2.5-VL-7B layers, against its qwen25vl_* presets (on a Qwen model).
QWEN_DEFAULT_SOLVES: tuple[tuple[str, tuple[int, ...], tuple[float, ...] | str, str], ...] = (
    ("qwen25vl_ours_vs_pdrop", (2, 6, 13, 20), (1.0, 1.0, 0.5, 0.25), "qwen25vl_ours_vs_pdrop_avg{tier}"),
    ("qwen25vl_pdrop_earlyL2", (2, 6, 13, 20), "geometric", "qwen25vl_pdrop_earlyL2_avg{tier}"),
    ("qwen25vl_fastv_K3", (3,), "flat", "qwen25vl_fastv_K3_avg{tier}"),
)
QWEN_DEFAULT_IDENTICAL = ("qwen25vl_fastv_K3_avg{tier}", (6, 13, 20), "qwen25vl_ours_vs_fastv_avg{tier}")


def _native_policy(layers: Sequence[int], shape: Any) -> str:
    """Solved schedules: one decision or a geometric (PDrop) shape prune; several decisions reroute."""
    return "remove" if len(layers) == 1 or shape == "geometric" else "reroute"


def _solve_ratios(
    layers: Sequence[int],
    shape: tuple[float, ...] | str,
    target: float,
    *,
    arch: ArchSpec,
    num_visual: int,
    decimals: int,
) -> tuple[float, list[float], Any]:
    """The scale, the unrounded ratios and the solver's result (rounded ratios, nominal and realized avg_T)."""
    weights: tuple[float, ...] | str = (1.0,) * len(layers) if shape == "flat" else shape
    if not isinstance(weights, str) and len(weights) != len(layers):
        raise AuditError(
            f"--shape {','.join(f'{w:g}' for w in weights)} has {len(weights)} weights but --layers "
            f"{','.join(map(str, layers))} has {len(layers)} decision layers"
        )
    try:
        scale = solve_scale(layers, weights, target, num_visual=num_visual, num_layers=arch.num_layers)
        solved = solve_keep_ratios(
            layers, weights, target, num_visual=num_visual, num_layers=arch.num_layers, decimals=decimals
        )
    except RoutingError as error:
        raise AuditError(
            f"--target-avg {target:g} with --layers {','.join(map(str, layers))}: {error}"
        ) from None
    if weights == "geometric":
        unrounded = [scale ** (s + 1) for s in range(len(layers))]
    else:
        unrounded = [scale * w for w in weights]
    if any(r <= 0 for r in solved.ratios):
        raise AuditError(
            f"--decimals {decimals}: rounding the solved ratios {[f'{r:.6f}' for r in unrounded]} gives 0; "
            "use more decimals"
        )
    return scale, unrounded, solved


def _release_ratios(name: str, ratios: Sequence[float], arch: ArchSpec, num_visual: int) -> dict:
    """The release preset a solve reproduces: its ratios and avg_T, and whether the solver found the same."""
    preset = PRESETS[name]
    preset_trace = schedule_trace(preset, num_text=1, num_visual=num_visual, num_layers=arch.num_layers)
    return {
        "name": name,
        "ratios": list(preset.schedule.keep),
        "avg_visual_tokens": {
            "nominal": avg_visual_tokens(nominal_visual_counts(preset, num_visual, arch.num_layers)),
            "realized": avg_visual_tokens(preset_trace.samples[0].layer_visual_counts),
        },
        "same_ratios": tuple(preset.schedule.keep) == tuple(ratios),
    }


def solve(
    layers: Sequence[int],
    shape: tuple[float, ...] | str,
    target: float,
    *,
    arch: ArchSpec,
    num_visual: int,
    decimals: int,
    family: str | None = None,
    release_preset: str | None = None,
) -> tuple[dict, AuditSchedule]:
    """[budget.avg-tokens] Keep ratios for ``target`` avg_T, with the integer rounding reported.

    ``shape`` is ``"flat"``, ``"geometric"`` or relative weights. Returns the JSON record (unrounded
    scale and ratios, rounded ratios, integer k, nominal and realized avg_T, deviation from the target)
    and the solved schedule, ready to audit.
    """
    scale, unrounded, solved = _solve_ratios(
        layers, shape, target, arch=arch, num_visual=num_visual, decimals=decimals
    )
    policy = _native_policy(layers, shape)
    config = RoutingConfig(Schedule(tuple(layers), solved.ratios), policy=policy)  # type: ignore[arg-type]
    trace = schedule_trace(config, num_text=1, num_visual=num_visual, num_layers=arch.num_layers)
    shape_name = shape if isinstance(shape, str) else ",".join(f"{w:g}" for w in shape)
    name = f"solved_{family or shape_name.replace(',', '-')}_avg{target:g}"
    record = {
        "kind": "matched",
        "name": name,
        "family": family,
        "layers": list(layers),
        "shape": shape if isinstance(shape, str) else list(shape),
        "target_avg": target,
        "scale_name": "lambda" if shape == "geometric" else "alpha",
        "scale": scale,
        "decimals": decimals,
        "ratios_unrounded": unrounded,
        "ratios": list(solved.ratios),
        "k": [d.k for d in trace.samples[0].decisions],
        "k_nominal": [num_visual * r for r in solved.ratios],
        "avg_visual_tokens": {"nominal": solved.nominal_avg, "realized": solved.realized_avg},
        "realized_deviation": solved.realized_avg / target - 1.0,
        "flagged": abs(solved.realized_avg / target - 1.0) > LABEL_TOLERANCE,
        "native_policy": policy,
        "release_preset": None,
    }
    if release_preset is not None and release_preset in PRESETS:
        record["release_preset"] = _release_ratios(release_preset, solved.ratios, arch, num_visual)
    schedule = AuditSchedule(
        name=name,
        config=config,
        source="solver",
        origin=f"solved: layers {list(layers)}, shape {shape_name}, target avg_T {target:g}, {decimals} decimals",
        label=target,
        label_source="solver target",
    )
    return record, schedule


def _identical_config(
    base: Schedule, layers: tuple[int, ...], base_counts: Sequence[int], *, arch: ArchSpec, num_visual: int
) -> tuple[RoutingConfig, str, Any]:
    """The reroute config at ``layers`` with the baseline's counts: its keep values, else its realized counts.

    Returns the config, the mode that was used, and the config's trace.
    """

    def keep_of(layer: int) -> float:
        stage = base.stage_of(layer)
        if stage is None:
            return 1.0 if base.unit == "ratio" else num_visual
        return base.keep[stage]

    config = RoutingConfig(
        Schedule(layers, tuple(keep_of(layer) for layer in layers), base.unit), policy="reroute"
    )
    mode = "same keep values"
    counts = schedule_trace(config, num_text=1, num_visual=num_visual, num_layers=arch.num_layers)
    if counts.samples[0].layer_visual_counts != base_counts:
        config = RoutingConfig(
            Schedule(layers, tuple(base_counts[layer] for layer in layers), "count"), "reroute"
        )
        mode = "baseline's realized counts as absolute keep counts"
        counts = schedule_trace(config, num_text=1, num_visual=num_visual, num_layers=arch.num_layers)
    return config, mode, counts


def identical_schedule(
    baseline: AuditSchedule, extra: Sequence[int], *, arch: ArchSpec, num_visual: int
) -> tuple[dict, AuditSchedule]:
    """[budget.avg-tokens] Schedule-identical mode: the baseline's per-layer counts, re-scored at ``extra`` too.

    Each new decision keeps the baseline's keep value of the stage it falls in (the release builds
    ``ours_vs_fastv`` from ``fastv_K3`` this way: ratio 0.2644 at layers 3, 7, 15, 23), under reroute.
    If that does not reproduce the baseline's counts (a remove baseline whose pool cap binds), the
    baseline's realized counts are used as absolute keep counts instead. The record says which.
    """
    base = baseline.config.schedule
    bad = [layer for layer in extra if not 0 <= layer < arch.num_layers]
    if bad:
        raise AuditError(
            f"--extra-layers {bad} out of range for {arch.name} with {arch.num_layers} layers (valid: 0..{arch.num_layers - 1})"
        )
    already = sorted(set(extra) & set(base.layers))
    if already:
        raise AuditError(
            f"--extra-layers {already}: already decision layers of {baseline.name} {list(base.layers)}; "
            "extra re-scoring layers must be new ones"
        )
    layers = tuple(sorted(set(base.layers) | set(extra)))
    base_trace = schedule_trace(
        baseline.config, num_text=1, num_visual=num_visual, num_layers=arch.num_layers
    )
    base_counts = base_trace.samples[0].layer_visual_counts

    config, mode, counts = _identical_config(base, layers, base_counts, arch=arch, num_visual=num_visual)
    identical = counts.samples[0].layer_visual_counts == base_counts
    name = f"{baseline.name}+rescore{'-'.join(map(str, sorted(set(extra) - set(base.layers))))}"
    record = {
        "kind": "identical",
        "name": name,
        "baseline": baseline.name,
        "extra_layers": sorted(set(extra)),
        "layers": list(layers),
        "keep": list(config.schedule.keep),
        "unit": config.schedule.unit,
        "mode": mode,
        "identical_counts": identical,
        "visual_counts": list(counts.samples[0].layer_visual_counts),
        "avg_visual_tokens": {
            "nominal": avg_visual_tokens(nominal_visual_counts(config, num_visual, arch.num_layers)),
            "realized": avg_visual_tokens(counts.samples[0].layer_visual_counts),
        },
        "native_policy": "reroute",
        "release_preset": None,
    }
    schedule = AuditSchedule(
        name=name,
        config=config,
        source="identical",
        origin=f"{baseline.name} with extra re-scoring decisions at {sorted(set(extra))}",
        label=baseline.label,
        label_source="baseline" if baseline.label is not None else None,
    )
    return record, schedule


def default_solves(
    arch: ArchSpec, num_visual: int, decimals: int, *, qwen: bool = False
) -> tuple[list[dict], list[str]]:
    """The release's solver checks at the 192/128/64 tiers (scaled by N/576), where the layers fit.

    ``qwen``: at the release's Qwen2.5-VL layers, against its ``qwen25vl_*`` presets.
    """
    records: list[dict] = []
    notes: list[str] = []
    tiers = (192, 128, 64)
    plan, identical = (
        (QWEN_DEFAULT_SOLVES, QWEN_DEFAULT_IDENTICAL) if qwen else (DEFAULT_SOLVES, DEFAULT_IDENTICAL)
    )
    for family, layers, shape, preset_name in plan:
        if layers[-1] >= arch.num_layers:
            notes.append(
                f"solver check {family} skipped: layers {list(layers)} do not fit {arch.num_layers} layers"
            )
            continue
        for tier in tiers:
            target = tier * num_visual / 576
            try:
                record, _ = solve(
                    layers,
                    shape,
                    target,
                    arch=arch,
                    num_visual=num_visual,
                    decimals=decimals,
                    family=family,
                    release_preset=preset_name.format(tier=tier) if num_visual == 576 else None,
                )
            except AuditError as error:
                notes.append(f"solver check {family} at avg_T {target:g}: {error}")
                continue
            records.append(record)
    baseline_name, extra, twin = identical
    if max(extra) < arch.num_layers:
        for tier in tiers:
            baseline = from_preset(baseline_name.format(tier=tier))
            record, _ = identical_schedule(baseline, extra, arch=arch, num_visual=num_visual)
            twin_config = PRESETS[twin.format(tier=tier)]
            record["release_preset"] = {
                "name": twin.format(tier=tier),
                "layers": list(twin_config.schedule.layers),
                "keep": list(twin_config.schedule.keep),
                "same_schedule": tuple(twin_config.schedule.layers) == tuple(record["layers"])
                and tuple(twin_config.schedule.keep) == tuple(record["keep"]),
            }
            records.append(record)
    return records, notes
