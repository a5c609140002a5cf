"""The computations of ``rerouting audit`` (imported by ``audit.main`` after the options are parsed).

Every count comes from a Trace (``schedule_trace`` for the real-size architecture, the reference router
for the tiny model) through ``budget_from_trace`` ([budget.active-counts]); the result is one JSON-ready
dict (schema: docs/audit.md) that the writers in ``audit_report`` and ``audit_plots`` render.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace, nominal_visual_counts, schedule_trace
from rerouting.reference.flops import avg_visual_tokens, kv_decode_growth, kv_entry_bytes
from rerouting.reference.schedule import PRESETS, RoutingConfig, RoutingError, Schedule
from rerouting.reference.solver import solve_keep_ratios, solve_scale

from .audit import (
    CONVENTIONS,
    DEFAULT_TEXT,
    DEFAULT_VISUAL,
    LABEL_TOLERANCE,
    SCHEMA_VERSION,
    Progress,
)
from .audit_inputs import (
    KV_DTYPES,
    AuditError,
    AuditSchedule,
    ModelInfo,
    check_fits,
    check_unique,
    from_preset,
    parse_layers,
    parse_shape,
    resolve_model,
    resolve_schedules,
)

# How each convention counts, with its source (spec/budget.md). Units: "FLOPs" = 2 per multiply-add.
CONVENTION_INFO: dict[str, dict[str, str]] = {
    "true": {
        "rule": "budget.flops.true",
        "title": "true count",
        "unit": "FLOPs (2 per multiply-add)",
        "tokens": "text + active visual, n_l = M + n_vis(l)",
        "formula": "2n·d·(H + 2H_kv)·hd + 2n·H·hd·d + 4n²·H·hd + 6n·d·m, plus bias adds n·out (GQA, SwiGLU, full n×n attention)",
        "source": "design of record §4; counting rules of torch.utils.flop_counter (2 FLOPs per MAC, full SDPA matrix)",
    },
    "fastv": {
        "rule": "budget.flops.fastv",
        "title": "FastV",
        "unit": "multiply-adds (MACs)",
        "tokens": "text + active visual, n_l = M + n_vis(l)",
        "formula": "4n·d² + 2n²·d + 2n·d·m per layer (2 FFN matrices, MHA-sized projections)",
        "source": "FastV, Chen et al., arXiv 2403.06764, §4.2 Eq. 5; its Table 1 'FLOPs(B)' is this sum divided by L",
    },
    "pdrop": {
        "rule": "budget.flops.pdrop",
        "title": "PDrop",
        "unit": "multiply-adds (MACs)",
        "tokens": "active visual only, n = n_vis(l)",
        "formula": "4n·d² + 2n²·d + 3n·d·m per layer (3 FFN matrices, MHA-sized projections)",
        "source": "PyramidDrop, Xing et al., arXiv 2410.17247, §4.1 Eq. 5",
    },
    "nuwa": {
        "rule": "budget.flops.nuwa",
        "title": "Nüwa",
        "unit": "FLOPs (coefficients of 2 per multiply-add)",
        "tokens": "active visual only, n = n_vis(l)",
        "formula": "8n·d² + 4n²·d + 4n·d·m per layer (2 FFN matrices, MHA-sized projections)",
        "source": "Nüwa, arXiv 2602.02951, App. C Eq. 14 (its text says 1 FLOP = 1 MAC; its coefficients are 2·MAC)",
    },
}

# The tiny traced run: decisions at layers 1, 2 and 4 of the 6-layer tiny LLaVA, 16 visual tokens (4×4).
TRACE_SCHEDULE = Schedule((1, 2, 4), (0.5, 0.5, 0.25))
TRACE_MODEL_SEED = 0
TRACE_INPUT_SEED = 1
TRACE_TEXT_RUNS = (5, 3)  # 5 text tokens, the image, 3 text tokens

# The release's matched-budget shapes, checked by the default audit (research/reroute.md §5.2).
DEFAULT_SOLVES: tuple[tuple[str, tuple[int, ...], tuple[float, ...] | str, str], ...] = (
    ("ours_vs_pdrop", (2, 7, 15, 23), (1.0, 1.0, 0.5, 0.25), "ours_vs_pdrop_avg{tier}"),
    ("pdrop_earlyL2", (2, 7, 15, 23), "geometric", "pdrop_earlyL2_avg{tier}"),
    ("fastv_K3", (3,), "flat", "fastv_K3_avg{tier}"),
)
DEFAULT_IDENTICAL = ("fastv_K3_avg{tier}", (7, 15, 23), "ours_vs_fastv_avg{tier}")


# ---------------------------------------------------------------------------------------------
# Budgets of one schedule under one policy
# ---------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reduction(value: int, dense: int) -> float | None:
    return None if dense == 0 else 1.0 - value / dense


def label_check(label: float | None, source: str | None, realized: float, nominal: float) -> dict | None:
    """[budget.avg-tokens] Compare the realized avg_T with the schedule's label; flag a miss above 1 %."""
    if label is None:
        return None
    deviation = realized / label - 1.0
    return {
        "label": label,
        "source": source,
        "realized_deviation": deviation,
        "nominal_deviation": nominal / label - 1.0,
        "tolerance": LABEL_TOLERANCE,
        "flagged": abs(deviation) > LABEL_TOLERANCE,
    }


