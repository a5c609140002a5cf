"""Conformance on Qwen3-family hosts (spec/hosts.md): Qwen3-VL (q/k norms, DeepStack) and Qwen3.5 (hybrid).

The cases draw their own family (``qwen3-vl`` or ``qwen3.5``, those the installed transformers serves and the
implementation takes), a tiny host of 3-5 layers from the general host draw (``oracle.hosts.as_qwen``), a
layout with per-image grids, and a schedule the family allows: ``d_0 >= 2`` on Qwen3-VL (its two DeepStack
levels, [hosts.deepstack]), decisions at the softmax layers 1, 3 on Qwen3.5 ([hosts.linear.decisions]),
whose cases also draw the linear-attention semantics ([hosts.linear.semantics]). Truth: the reference in
float64; keep-all cases also against the unrouted host forward.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_against_host,
    check_decisions,
    check_decode,
    check_kv,
    check_logits,
    check_scores,
    check_structure,
    expect_error,
    observe,
    run_check,
    run_decode,
)
from rerouting.conformance.oracle.hosts import HOST_CLASSES, QWEN3_FAMILIES, QWEN3_SERVED, release_refuses
from rerouting.conformance.oracle.strategies import (
    Case,
    HostSpec,
    Layout,
    as_qwen,
    dtypes,
    hosts,
    layouts,
    qwen_grids,
    schedules,
)
from rerouting.conformance.protocol import check
from rerouting.reference import RoutingConfig, Schedule, Scorer
from rerouting.reference.schedule import LINEAR_SEMANTICS

#: The rule a failure on each family is reported under (besides the general rules the checks name).
RULE = {"qwen3-vl": "hosts.qk-norm", "qwen3.5": "hosts.linear.semantics"}


def _families(impl) -> tuple[str, ...]:
    drawn = tuple(f for f in QWEN3_SERVED if impl.supports_host(HOST_CLASSES[f]))
    if not drawn:
        reasons = {
            f: release_refuses(f) or f"the implementation does not take {HOST_CLASSES[f]}"
            for f in QWEN3_FAMILIES
        }
        pytest.skip(f"no Qwen3-family host is drawn: {reasons}")
    return drawn


def qwen3_case(data, impl, *, keep_all: bool = False, max_batch: int = 3, family: str | None = None) -> Case:
    """One labelled draw per part: family, host, layout, grids, schedule, policy, semantics, scorer, dtype."""
    family = family or data.draw(st.sampled_from(_families(impl)), label="family")
    kernel = data.draw(st.sampled_from(["sdpa", "eager"]), label="attention")
    ties = st.sampled_from(["none", "none", "exact", "near-3"])
    host = data.draw(
        hosts(min_layers=3, max_layers=5, ties=ties).map(lambda h: as_qwen(h, family)), label="host"
    )
    host = replace(host, attention=kernel)
    layout = data.draw(layouts(max_batch=max_batch, max_images=2), label="layout")
    layout = replace(layout, grids=data.draw(qwen_grids(layout), label="grids"))
    routed = [n for n in layout.num_visual(host) if n]
    allowed = host.softmax_layers if family == "qwen3.5" else tuple(range(2, host.num_layers))
    slots = data.draw(schedules(len(allowed), min(routed, default=1), keep_all=keep_all), label="schedule")
    schedule = Schedule(tuple(allowed[i] for i in slots.layers), slots.keep, unit=slots.unit)
    policy = data.draw(st.sampled_from(["reroute", "remove"]), label="policy")
    semantics = (
        data.draw(st.sampled_from(LINEAR_SEMANTICS), label="linear_attention")
        if family == "qwen3.5"
        else "dense"
    )
    scorer = data.draw(st.sampled_from([Scorer(), Scorer(), Scorer(kind="random", seed=3)]), label="scorer")
    config = RoutingConfig(schedule, policy=policy, scorer=scorer, linear_attention=semantics)
    return Case(host, layout, config, dtype=data.draw(dtypes(), label="dtype"))


def check_qwen3_routing(impl, case: Case) -> None:
    """Trace structure (a linear layer runs what its semantics names), caches, logits, scores and decisions."""
    rule = RULE[case.host.family]
    obs = observe(impl, case)
    check_structure(obs)
    check_kv(obs, rule)
    check_logits(obs, rule)
    check_scores(obs, rule)  # a probe without the layer's q/k norms, gate split or partial rotary fails here
    check_decisions(obs)


@pytest.mark.spec(
    "hosts.qk-norm",
    "hosts.gated-query",
    "hosts.partial-rotary",
    "hosts.deepstack",
    "hosts.linear.semantics",
    "hosts.linear.dense",
    "hosts.linear.bypass",
)
@given(data=st.data())
def test_qwen3_hosts_route_as_the_reference(impl, data):
    run_check(check_qwen3_routing, impl, qwen3_case(data, impl, max_batch=2))


def check_qwen3_keep_all(impl, case: Case) -> None:
    """Keep ratio 1 everywhere: every sample equals the unrouted host forward (DeepStack, linear layers included)."""
    obs = observe(impl, case)
    check_structure(obs)
    check_against_host(obs, "routing.equiv.keep-all", range(len(obs.layouts)))


@pytest.mark.spec("routing.equiv.keep-all", "hosts.deepstack", "hosts.linear.semantics")
@given(data=st.data())
def test_qwen3_keep_all_is_the_unrouted_host(impl, data):
    run_check(check_qwen3_keep_all, impl, qwen3_case(data, impl, keep_all=True, max_batch=2))


def check_qwen3_decode(impl, case: Case, steps: int, token_seed: int) -> None:
    """Cached decode == recomputing the routed forward with the same decisions: on Qwen3.5 each linear layer
    continues its recurrence from the state the prefill left ([hosts.linear.cache]), under either semantics."""
    run = run_decode(impl, case, steps, token_seed)
    hybrid = case.host.family == "qwen3.5"
    check_decode(run, "hosts.linear.cache" if hybrid else "cache.decode.equiv", kv=not hybrid)


@pytest.mark.spec("hosts.linear.cache", "cache.decode.equiv")
@given(data=st.data())
def test_qwen3_decode_continues_the_routed_cache(impl, data):
    case = qwen3_case(data, impl, max_batch=2)
    steps = data.draw(st.integers(1, 2), label="steps")
    run_check(
        check_qwen3_decode, impl, case, steps=steps, token_seed=data.draw(st.integers(0, 99), label="tokens")
    )


def check_qwen3_schedule_errors(impl, family: str) -> None:
    """A decision at a linear layer (Qwen3.5) or inside the DeepStack injections (Qwen3-VL) is a clear error."""
    host = replace(as_qwen(HostSpec(num_layers=4), family), attention="sdpa")
    layout = Layout(((2, 3),), "left", 0, (((4, 4),),))
    bad, what = (
        (Schedule((2,), (0.5,)), "a decision at linear-attention layer 2")
        if family == "qwen3.5"
        else (Schedule((1,), (0.5,)), "a decision at layer 1, before the second DeepStack injection")
    )
    case = Case(host, layout, RoutingConfig(bad))
    rule = "hosts.linear.decisions" if family == "qwen3.5" else "hosts.deepstack"
    expect_error(
        rule,
        what,
        lambda: impl.prefill(case.model(), case.config, **case.inputs(case.device)),
        must_mention=(rule, "routing.errors"),
    )


@pytest.mark.spec("hosts.linear.decisions", "hosts.deepstack", "routing.errors")
@pytest.mark.parametrize("family", QWEN3_FAMILIES)
def test_qwen3_schedule_errors(impl, family):
    if family not in _families(impl):
        pytest.skip(release_refuses(family) or f"the implementation does not take {HOST_CLASSES[family]}")
    run_check(check_qwen3_schedule_errors, impl, family=family)


#: The modules of a linear layer whose FLOPs the counter attributes cleanly (the conv and the chunked
#: recurrence kernel compute [budget.flops.linear]'s result with other work: not compared live).
_LINEAR_PARTS = tuple(
    f"linear_attn.{name}" for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
)


def check_linear_budget(impl, case: Case) -> None:
    """One sample on Qwen3.5: every linear layer's projections and MLP, counted live (FlopCounterMode), are the
    budget's over the tokens the trace says it ran ([budget.flops.linear]); its cache is a state, not K/V
    entries, of the budget's bytes ([budget.kv.state-bytes])."""
    from rerouting.conformance.oracle.flops import flop_counter
    from rerouting.reference.archs import ArchSpec
    from rerouting.reference.budget import budget_from_trace
    from rerouting.reference.flops_linear import linear_state_bytes

    model = case.model()
    layers = model.model.language_model.layers
    counter, live, start, handles = flop_counter(), {}, {}, []

    def total() -> int:
        counts = counter.get_flop_counts()
        keys = [f"{type(layers[0]).__name__}.{part}" for part in (*_LINEAR_PARTS, "mlp")]
        return sum(sum(counts.get(key, {}).values()) for key in keys)

    for index, layer in enumerate(layers):
        if hasattr(layer, "linear_attn"):
            handles.append(
                layer.register_forward_pre_hook(lambda m, a, i=index: start.__setitem__(i, total()))
            )
            handles.append(
                layer.register_forward_hook(
                    lambda m, a, o, i=index: live.__setitem__(i, live.get(i, 0) + total() - start[i])
                )
            )
    try:
        with counter, torch.no_grad():
            out = impl.prefill(model, case.config, **case.inputs(case.device))
    finally:
        for handle in handles:
            handle.remove()
    obs = observe(impl, case, out=out)
    check_structure(obs)
    arch = ArchSpec.from_text_config(model.config.text_config)
    budget = budget_from_trace(out.trace, arch, kv_dtype=case.torch_dtype, config=case.config).samples[0]
    for lb in budget.layers:
        if arch.kind(lb.layer) != "linear":
            continue
        parts = lb.flops_true
        expected = parts["proj_in"] + parts["proj_out"] + parts["mlp"]
        check(
            live.get(lb.layer) == expected,
            "budget.flops.linear",
            f"linear layer {lb.layer} ({lb.tokens} tokens): the counter saw {live.get(lb.layer)} FLOPs in its "
            f"projections and MLP, the budget says {expected}",
            observed=live.get(lb.layer),
            allowed=expected,
        )
        entry = out.kv[0][lb.layer]
        check(
            entry.keys.numel() == 0 and lb.kv_entries == 0,
            "budget.kv.state-bytes",
            f"linear layer {lb.layer}: the cache reports {entry.keys.numel()} K elements, the budget "
            f"{lb.kv_entries} entries (a linear layer holds a state, no entries)",
        )
        check(
            lb.kv_bytes == linear_state_bytes(arch, case.torch_dtype),
            "budget.kv.state-bytes",
            f"linear layer {lb.layer}: {lb.kv_bytes} state bytes, expected {linear_state_bytes(arch, case.torch_dtype)}",
        )


@pytest.mark.spec("budget.flops.linear", "budget.kv.state-bytes", "hosts.linear.dense", "hosts.linear.bypass")
@given(data=st.data())
def test_linear_layer_budgets(impl, data):
    if "qwen3.5" not in _families(impl):
        pytest.skip(
            release_refuses("qwen3.5") or f"the implementation does not take {HOST_CLASSES['qwen3.5']}"
        )
    case = qwen3_case(data, impl, max_batch=1, family="qwen3.5")
    run_check(check_linear_budget, impl, case)
