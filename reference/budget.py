"""Budget accounting: visual-token counts, FLOPs, probe overhead and KV bytes (spec/budget.md).

Everything is computed from a ``Trace`` (what actually ran, [budget.active-counts]), never from the
configuration alone. A trace comes either from the reference router or, for real-size
architectures without weights, from :func:`schedule_trace`, which runs the same selection code
with placeholder scores.

The per-layer formulas are in :mod:`rerouting.reference.flops`, the records returned in
:mod:`rerouting.reference.records`, the architectures in :mod:`rerouting.reference.archs` and the
matched-budget solver in :mod:`rerouting.reference.solver`.
"""

from __future__ import annotations

import torch

from .archs import ArchSpec
from .cache_policy import retroactive_lengths
from .flops import (
    avg_visual_tokens,
    kv_decode_growth,
    kv_layer_bytes,
    layer_flops_fastv,
    layer_flops_nuwa,
    layer_flops_pdrop,
    layer_flops_true,
    lm_head_flops,
    probe_flops,
    spectral_flops,
)
from .flops_linear import linear_layer_flops_true, linear_state_bytes
from .hooks import reducer_for
from .hybrid import layer_visual
from .records import BatchBudget, LayerBudget, ProbeBudget, SampleBudget
from .schedule import RoutingConfig, RoutingError
from .scoring import query_rows, runs_probe, scoring_method
from .selection import candidate_pool, capped_k, select_topk
from .trace import Decision, SampleTrace, Trace

# ---------------------------------------------------------------------------------------------
# Traces without a model
# ---------------------------------------------------------------------------------------------