def audit_run(
    arch: ArchSpec,
    config: RoutingConfig | None,
    *,
    num_visual: int,
    num_text: int,
    kv_dtype: torch.dtype,
    dense: dict | None = None,
) -> dict:
    """[budget.active-counts] The budget of one schedule under one policy (``config=None``: dense).

    The counts come from :func:`schedule_trace` (the real selection code with placeholder scores) through
    :func:`budget_from_trace`: realized and nominal avg_T, the four FLOP conventions, probes per decision,
    LM head, KV entries and bytes; reductions against ``dense`` when given.
    """
    trace = schedule_trace(config, num_text=num_text, num_visual=num_visual, num_layers=arch.num_layers)
    sample_trace = trace.samples[0]
    sample = budget_from_trace(trace, arch, kv_dtype=kv_dtype, config=config).samples[0]
    nominal_counts = nominal_visual_counts(config, num_visual, arch.num_layers)
    decisions = []
    for decision, probe in zip(sample_trace.decisions, sample.probes):
        keep = config.schedule.keep[decision.stage]
        decisions.append(
            {
                "layer": decision.layer,
                "stage": decision.stage,
                "keep": keep,
                "k": decision.k,
                "k_nominal": config.schedule.nominal_keep(decision.stage, num_visual),
                "pool": len(decision.pool),
                "probe_keys": probe.keys,
                "probe_queries": probe.queries,
                "probe_flops": probe.total,
                "probe_flops_by_component": dict(probe.flops),
            }
        )
    flops = {
        "true": sample.flops_true,
        "fastv": sample.macs_fastv,
        "pdrop": sample.macs_pdrop,
        "nuwa": sample.flops_nuwa,
    }
    entries = sample.kv_entries
    run = {
        "policy": trace.policy,
        "native": None,
        "label_check": None,
        "visual_counts": list(sample.visual_counts),
        "visual_counts_nominal": list(nominal_counts),
        "avg_visual_tokens": {
            "realized": sample.avg_visual_tokens,
            "nominal": avg_visual_tokens(nominal_counts),
        },
        "decisions": decisions,
        "flops": flops,
        "flops_true_by_component": sample.flops_true_by_component,
        "fastv_per_layer_average": sample.macs_fastv / arch.num_layers,
        "probe_flops": sample.probe_flops,
        "probe_share_of_decoder": sample.probe_flops / sample.flops_true if sample.flops_true else 0.0,
        "lm_head_flops": sample.lm_head_flops,
        "kv": {
            "dtype": _dtype_name(kv_dtype),
            "entries": entries,
            "entries_per_layer": [layer.kv_entries for layer in sample.layers],
            "bytes": sample.kv_bytes,
            "bytes_by_dtype": {name: entries * kv_entry_bytes(arch, dt) for name, dt in KV_DTYPES.items()},
        },
    }
    if dense is not None:
        run["reduction_vs_dense"] = {
            **{name: _reduction(value, dense["flops"][name]) for name, value in flops.items()},
            "kv_bytes": _reduction(sample.kv_bytes, dense["kv"]["bytes"]),
        }
    return run


