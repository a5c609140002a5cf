"""Conformance of spec/twig.md: TTP prefills with a drawn twig, and self-speculative decoding.

An implementation takes a twig through ``prefill(..., twig=...)`` and runs SSD through an optional
``ssd_generate(model, config, twig, input_ids, attention_mask, pixel_values, *, max_new_tokens, options)``
returning the tokens ``[B, n]`` and a ``rerouting.reference.ssd.SpeculationStats``; without them these checks
fail as a missing capability.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.impls import _accepts
from rerouting.conformance.oracle import (
    check_decisions,
    check_kv,
    check_logits,
    check_structure,
    expect_error,
    run_check,
)
from rerouting.conformance.oracle.twig import TwigObservation, check_ssd, draw_twig_case, run_ssd
from rerouting.conformance.protocol import check
from rerouting.reference import PRESETS, Twig
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget_twig import twig_budget
from rerouting.reference.presets import ttp_keep
from rerouting.reference.ssd import SpeculationOptions


def needs_twig(impl, *, ssd: bool = False) -> None:
    """Skip, saying so, for an implementation without TwigVLM (a ``prefill`` taking no ``twig=``, no ``ssd_generate``).

    Like a host an implementation does not serve (its ``hosts``), the method is optional: the report lists its
    rules as skipped with this reason, never as checked.
    """
    prefill = getattr(impl.impl, "prefill", None)
    if prefill is None or not _accepts(prefill, "twig"):
        pytest.skip(
            f"{impl.name} implements no twig (its prefill takes no twig=): TwigVLM's rules are not checked"
        )
    if ssd and not hasattr(impl.impl, "ssd_generate"):
        pytest.skip(f"{impl.name} has no ssd_generate: self-speculative decoding is not checked")


def check_ttp(impl, case, twig_case):
    """The TTP prefill: structure (the wipe's k = 0 included), decisions, logits and per-layer KV vs the truth;
    its budget per cache group; the same run with the twig saved to and loaded from its folder."""
    obs = TwigObservation(impl, twig_case)
    check_structure(obs)
    check_decisions(obs)
    check_logits(obs, "twig.ttp.score")
    check_kv(obs, "twig.ttp.final-wipe")
    check_budget(obs)
    check_folder(impl, obs)
    return obs


def check_budget(obs):
    """[twig.budget] KV entries per cache group from the trace are what the implementation's cache holds."""
    twig = obs.twig_case.twig
    arch = ArchSpec.from_model(obs.case.model64())
    for b, sample in enumerate(obs.out.trace.samples):
        budget = twig_budget(sample, arch, first_layer=twig.first_layer, twig_layers=twig.num_layers)
        held = [len(entry.positions) for entry in obs.out.kv[b]]
        groups = budget.kv_entries
        check(
            list(groups["base_prefix"]) + list(groups["base_routed"]) == held,
            "twig.budget",
            f"sample {b}: the budget's base KV entries {groups} differ from the cache's {held}",
        )
        check(
            groups["twig"] == (obs.layouts[b].length,) * twig.num_layers,
            "twig.budget",
            f"sample {b}: the twig group {groups['twig']} is not T = {twig.num_layers} layers of the full prompt",
        )


def check_folder(impl, obs):
    """[twig.format] A twig written to its folder and loaded back routes exactly as the twig itself."""
    case = obs.case
    with tempfile.TemporaryDirectory() as folder:
        obs.twig_case.twig_in(case.torch_dtype).save(folder)
        model = case.model()
        loaded = Twig.load(folder, model).to(case.device)
    again = impl.prefill(model, case.config, **case.inputs(case.device), twig=loaded)
    check(
        torch.equal(again.logits.cpu(), obs.out.logits.cpu()),
        "twig.format",
        "the prefill with the twig loaded from its folder differs from the prefill with the twig itself",
    )


@pytest.mark.spec(
    "twig.ttp.score",
    "twig.ttp.final-wipe",
    "twig.module",
    "twig.init-from-base",
    "twig.budget",
    "twig.format",
)
@given(data=st.data())
def test_ttp_prefill(impl, data):
    needs_twig(impl)
    twig_case = draw_twig_case(data)
    run_check(check_ttp, impl, twig_case.case, twig_case=twig_case)


def check_lossless(impl, case, twig_case, max_new_tokens, options):
    """SSD's tokens are greedy's outside the derived near-tie band; every group's lengths follow acceptance."""
    obs, tokens, stats = run_ssd(impl, twig_case, max_new_tokens, options)
    check_structure(obs)
    check(
        tuple(tokens.shape) == (len(obs.layouts), max_new_tokens),
        "twig.ssd.verify",
        f"SSD returned tokens of shape {tuple(tokens.shape)}, expected {(len(obs.layouts), max_new_tokens)}",
    )
    check_ssd(obs, tokens, stats, options)


@pytest.mark.spec(
    "twig.ssd.lossless", "twig.ssd.batch", "twig.ssd.verify", "twig.ssd.draft", "twig.ssd.rollback"
)
@given(data=st.data())
def test_ssd_lossless(impl, data):
    needs_twig(impl, ssd=True)
    twig_case = draw_twig_case(data, max_batch=4, padding="left", max_layers=4)
    options = SpeculationOptions(
        num_speculations=data.draw(st.integers(1, 5), label="num_speculations"),
        draft_confidence=data.draw(st.sampled_from([0.0, 0.6, 0.95]), label="draft_confidence"),
        eos_token_id=data.draw(st.sampled_from([None, 2]), label="eos_token_id"),
    )
    steps = data.draw(st.integers(1, 5), label="max_new_tokens")
    run_check(
        check_lossless, impl, twig_case.case, twig_case=twig_case, max_new_tokens=steps, options=options
    )


def check_presets(impl):
    """The twig presets' schedules are TTP's at R' = ceil((L·R̄ − K·N)/(F − K)) for LLaVA-1.5."""
    for tier, kept in ((64, 41), (128, 134), (192, 227)):
        check(
            ttp_keep(tier, num_layers=32, first_layer=2, final_wipe=24, num_visual=576) == kept,
            "twig.ttp.budget",
            f"R̄={tier} must give R'={kept}",
        )
        ttp, reroute = PRESETS[f"twig_K2_T3_avg{tier}"], PRESETS[f"twig_reroute_K2_T3_avg{tier}"]
        check(
            (ttp.schedule.layers, ttp.schedule.keep, ttp.policy) == ((2, 24), (kept, 0), "remove")
            and (reroute.schedule.layers, reroute.schedule.keep, reroute.policy)
            == ((2, 8, 16, 24), (kept, kept, kept, 0), "reroute")
            and ttp.scorer.kind == reroute.scorer.kind == "twig",
            "twig.presets",
            f"twig presets at {tier}: {ttp}, {reroute}",
        )


@pytest.mark.spec("twig.presets", "twig.ttp.budget")
def test_presets(impl):
    run_check(check_presets, impl)


def check_generate(impl, case, twig_case, max_new_tokens):
    """``generate(assistant_model=twig)`` under ``route``: the prompt, then SSD's tokens as greedy ``generate`` ends
    them (pad after EOS); every option SSD cannot serve is refused naming the rule."""
    from rerouting.optimized import route
    from rerouting.optimized.generate_ssd import finish
    from rerouting.optimized.ssd import ssd_generate

    model, inputs = case.model(), case.inputs(case.device)
    twig = twig_case.twig_in(case.torch_dtype, case.device)
    eos = model.generation_config.eos_token_id
    with route(model, case.config, twig=twig):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=twig)
        for bad in (
            {"do_sample": True},
            {"num_beams": 2},
            {"streamer": object()},
            {"assistant_model": object()},
        ):
            expect_error(
                "twig.ssd.generate",
                f"generate with {sorted(bad)}",
                lambda bad=bad: model.generate(
                    **inputs, max_new_tokens=2, **({"assistant_model": twig} | bad)
                ),
                must_mention=["twig.ssd.generate", "routing.errors"],
            )
    options = SpeculationOptions(eos_token_id=eos)
    tokens, _, _ = ssd_generate(
        model, case.config, twig, **inputs, max_new_tokens=max_new_tokens, options=options
    )
    expected = torch.cat(
        [inputs["input_ids"], finish(tokens, [eos], model.generation_config.pad_token_id or 0)], 1
    )
    check(
        torch.equal(out.cpu(), expected.cpu()),
        "twig.ssd.generate",
        f"generate(assistant_model=twig) returned {out.tolist()}, SSD gives {expected.tolist()}",
    )


@pytest.mark.spec("twig.ssd.generate")
@given(data=st.data())
def test_generate(impl, data):
    needs_twig(
        impl, ssd=True
    )  # generate is rerouting.optimized's entry point, checked with SSD-capable impls
    twig_case = draw_twig_case(data, max_batch=3, padding="left")
    steps = data.draw(st.integers(1, 5), label="max_new_tokens")
    run_check(check_generate, impl, twig_case.case, twig_case=twig_case, max_new_tokens=steps)