def _check_sizes(num_text: int, num_visual: int, num_layers: int) -> None:
    for what, value, low in (
        ("num_text", num_text, 0),
        ("num_visual", num_visual, 0),
        ("num_layers", num_layers, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RoutingError("budget.active-counts", f"{what}={value!r} is not an integer >= {low}")


def schedule_trace(
    config: RoutingConfig | None,
    *,
    num_text: int,
    num_visual: int,
    num_layers: int,
    visual_start: int = 0,
    layer_kinds: tuple[str, ...] = (),
) -> Trace:
    """[budget.active-counts] The one-sample trace a routed prefill produces, without a model.

    Runs the real selection code (``candidate_pool``, ``capped_k``, ``select_topk``,
    ``Schedule.keep_count``, ``Schedule.stage_of``) with placeholder scores ``N, N-1, ..., 1``
    (descending by visual index, so the lowest indices win; tokens outside a remove probe's key set
    score 0). Which tokens are selected depends on the scores; how MANY does not: k, the pool sizes,
    the per-layer active counts, the cache lengths and the probe sizes are the same for any scores,
    so budgets computed from this trace equal those of a real run with the same M and N.

    Layout: the N visual tokens sit at positions ``visual_start .. visual_start+N-1`` among
    ``num_text + num_visual`` valid tokens. Probe sizes follow the router: keys = M + N for
    reroute, M + |pool| for remove (equal at the first decision); query rows per
    ``config.scorer.query`` (1 for the default last-token row). The random scorer runs no probe:
    keys = queries = 0.

    ``num_visual = 0`` gives an unrouted trace ([layout.text-only]): no decision, every layer's
    active visual set empty. ``config=None`` gives the unrouted host forward over N visual tokens
    (every layer runs all of them, no decision; policy recorded as "none"). ``layer_kinds`` (a hybrid
    decoder's, e.g. ``ArchSpec.layer_kinds``): a linear layer's active set follows ``config.linear_attention``
    ([hosts.linear.semantics]).
    """
    _check_sizes(num_text, num_visual, num_layers)
    if (
        isinstance(visual_start, bool)
        or not isinstance(visual_start, int)
        or not 0 <= visual_start <= num_text
    ):
        raise RoutingError("layout.visual-set", f"visual_start={visual_start!r} is outside 0..{num_text}")
    visual = tuple(range(visual_start, visual_start + num_visual))
    text = tuple(range(visual_start)) + tuple(range(visual_start + num_visual, num_text + num_visual))
    everything = tuple(range(num_visual))
    entering = model_free_entering(config, num_visual)  # [nuwa.budget]: a reducer's count, None for identity
    if config is None:
        sample = SampleTrace(num_text, visual, (), (everything,) * num_layers)
        return Trace(policy="none", num_layers=num_layers, samples=(sample,))

    schedule = config.schedule
    schedule.check_layers(num_layers)
    placeholder = torch.arange(num_visual, 0, -1, dtype=config.compute_dtype)
    decisions: list[Decision] = []
    active: list[tuple[int, ...]] = []
    selected: tuple[int, ...] | None = None
    for layer in range(num_layers):
        stage = schedule.stage_of(layer)
        if num_visual and stage is not None and schedule.layers[stage] == layer:
            pool = candidate_pool(config.policy, num_visual, selected, entering)
            k = capped_k(schedule.keep_count(stage, num_visual), pool)
            scores = torch.zeros(num_visual, dtype=config.compute_dtype)
            scores[list(pool)] = placeholder[list(pool)]
            selected = select_topk(scores, pool, k)
            entered = num_visual if entering is None else len(entering)
            keys = num_text + (len(pool) if config.policy == "remove" else entered)
            queries = len(query_rows(text, visual, config.scorer.query))
            if not runs_probe(
                scoring_method(config.scorer.kind), config.scorer
            ):  # random, CLSE's `clse`: no probe
                keys = queries = 0
            if k == 0:  # [schedule.keep-zero]: the final wipe runs no scorer
                keys = queries = 0
                scores = torch.zeros(num_visual, dtype=config.compute_dtype)
            decisions.append(Decision(layer, stage, pool, scores, k, selected, keys, queries))
        first = everything if entering is None or not num_visual else entering
        chosen = first if selected is None else selected
        kind = layer_kinds[layer] if layer_kinds else "softmax"
        active.append(layer_visual(kind, config.policy, config.linear_attention, num_visual, chosen))
    sample = SampleTrace(num_text, visual, tuple(decisions), tuple(active), entering if num_visual else None)
    return Trace(policy=config.policy, num_layers=num_layers, samples=(sample,))


def model_free_entering(config: RoutingConfig | None, num_visual: int) -> tuple[int, ...] | None:
    """[nuwa.budget] The visual indices a configuration's reducer lets in for one image of ``num_visual`` tokens.

    None for the identity reducer (every token). Only the count is meaningful: it is what a real run gives.
    """
    if config is None or config.reducer == "identity" or not num_visual:
        return None
    return reducer_for(config).model_free_entering(config.reducer_params, num_visual)


def nominal_visual_counts(
    config: RoutingConfig | None, num_visual: int, num_layers: int, layer_kinds: tuple[str, ...] = ()
) -> tuple[float, ...]:
    """[budget.avg-tokens] Real-valued visual counts per layer: N in the dense prefix, N·r in a stage.

    No floor and no max(1, ·) ([schedule.keep-ratio]); an absolute keep count is taken as is. For the
    remove policy the count is also capped by the previous stage's nominal count (the pool cap,
    [selection.pool-cap]). ``num_visual = 0`` (or ``config=None``, unrouted) gives N at every layer.
    A linear layer of ``layer_kinds`` under ``reroute`` with ``dense`` semantics counts N ([hosts.linear.dense]).
    """
    _check_sizes(0, num_visual, num_layers)
    if config is None or num_visual == 0:
        return (float(num_visual),) * num_layers
    schedule = config.schedule
    schedule.check_layers(num_layers)
    entering = model_free_entering(config, num_visual)  # [nuwa.budget]: the dense prefix runs n_V, not N
    entered = float(num_visual if entering is None else len(entering))
    per_stage: list[float] = []
    for stage in range(schedule.num_decisions):
        schedule.keep_count(stage, num_visual)  # validates an absolute count against N
        value = schedule.nominal_keep(stage, num_visual)
        if config.policy == "remove" and per_stage:
            value = min(value, per_stage[-1])
        per_stage.append(min(value, entered))
    counts = []
    for layer in range(num_layers):
        stage = schedule.stage_of(layer)
        kind = layer_kinds[layer] if layer_kinds else "softmax"
        dense = layer_visual(kind, config.policy, config.linear_attention, 1, ()) != ()
        counts.append(float(num_visual) if dense else entered if stage is None else per_stage[stage])
    return tuple(counts)


# ---------------------------------------------------------------------------------------------
# Budgets from a trace
# ---------------------------------------------------------------------------------------------


def budget_from_trace(
    trace: Trace,
    arch: ArchSpec,
    *,
    kv_dtype: torch.dtype = torch.float16,
    config: RoutingConfig | None = None,
) -> BatchBudget:
    """[budget.active-counts] Every budget of a batch, from what the trace says ran.

    Per sample and layer l: visual_l from ``active_visual`` and n_l = M + visual_l; the four FLOP
    conventions ([budget.flops.true] over n_l, [budget.flops.fastv] over n_l, [budget.flops.pdrop]
    and [budget.flops.nuwa] over visual_l); cache entries = the trace's ``kv_lengths``
    ([budget.kv.entries]) and their bytes ([budget.kv.bytes]). Per decision the probe
    ([budget.flops.probe]) from the recorded ``probe_keys``/``probe_queries``. The LM head over all
    M + N positions is reported apart. ``config`` (optional) adds the nominal avg_T
    ([budget.avg-tokens]; the realized one always comes from the trace) and, for the random
    scorer, sets every probe's cost to zero (no probe runs, whatever sizes the trace recorded).
    """
    if trace.num_layers != arch.num_layers:
        raise RoutingError(
            "budget.active-counts",
            f"trace has {trace.num_layers} layers but architecture {arch.name!r} has {arch.num_layers}",
        )
    no_probe = config is not None and not runs_probe(scoring_method(config.scorer.kind), config.scorer)
    samples = tuple(
        _sample_budget(sample, trace.num_layers, arch, kv_dtype, config, no_probe) for sample in trace.samples
    )
    return BatchBudget(
        arch=arch,
        policy=trace.policy,
        kv_dtype=kv_dtype,
        kv_decode_growth=kv_decode_growth(arch, kv_dtype),
        samples=samples,
    )


def _sample_budget(
    sample: SampleTrace,
    num_layers: int,
    arch: ArchSpec,
    kv_dtype: torch.dtype,
    config: RoutingConfig | None,
    no_probe: bool,
) -> SampleBudget:
    """[budget.active-counts] [budget.avg-tokens] One sample's budget: its layers, probes, LM head, nominal avg_T."""
    if len(sample.active_visual) != num_layers:
        raise RoutingError(
            "budget.active-counts",
            f"sample records {len(sample.active_visual)} layers, trace says {num_layers}",
        )
    layers = _layer_budgets(sample, arch, kv_dtype, None if config is None else config.cache)
    probes = _probe_budgets(sample, arch, no_probe, config)
    nominal = None
    if config is not None:
        counts = nominal_visual_counts(config, sample.num_visual, num_layers, arch.layer_kinds)
        nominal = avg_visual_tokens(counts)
    return SampleBudget(
        num_text=sample.num_text,
        num_visual=sample.num_visual,
        routed=sample.routed,
        layers=layers,
        probes=probes,
        lm_head_flops=lm_head_flops(arch, sample.seq_len),
        avg_visual_tokens_nominal=nominal,
    )


def _layer_budgets(
    sample: SampleTrace, arch: ArchSpec, kv_dtype: torch.dtype, cache_policy: str | None = None
) -> tuple[LayerBudget, ...]:
    """[budget.flops.true] [budget.flops.fastv] [budget.flops.pdrop] [budget.flops.nuwa] [budget.kv.entries] [budget.kv.bytes] Per layer.

    Layer l runs visual_l visual tokens (the trace's ``active_visual``) and n_l = M + visual_l in all; the four
    FLOP conventions over n_l (true, FastV) or visual_l (PDrop, NUWA), the cache entries and their bytes: the
    trace's ``kv_lengths``, or under the ``retroactive`` cache policy M + |A_{S-1} ∩ active_l|
    ([cache.policy.retroactive]).
    """
    kv_lengths = sample.kv_lengths
    if cache_policy == "retroactive":
        final = sample.decisions[-1].selected if sample.decisions else None
        kv_lengths = retroactive_lengths(sample.num_text, sample.active_visual, final)
    layers = []
    for index, (visual, entries) in enumerate(zip(sample.layer_visual_counts, kv_lengths)):
        tokens = sample.num_text + visual
        if arch.kind(index) == "linear":  # [budget.flops.linear] [budget.kv.state-bytes]: no K/V entries
            flops, entries, cache_bytes = (
                linear_layer_flops_true(arch, tokens),
                0,
                linear_state_bytes(arch, kv_dtype),
            )
        else:
            flops, cache_bytes = layer_flops_true(arch, tokens), kv_layer_bytes(arch, entries, kv_dtype)
        layers.append(
            LayerBudget(
                layer=index,
                visual=visual,
                tokens=tokens,
                flops_true=flops,
                macs_fastv=layer_flops_fastv(arch, tokens),
                macs_pdrop=layer_flops_pdrop(arch, visual),
                flops_nuwa=layer_flops_nuwa(arch, visual),
                kv_entries=entries,
                kv_bytes=cache_bytes,
            )
        )
    return tuple(layers)


def _probe_budgets(
    sample: SampleTrace, arch: ArchSpec, no_probe: bool, config: RoutingConfig | None = None
) -> tuple[ProbeBudget, ...]:
    """[budget.flops.probe] [clse.flops] Per decision the probe from the recorded sizes; zero cost where no probe runs.

    A CLSE decision that uses the spectral term adds its FLOPs as the component ``spectral`` (one image of N
    tokens: the trace records no images).
    """
    clse = None if config is None else config.scorer.clse
    probes = []
    for d in sample.decisions:
        flops = probe_flops(arch, 0, 0) if no_probe else probe_flops(arch, d.probe_keys, d.probe_queries)
        if clse is not None and clse.spectral_at(d.stage):
            flops["spectral"] = spectral_flops(arch, [sample.num_visual])
        probes.append(ProbeBudget(d.layer, d.stage, d.probe_keys, d.probe_queries, flops))
    return tuple(probes)