def audit_schedule(
    schedule: AuditSchedule,
    arch: ArchSpec,
    policies: Sequence[str],
    *,
    num_visual: int,
    num_text: int,
    kv_dtype: torch.dtype,
    dense: dict,
) -> dict:
    """Every requested policy of one schedule; the native policy is marked."""
    runs = []
    for policy in policies:
        config = schedule.config.with_policy(policy)  # type: ignore[arg-type]
        run = audit_run(
            arch, config, num_visual=num_visual, num_text=num_text, kv_dtype=kv_dtype, dense=dense
        )
        run["native"] = policy == schedule.config.policy
        avg = run["avg_visual_tokens"]
        run["label_check"] = label_check(
            schedule.label, schedule.label_source, avg["realized"], avg["nominal"]
        )
        runs.append(run)
    return {**schedule.to_dict(), "runs": runs}


# ---------------------------------------------------------------------------------------------
# Matched budgets
# ---------------------------------------------------------------------------------------------


def _native_policy(layers: Sequence[int], shape: Any) -> str:
    """Solved schedules: one decision or a geometric (PDrop) shape prune; several decisions reroute."""
    return "remove" if len(layers) == 1 or shape == "geometric" else "reroute"


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
        preset = PRESETS[release_preset]
        preset_trace = schedule_trace(preset, num_text=1, num_visual=num_visual, num_layers=arch.num_layers)
        record["release_preset"] = {
            "name": release_preset,
            "ratios": list(preset.schedule.keep),
            "avg_visual_tokens": {
                "nominal": avg_visual_tokens(nominal_visual_counts(preset, num_visual, arch.num_layers)),
                "realized": avg_visual_tokens(preset_trace.samples[0].layer_visual_counts),
            },
            "same_ratios": tuple(preset.schedule.keep) == tuple(solved.ratios),
        }
    schedule = AuditSchedule(
        name=name,
        config=config,
        source="solver",
        origin=f"solved: layers {list(layers)}, shape {shape_name}, target avg_T {target:g}, {decimals} decimals",
        label=target,
        label_source="solver target",
    )
    return record, schedule


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
    layers = tuple(sorted(set(base.layers) | set(extra)))
    base_trace = schedule_trace(
        baseline.config, num_text=1, num_visual=num_visual, num_layers=arch.num_layers
    )
    base_counts = base_trace.samples[0].layer_visual_counts

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


def default_solves(arch: ArchSpec, num_visual: int, decimals: int) -> tuple[list[dict], list[str]]:
    """The release's solver checks at the 192/128/64 tiers (scaled by N/576), where the layers fit."""
    records: list[dict] = []
    notes: list[str] = []
    tiers = (192, 128, 64)
    for family, layers, shape, preset_name in DEFAULT_SOLVES:
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
    baseline_name, extra, twin = DEFAULT_IDENTICAL
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


# ---------------------------------------------------------------------------------------------
# The traced run on a tiny random LLaVA
# ---------------------------------------------------------------------------------------------


