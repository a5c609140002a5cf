"""[budget.active-counts] The budget of one schedule under one policy: the records of ``report["schedules"]``.

Every count comes from a Trace (``schedule_trace``: the real selection code with placeholder scores)
through ``budget_from_trace``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace, nominal_visual_counts, schedule_trace
from rerouting.reference.flops import avg_visual_tokens, kv_entry_bytes
from rerouting.reference.schedule import RoutingConfig

from .common import LABEL_TOLERANCE
from .inputs import KV_DTYPES, AuditSchedule


def dtype_name(dtype: torch.dtype) -> str:
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


def _decision_records(config: RoutingConfig, sample_trace, sample, num_visual: int) -> list[dict]:
    """Per decision: layer, keep value, integer and nominal k, pool, and the probe's size and FLOPs."""
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
    return decisions


def _kv_record(arch: ArchSpec, sample, kv_dtype: torch.dtype) -> dict:
    """[budget.kv.entries] The cache after prefill: entries (total and per layer) and bytes per dtype."""
    entries = sample.kv_entries
    return {
        "dtype": dtype_name(kv_dtype),
        "entries": entries,
        "entries_per_layer": [layer.kv_entries for layer in sample.layers],
        "bytes": sample.kv_bytes,
        "bytes_by_dtype": {name: entries * kv_entry_bytes(arch, dt) for name, dt in KV_DTYPES.items()},
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
    kinds = arch.layer_kinds  # [hosts.linear.semantics]: a hybrid decoder's linear layers
    trace = schedule_trace(
        config, num_text=num_text, num_visual=num_visual, num_layers=arch.num_layers, layer_kinds=kinds
    )
    sample_trace = trace.samples[0]
    sample = budget_from_trace(trace, arch, kv_dtype=kv_dtype, config=config).samples[0]
    nominal_counts = nominal_visual_counts(config, num_visual, arch.num_layers, kinds)
    decisions = _decision_records(config, sample_trace, sample, num_visual)
    flops = {
        "true": sample.flops_true,
        "fastv": sample.macs_fastv,
        "pdrop": sample.macs_pdrop,
        "nuwa": sample.flops_nuwa,
    }
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
        "kv": _kv_record(arch, sample, kv_dtype),
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
