"""Conformance of spec/routing.md: active sets, causal mask, positions, bypass, readmission, output, errors, equivalences."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from rerouting.conformance.oracle import (
    check_against_host,
    check_decisions,
    check_kv,
    check_logits,
    check_structure,
    expect_error,
    observe,
    run_check,
)
from rerouting.conformance.oracle.strategies import HostSpec, build_model, draw_case, hosts, layouts
from rerouting.conformance.protocol import ERROR_RULES, check, fail


def _forward(impl, case, rule, *, positions=None, kv=True):
    """Forward checks first (caches, then logits), decisions last.

    A decision follows from the states entering its layer; a forward bug upstream shows first in the
    caches (each layer's K/V come from that layer's input), so it is reported under this test's rule
    rather than as a decision that left the near-tie band.
    """
    obs = observe(impl, case)
    check_structure(obs)
    if kv:
        check_kv(obs, rule)
    check_logits(obs, rule, positions=positions)
    check_decisions(obs)
    return obs


def check_active_set(impl, case):
    """At stage s the active set is text + the selection of decision s (every token in the dense prefix)."""
    _forward(impl, case, "routing.active-set")


@pytest.mark.spec("routing.active-set")
@given(data=st.data())
def test_active_set(impl, data):
    run_check(check_active_set, impl, draw_case(data))


def check_causal(impl, case):
    """Block_l runs with an explicit causal mask over the active set (padding never visible)."""
    _forward(impl, case, "routing.active.causal")


@pytest.mark.spec("routing.active.causal")
@given(data=st.data())
def test_causal(impl, data):
    layout = layouts(min_batch=2, text_after_image=True)
    run_check(check_causal, impl, draw_case(data, layout=layout, host=hosts(ties=st.just("none"))))


def check_positions(impl, case):
    """Active tokens keep their original position ids (gaps allowed): RoPE'd keys and logits as the truth's."""
    _forward(impl, case, "routing.active.positions")


@pytest.mark.spec("routing.active.positions")
@given(data=st.data())
def test_positions(impl, data):
    case = draw_case(
        data, host=hosts(ties=st.just("none")), layout=layouts(text_after_image=True), unit="ratio"
    )
    run_check(check_positions, impl, case)


def _deferred_rows(obs, b):
    """Positions of visual tokens not selected at the last decision (deferred/removed: stale states)."""
    sample = obs.out.trace.samples[b]
    if not sample.decisions:
        return []
    last = set(sample.decisions[-1].selected)
    return [p for i, p in enumerate(obs.layouts[b].visual) if i not in last]


def check_bypass(impl, case):
    """A deferred token is an exact identity through its stage: its logits come from its stale state; no cache entry."""
    obs = _forward(impl, case, "routing.bypass", kv=False)
    check_logits(obs, "routing.bypass", positions=lambda b: _deferred_rows(obs, b))
    check_kv(obs, "routing.bypass")


@pytest.mark.spec("routing.bypass")
@given(data=st.data())
def test_bypass(impl, data):
    run_check(check_bypass, impl, draw_case(data, policy="reroute", host=hosts(min_layers=3)))


def _readmitted_rows(obs, b):
    sample, layout = obs.out.trace.samples[b], obs.layouts[b]
    rows = set()
    for s in range(1, len(sample.decisions)):
        before = set(sample.decisions[s - 1].selected)
        rows |= {layout.visual[i] for i in sample.decisions[s].selected if i not in before}
    return sorted(rows) or list(layout.visual)


def check_readmit(impl, case):
    """A token selected again resumes from its stale state, with no catch-up computation."""
    obs = _forward(impl, case, "routing.readmit", kv=False)
    check_logits(obs, "routing.readmit", positions=lambda b: _readmitted_rows(obs, b))
    check_kv(obs, "routing.readmit")


@pytest.mark.spec("routing.readmit")
@given(data=st.data())
def test_readmit(impl, data):
    case = draw_case(
        data, policy="reroute", host=hosts(min_layers=3, ties=st.just("none")), exact_decisions=None
    )
    run_check(check_readmit, impl, case)


def check_output(impl, case):
    """Logits are the final norm and head on every valid position's last hidden state (stale for deferred rows)."""
    _forward(impl, case, "routing.output", kv=False)


@pytest.mark.spec("routing.output")
@given(data=st.data())
def test_output(impl, data):
    run_check(check_output, impl, draw_case(data))