def traced_run(kv_dtype: torch.dtype = torch.float32) -> dict:
    """[budget.active-counts] [budget.kv.entries] One real routed prefill per policy on a tiny random LLaVA.

    Reference implementation (float32, eager attention) on ``rerouting.reference.tiny``'s 6-layer
    LLaVA with a 4×4-patch image (16 visual tokens) between 5 and 3 text tokens, schedule
    ``TRACE_SCHEDULE``. Per stage: the selected, re-admitted, deferred (reroute) or removed (remove)
    visual tokens. Also checks that the model-free trace has the same counts and the real cache the
    trace's lengths.
    """
    from rerouting.reference.routing import Reference
    from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

    config = tiny_llava_config()
    model = tiny_llava(config, seed=TRACE_MODEL_SEED)
    batch = make_batch(config, [SampleSpec(TRACE_TEXT_RUNS)], seed=TRACE_INPUT_SEED)
    arch = ArchSpec.from_model(model, name="tiny-llava")
    side = config.vision_config.image_size // config.vision_config.patch_size
    runs = []
    for policy in ("reroute", "remove"):
        routing = RoutingConfig(TRACE_SCHEDULE, policy=policy)
        result = Reference(model, routing).prefill(**batch)
        sample = result.trace.samples[0]
        measured = [int(result.caches[0].layer_kv(layer)[0].shape[1]) for layer in range(arch.num_layers)]
        model_free = schedule_trace(
            routing,
            num_text=sample.num_text,
            num_visual=sample.num_visual,
            num_layers=arch.num_layers,
            visual_start=sample.visual_positions[0],
        ).samples[0]
        bounds = (*TRACE_SCHEDULE.layers, arch.num_layers)
        stages = []
        previous: set[int] | None = None
        for s, decision in enumerate(sample.decisions):
            chosen = set(decision.selected)
            not_chosen = [i for i in range(sample.num_visual) if i not in chosen]
            readmitted = list(sample.readmitted(s))
            stages.append(
                {
                    "stage": s,
                    "layer": decision.layer,
                    "layers": [bounds[s], bounds[s + 1] - 1],
                    "k": decision.k,
                    "pool": list(decision.pool),
                    "selected": list(decision.selected),
                    "continuing": [i for i in decision.selected if previous is None or i in previous],
                    "readmitted": readmitted,
                    "deferred": not_chosen if policy == "reroute" else [],
                    "removed": not_chosen if policy == "remove" else [],
                    "scores": [round(float(x), 6) for x in decision.scores.tolist()],
                    "probe_keys": decision.probe_keys,
                }
            )
            previous = chosen
        budget = budget_from_trace(result.trace, arch, kv_dtype=kv_dtype, config=routing).samples[0]
        runs.append(
            {
                "policy": policy,
                "num_text": sample.num_text,
                "num_visual": sample.num_visual,
                "visual_positions": list(sample.visual_positions),
                "layer_visual_counts": list(sample.layer_visual_counts),
                "kv_lengths": list(sample.kv_lengths),
                "cache_lengths_measured": measured,
                "cache_matches_trace": measured == list(sample.kv_lengths),
                "model_free_counts_match": model_free.layer_visual_counts == sample.layer_visual_counts
                and model_free.kv_lengths == sample.kv_lengths,
                "readmitted_total": sum(len(stage["readmitted"]) for stage in stages),
                "stages": stages,
                "budget": {
                    "avg_visual_tokens": budget.avg_visual_tokens,
                    "flops_true": budget.flops_true,
                    "probe_flops": budget.probe_flops,
                    "kv_entries": budget.kv_entries,
                    "kv_bytes": budget.kv_bytes,
                    "kv_dtype": _dtype_name(kv_dtype),
                },
            }
        )
    return {
        "model": {
            "description": "tiny random LLaVA (rerouting.tiny: LLaMA decoder + CLIP tower, random weights)",
            "model_seed": TRACE_MODEL_SEED,
            "input_seed": TRACE_INPUT_SEED,
            "text_runs": list(TRACE_TEXT_RUNS),
            "arch": arch.to_dict(),
            "image_grid": [side, side],
        },
        "implementation": "reference (rerouting.reference.Reference, float32, eager attention)",
        "schedule": {
            "layers": list(TRACE_SCHEDULE.layers),
            "keep": list(TRACE_SCHEDULE.keep),
            "unit": TRACE_SCHEDULE.unit,
        },
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


def _command_line(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(["rerouting", "audit", *(shlex.quote(a) for a in argv)])


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("rerouting", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def run_audit(args: argparse.Namespace, argv: Sequence[str], progress: Progress) -> dict:
    """Everything the reports show, as one JSON-ready dict (schema: docs/audit.md)."""
    solver_requested = bool(args.target_avg) or args.identical_to is not None
    if args.target_avg and args.layers is None:
        raise AuditError(
            "--target-avg needs --layers (the decision layers of the solved schedule), e.g. --layers 2,7,15,23"
        )
    if args.layers is not None and not args.target_avg:
        raise AuditError(f"--layers {args.layers} is only used with --target-avg")
    if (args.identical_to is None) != (args.extra_layers is None):
        raise AuditError(
            "--identical-to and --extra-layers go together (baseline schedule + extra re-scoring layers)"
        )
    if not 0 <= args.decimals <= 8:
        raise AuditError(f"--decimals {args.decimals} must be between 0 and 8")
    shape = parse_shape(args.shape)
    if shape == "identical":
        raise AuditError("--shape identical: use --identical-to BASELINE --extra-layers L,... for that mode")

    progress(f"model {args.model}: building on the meta device")
    model: ModelInfo = resolve_model(args.model)
    arch = model.arch
    progress(
        f"model {model.name}: {model.model_class}, {arch.num_layers} layers, d={arch.hidden_size}, "
        f"H={arch.num_heads}/{arch.num_kv_heads}, hd={arch.head_dim}, m={arch.intermediate_size}"
    )
    if args.visual_tokens is not None:
        num_visual, visual_source = args.visual_tokens, "--visual-tokens"
    elif model.default_visual is not None:
        num_visual, visual_source = model.default_visual, "config image_seq_length"
    else:
        num_visual, visual_source = DEFAULT_VISUAL, "default (the config does not fix it)"
    num_text = args.text_tokens if args.text_tokens is not None else DEFAULT_TEXT
    if args.kv_dtype is not None:
        kv_name, kv_source = args.kv_dtype, "--kv-dtype"
    elif model.config_dtype is not None:
        kv_name, kv_source = model.config_dtype, "checkpoint dtype"
    else:
        kv_name, kv_source = "float16", "default"
    kv_dtype = KV_DTYPES[kv_name]
    policies = ("remove", "reroute") if args.policy == "both" else (args.policy,)
    conventions = CONVENTIONS if args.convention == "all" else (args.convention,)

    # schedules
    notes: list[str] = []
    if args.schedule:
        schedules = resolve_schedules(args.schedule)
    elif solver_requested:
        schedules = []
    else:
        schedules = resolve_schedules(["release"])
    check_fits(schedules, arch, num_visual)

    solves: list[dict] = []
    if args.target_avg:
        layers = parse_layers(args.layers, "--layers")
        for target in args.target_avg:
            record, schedule = solve(
                layers, shape, target, arch=arch, num_visual=num_visual, decimals=args.decimals
            )
            solves.append(record)
            schedules.append(schedule)
    if args.identical_to is not None:
        extra = parse_layers(args.extra_layers, "--extra-layers")
        baselines = resolve_schedules([args.identical_to])
        check_fits(baselines, arch, num_visual)
        for baseline in baselines:
            record, schedule = identical_schedule(baseline, extra, arch=arch, num_visual=num_visual)
            solves.append(record)
            if baseline.name not in {s.name for s in schedules}:
                schedules.append(baseline)
            schedules.append(schedule)
    if not args.schedule and not solver_requested:
        progress("solver: checking the release's matched-budget ratios at the 192/128/64 tiers")
        solves, solve_notes = default_solves(arch, num_visual, args.decimals)
        notes += solve_notes
    check_unique(schedules)
    check_fits(schedules, arch, num_visual)

    if any(s.source == "preset" for s in schedules) and (arch.num_layers != 32 or num_visual != 576):
        notes.append(
            "The presets are LLaVA-1.5 schedules (32 layers, N = 576): their avgNN labels hold only there; "
            f"here L = {arch.num_layers} and N = {num_visual}, so a missed label is expected."
        )
    progress(
        f"budgets: {len(schedules)} schedule(s) × {len(policies)} polic{'y' if len(policies) == 1 else 'ies'}, N={num_visual}, M={num_text}, KV {kv_name}"
    )
    dense = audit_run(arch, None, num_visual=num_visual, num_text=num_text, kv_dtype=kv_dtype)
    audited = [
        audit_schedule(
            schedule, arch, policies, num_visual=num_visual, num_text=num_text, kv_dtype=kv_dtype, dense=dense
        )
        for schedule in schedules
    ]
    flags = []
    for entry in audited:
        for run in entry["runs"]:
            check = run["label_check"]
            if check and check["flagged"]:
                flags.append(
                    {
                        "schedule": entry["name"],
                        "policy": run["policy"],
                        "label": check["label"],
                        "realized": run["avg_visual_tokens"]["realized"],
                        "nominal": run["avg_visual_tokens"]["nominal"],
                        "realized_deviation": check["realized_deviation"],
                        "message": (
                            f"{entry['name']} ({run['policy']}): realized avg_T "
                            f"{run['avg_visual_tokens']['realized']:.2f} misses its label {check['label']:g} by "
                            f"{100 * check['realized_deviation']:+.1f}% (tolerance ±{100 * LABEL_TOLERANCE:g}%)"
                        ),
                    }
                )
    for record in solves:
        if record.get("flagged"):
            flags.append(
                {
                    "schedule": record["name"],
                    "policy": record["native_policy"],
                    "label": record["target_avg"],
                    "realized": record["avg_visual_tokens"]["realized"],
                    "nominal": record["avg_visual_tokens"]["nominal"],
                    "realized_deviation": record["realized_deviation"],
                    "message": (
                        f"solver {record['name']}: integer k gives realized avg_T "
                        f"{record['avg_visual_tokens']['realized']:.2f}, {100 * record['realized_deviation']:+.1f}% "
                        f"from the target {record['target_avg']:g}"
                    ),
                }
            )

    off_label = {f["schedule"]: f for f in flags if f["schedule"] in {s.name for s in schedules}}
    if off_label and solves:
        listed = ", ".join(f"{name} ({flag['realized']:.2f})" for name, flag in off_label.items())
        notes.append(
            f"Off-label schedules: {listed}. The solver section gives the keep ratios that realize each label."
        )

    trace = None
    if not args.no_trace:
        progress(
            "trace: routed prefill of a tiny random LLaVA (reference implementation, reroute and remove)"
        )
        trace = traced_run()
        counts = trace["runs"][0]
        progress(
            f"trace: {len(counts['stages'])} decisions, {counts['readmitted_total']} re-admissions under reroute"
        )

    return {
        "schema_version": SCHEMA_VERSION,
        "generator": {"tool": "rerouting audit", "command": _command_line(argv), **_versions()},
        "model": model.to_dict(),
        "layout": {
            "num_visual": num_visual,
            "num_visual_source": visual_source,
            "num_text": num_text,
            "num_text_source": "--text-tokens" if args.text_tokens is not None else "default",
            "visual_start": 0,
            "batch": 1,
        },
        "kv_dtype": kv_name,
        "kv_dtype_source": kv_source,
        "policies": list(policies),
        "conventions": list(conventions),
        "convention_definitions": CONVENTION_INFO,
        "label_tolerance": LABEL_TOLERANCE,
        "dense": dense,
        "decode": {
            "kv_growth_bytes_per_token": kv_decode_growth(arch, kv_dtype),
            "kv_growth_bytes_per_token_by_dtype": {
                n: kv_decode_growth(arch, dt) for n, dt in KV_DTYPES.items()
            },
            "lm_head_flops_per_token": 2 * arch.hidden_size * arch.vocab_size,
            "decoder_flops_per_token_note": "decode is never routed: each generated token runs every layer over the whole cache",
        },
        "schedules": audited,
        "flags": flags,
        "solver": solves,
        "trace": trace,
        "notes": notes,
        "files": {},
    }


def write_outputs(report: dict, out: Path, *, plots: bool, progress: Progress) -> dict[str, str]:
    from . import audit_report

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if plots:
        try:
            from . import audit_plots
        except ImportError as error:  # matplotlib missing from a hand-made environment
            report["notes"].append(
                f"No PNG plot: matplotlib is not installed ({error}); pip install 'rerouting[plots]'."
            )
            progress("plots: skipped, matplotlib is not installed (pip install 'rerouting[plots]')")
        else:
            progress(
                "plots: staircase of visual tokens per layer" + (", trace heatmap" if report["trace"] else "")
            )
            files.update(audit_plots.write_plots(report, out))
    files.update(
        {
            "markdown": "report.md",
            "json": "report.json",
            "latex": "report.tex",
            "latex_table": "report-table.tex",
        }
    )
    report["files"] = files
    audit_report.write_markdown(report, out / files["markdown"])
    audit_report.write_latex(report, out / files["latex"], out / files["latex_table"])
    audit_report.write_json(report, out / files["json"])
    return files
