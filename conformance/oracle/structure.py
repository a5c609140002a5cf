"""Structure of the trace (exact): every integer fact, from the reference's own rule functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rerouting.reference import RoutingConfig, candidate_pool, capped_k, host_for
from rerouting.reference.hybrid import layer_visual
from rerouting.reference.scoring import probe_size, query_rows

from ..protocol import check, fail

if TYPE_CHECKING:
    from .runs import Observation


def _keep_rule(config: RoutingConfig) -> str:
    return "schedule.keep-count" if config.schedule.unit == "count" else "schedule.keep-ratio"


def check_structure(obs: Observation) -> None:
    """Every integer fact of the trace: layout, decision layers, pools, k, selection shape, active sets, probe sizes.

    Expected values come from the reference's own rule functions applied to the implementation's
    previous selections; each mismatch names the rule it breaks.
    """
    trace, case, config = obs.out.trace, obs.case, obs.case.config
    L = case.host.num_layers
    check(
        len(trace.samples) == len(obs.layouts),
        "layout.batch-independence",
        f"the trace has {len(trace.samples)} samples for a batch of {len(obs.layouts)}",
    )
    check(
        trace.num_layers == L, "schedule.stages", f"trace.num_layers={trace.num_layers}, the decoder has {L}"
    )
    kinds = host_for(case.model64()).layer_kinds  # [hosts.linear.semantics]: what a linear layer runs on
    for b, (layout, sample) in enumerate(zip(obs.layouts, trace.samples)):
        _check_sample(config, L, b, layout, sample, kinds)


def _check_sample(config: RoutingConfig, L: int, b: int, layout, sample, kinds=None) -> None:
    """One sample: its layout, its decisions in order, and the active visual set of every layer."""
    schedule = config.schedule
    where = f"sample {b}"
    check(
        tuple(sample.visual_positions) == layout.visual,
        "layout.visual-set",
        f"{where}: trace visual positions {list(sample.visual_positions)} != image placeholder positions {list(layout.visual)}",
    )
    check(
        sample.num_text == len(layout.text),
        "layout.text-set",
        f"{where}: trace num_text={sample.num_text}, the sample has {len(layout.text)} text tokens",
    )
    check(
        len(sample.active_visual) == L,
        "schedule.stages",
        f"{where}: {len(sample.active_visual)} layers in trace",
    )
    N = len(layout.visual)
    if N == 0:
        check(
            not sample.decisions and not any(sample.active_visual),
            "layout.text-only",
            f"{where} has no visual token but its trace records {len(sample.decisions)} decisions",
        )
        return
    check(
        len(sample.decisions) == schedule.num_decisions,
        "schedule.decision-layers",
        f"{where}: {len(sample.decisions)} decisions recorded, the schedule has {schedule.num_decisions}",
    )
    selected = None
    for s, decision in enumerate(sample.decisions):
        selected = _check_decision(
            config, f"sample {b}, decision {s} (layer {schedule.layers[s]})", s, layout, decision, selected
        )
    _check_active_sets(schedule, L, b, N, sample, config, kinds)


def _check_decision(config: RoutingConfig, where: str, s: int, layout, decision, selected) -> tuple[int, ...]:
    """Decision ``s``: its layer, pool (from the previous selection), k, and the selection's shape; returns it."""
    schedule = config.schedule
    N = len(layout.visual)
    previous = config.scorer.probe_layer == "previous" and decision.layer == schedule.layers[s] - 1
    check(
        (decision.layer, decision.stage) == (schedule.layers[s], s),
        "scoring.probe.variant-layer" if previous else "schedule.decision-layers",
        f"{where}: recorded as layer {decision.layer}, stage {decision.stage}"
        + (
            " (probe_layer='previous' scores with layer d-1, but the decision is layer d's)"
            if previous
            else ""
        ),
    )
    pool = candidate_pool(config.policy, N, selected)
    check(
        tuple(decision.pool) == pool,
        "selection.pool",
        f"{where}: pool {list(decision.pool)} != {list(pool)} ({config.policy})",
    )
    target = schedule.keep_count(s, N)
    k = capped_k(target, pool)
    if decision.k != k:
        rule = "selection.pool-cap" if target > len(pool) else _keep_rule(config)
        fail(
            rule,
            f"{where}: k={decision.k}, expected {k} (target {target}, pool of {len(pool)}, N={N})",
        )
    chosen = tuple(int(i) for i in decision.selected)
    check(
        len(chosen) == len(set(chosen)) == k,
        "selection.topk",
        f"{where}: selected {list(chosen)} is not {k} distinct tokens",
    )
    check(
        set(chosen) <= set(pool),
        "selection.pool",
        f"{where}: selected {list(chosen)} outside pool {list(pool)}",
    )
    check(
        list(chosen) == sorted(chosen),
        "selection.order",
        f"{where}: selection {list(chosen)} is not in ascending (original) order",
    )
    check(
        tuple(decision.scores.shape) == (N,),
        "scoring.probe.head-mean",
        f"{where}: scores have shape {tuple(decision.scores.shape)}, expected one per visual token ({N},)",
    )
    if k == 0:  # [schedule.keep-zero]: the final wipe runs no scorer
        check(
            decision.probe_keys == decision.probe_queries == 0,
            "schedule.keep-zero",
            f"{where}: a k = 0 decision records a probe of {decision.probe_keys} keys, {decision.probe_queries} "
            "query rows (no scorer runs)",
        )
    elif config.scorer.kind in ("attention", "twig"):
        _check_probe(config, where, layout, pool, decision)
    return chosen


def _check_probe(config: RoutingConfig, where: str, layout, pool: tuple[int, ...], decision) -> None:
    """The attention probe's size: its keys (every valid token, or text + pool) and its query rows."""
    n_queries = len(query_rows(layout.text, layout.visual, config.scorer.query))
    keys, queries = probe_size(config.policy, len(layout.text), len(pool), layout.length, n_queries)
    check(
        decision.probe_keys == keys,
        "scoring.probe.input",
        f"{where}: probe over {decision.probe_keys} keys, expected {keys} "
        f"({'every valid token' if config.policy == 'reroute' else 'text + pool'})",
    )
    check(
        decision.probe_queries == queries,
        "scoring.probe.query-row" if config.scorer.query == "last" else "scoring.probe.variant-query",
        f"{where}: {decision.probe_queries} query rows, expected {queries}",
    )


def _check_active_sets(schedule, L: int, b: int, N: int, sample, config=None, kinds=None) -> None:
    """Every layer's active visual set: all N in the dense prefix, else the selection of its stage (at a
    linear-attention layer, the set its semantics names, [hosts.linear.semantics])."""
    for layer in range(L):
        stage = schedule.stage_of(layer)
        expected = tuple(range(N)) if stage is None else tuple(sample.decisions[stage].selected)
        if kinds is not None and kinds[layer] == "linear":
            expected = layer_visual("linear", config.policy, config.linear_attention, N, expected)
            if tuple(sample.active_visual[layer]) != expected:
                fail(
                    "hosts.linear.semantics",
                    f"sample {b}, linear layer {layer}: ran on visual {list(sample.active_visual[layer])}, "
                    f"expected {list(expected)} ({config.linear_attention}, {config.policy})",
                )
            continue
        check(
            tuple(sample.active_visual[layer]) == expected,
            "schedule.dense-prefix" if stage is None else "schedule.stages",
            f"sample {b}, layer {layer}: active visual {list(sample.active_visual[layer])} != {list(expected)} "
            + (
                "(dense prefix: every visual token)"
                if stage is None
                else f"(the selection of decision {stage})"
            ),
        )