@functools.lru_cache(maxsize=8)
def _text_only_model(host: HostSpec):
    """A LlamaForCausalLM with the host's text config: a model class routing does not support."""
    text = build_model(host).config.text_config
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = LlamaConfig(**{n: getattr(text, n) for n in names}, num_key_value_heads=text.num_key_value_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def check_errors(impl, case):
    """No silent fallback: an unsupported model class and a feature/placeholder mismatch are clear errors."""
    inputs = case.inputs(case.device)
    model = _text_only_model(case.host).to(case.device)
    expect_error(
        "routing.errors",
        "routing a LlamaForCausalLM",
        lambda: impl.prefill(model, case.config, **inputs),
        must_mention=ERROR_RULES["model-class"],
    )
    one = case.on_samples(((2, 1),))
    inputs = one.inputs(case.device)
    extra = inputs["input_ids"].clone()
    extra[0, 0] = case.host.image_token_id  # a text token becomes a placeholder
    expect_error(
        "routing.errors",
        "one more image placeholder than image features",
        lambda: impl.prefill(one.model(), one.config, **dict(inputs, input_ids=extra)),
        must_mention=ERROR_RULES["image-features"],
    )


@pytest.mark.spec("routing.errors")
@given(data=st.data())
def test_errors(impl, data):
    run_check(check_errors, impl, draw_case(data, layout=layouts(min_images=1)))


def check_one_decision(impl, case):
    """With one decision, reroute and remove are the same computation: identical decisions, logits and caches."""
    runs = {}
    for policy in ("reroute", "remove"):
        obs = observe(impl, case.with_config(policy=policy))
        check_structure(obs)
        runs[policy] = obs
    rr, rm = runs["reroute"], runs["remove"]
    for b, (a, c) in enumerate(zip(rr.out.trace.samples, rm.out.trace.samples)):
        for da, dc in zip(a.decisions, c.decisions):
            check(
                tuple(da.selected) == tuple(dc.selected),
                "routing.equiv.one-decision",
                f"sample {b}: reroute selects {list(da.selected)}, remove {list(dc.selected)}",
            )
            check(
                torch.equal(da.scores.cpu(), dc.scores.cpu()),
                "routing.equiv.one-decision",
                f"sample {b}: reroute and remove scores differ (max {float((da.scores - dc.scores).abs().max()):.3e})",
            )
        cols = rr.layouts[b].valid
        la, lc = rr.out.logits.detach().cpu()[b, cols], rm.out.logits.detach().cpu()[b, cols]
        check(
            torch.equal(la, lc),
            "routing.equiv.one-decision",
            f"sample {b}: reroute and remove logits differ by {float((la.double() - lc.double()).abs().max()):.3e} (must be identical)",
            observed=float((la.double() - lc.double()).abs().max()),
            allowed=0.0,
        )
        for layer, (ka, kc) in enumerate(zip(rr.out.kv[b], rm.out.kv[b])):
            same = torch.equal(ka.positions.cpu(), kc.positions.cpu()) and torch.equal(
                ka.keys.cpu(), kc.keys.cpu()
            )
            check(
                same and torch.equal(ka.values.cpu(), kc.values.cpu()),
                "routing.equiv.one-decision",
                f"sample {b}, layer {layer}: reroute and remove caches differ",
            )
    check_logits(rr, "routing.equiv.one-decision")


@pytest.mark.spec("routing.equiv.one-decision")
@given(data=st.data())
def test_one_decision(impl, data):
    run_check(check_one_decision, impl, draw_case(data, exact_decisions=1, policy="reroute"))


def check_keep_all(impl, case):
    """Keep ratio 1 at every decision gives the unrouted host forward (the model's own, eager attention)."""
    obs = observe(impl, case)
    check_structure(obs)
    for b, sample in enumerate(obs.out.trace.samples):
        for s, decision in enumerate(sample.decisions):
            check(
                len(decision.selected) == sample.num_visual,
                "routing.equiv.keep-all",
                f"sample {b}, decision {s}: keeps {len(decision.selected)} of {sample.num_visual}",
            )
    check_against_host(obs, "routing.equiv.keep-all", range(len(case.layout.samples)))


@pytest.mark.spec("routing.equiv.keep-all")
@given(data=st.data())
def test_keep_all(impl, data):
    run_check(check_keep_all, impl, draw_case(data, keep_all=True))


def check_remove_as_reroute(impl, case):
    """Reroute forced to remove's selections gives remove's logits and caches."""
    removed = observe(impl, case.with_config(policy="remove"))
    check_structure(removed)
    check_logits(removed, "routing.equiv.remove")
    forced = removed.selections
    reroute_case = case.with_config(policy="reroute")
    out = impl.prefill(
        reroute_case.model(), reroute_case.config, **reroute_case.inputs(case.device), forced_selection=forced
    )
    rerouted = observe(impl, reroute_case, out=out)
    mine = [[list(map(int, d.selected)) for d in s.decisions] for s in out.trace.samples]
    if mine != [[list(x) for x in s] for s in forced]:
        fail("routing.equiv.remove", f"reroute with forced_selection={forced} selected {mine}")
    rerouted.__dict__["truth"], rerouted.__dict__["yardstick"] = (
        removed.truth,
        removed.yardstick,
    )  # remove's oracle
    check_logits(rerouted, "routing.equiv.remove")
    check_kv(rerouted, "routing.equiv.remove")


@pytest.mark.spec("routing.equiv.remove")
@given(data=st.data())
def test_remove_as_reroute(impl, data):
    case = draw_case(data, monotone=True, host=hosts(min_layers=3), exact_decisions=None)
    run_check(check_remove_as_reroute, impl, case)
