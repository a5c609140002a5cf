"""Conformance of the contract points decided in 0.1.1 (issue 17): each was a guess an implementation had to make.

One property per decision, so that the other guess now fails by the rule's name: a forced selection's
``k`` and pool (``selection.forced``), a count schedule on a text-only sample (``schedule.keep-count``),
the random scorer on a sample without text (``scoring.probe.query-row``), the probe's dtypes
(``scoring.probe.dtype``), flat ``pixel_values`` (``layout.pixel-values``), the prefill's cache while
decoding (``cache.snapshot``), the accepted errors (``routing.errors.ids``) and the supported attention
implementations (``routing.kernels``). The recorded layer under ``probe_layer="previous"`` is checked by
every trace (``check_structure``, under ``scoring.probe.variant-layer``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_decisions,
    check_kv,
    check_logits,
    check_scores,
    check_structure,
    expect_error,
    observe,
    run_check,
)
from rerouting.conformance.oracle.inputs import one_image_more
from rerouting.conformance.oracle.strategies import HostSpec, build_model, draw_case, hosts, layouts
from rerouting.conformance.protocol import ERROR_RULES, SUPPORTED_ATTENTION, check, fail
from rerouting.reference import Schedule, Scorer, candidate_pool, capped_k


def _no_error(rule: str, what: str, fn):
    """``fn()`` must run: the rule says this input is valid."""
    try:
        return fn()
    except AssertionError:  # a failed check or a missing capability, already named
        raise
    except Exception as error:
        fail(rule, f"{what}: raised {type(error).__name__}({error!s:.300}), but the input is valid")


def _prefill(impl, case, **changes):
    inputs = dict(case.inputs(case.device), **changes)
    return lambda: impl.prefill(case.model(), case.config, **inputs)


# ---------------------------------------------------------------------------------------------
# selection.forced
# ---------------------------------------------------------------------------------------------


def forced_selections(case, seed: int) -> list[list[list[int]]]:
    """A valid forced selection for every sample: per decision, k random distinct tokens of the pool."""
    generator = torch.Generator().manual_seed(seed)
    schedule, out = case.config.schedule, []
    for n in case.layout.num_visual(case.host):
        chosen, sample = None, []
        for s in range(schedule.num_decisions if n else 0):
            pool = candidate_pool(case.config.policy, n, chosen)
            k = capped_k(schedule.keep_count(s, n), pool)
            order = torch.randperm(len(pool), generator=generator)[:k].tolist()
            chosen = tuple(sorted(pool[i] for i in order))
            sample.append(list(chosen))
        out.append(sample)
    return out


def check_forced(impl, case, seed):
    """Forced: the forced tokens are selected, k stays the schedule's, the pool binds; anything else is an error."""
    forced = forced_selections(case, seed)
    obs = observe(impl, case, forced=forced)
    check_structure(obs)  # pool from the previous (forced) selection, k = min(k_s, |pool|)
    for b, sample in enumerate(obs.out.trace.samples):
        for s, decision in enumerate(sample.decisions):
            check(
                [int(i) for i in decision.selected] == forced[b][s],
                "selection.forced",
                f"sample {b}, decision {s}: selected {list(decision.selected)}, forced {forced[b][s]}",
            )
    check_kv(obs, "selection.forced")
    check_logits(obs, "selection.forced")
    b = next(b for b, sample in enumerate(forced) if sample)
    n = case.layout.num_visual(case.host)[b]
    for what, entry in _bad_entries(forced[b][-1], n):
        bad = copy.deepcopy(forced)
        bad[b][-1] = entry
        expect_error(
            "selection.forced",
            f"sample {b}'s last forced selection {entry} ({what})",
            lambda bad=bad: impl.prefill(
                case.model(), case.config, **case.inputs(case.device), forced_selection=bad
            ),
            must_mention=ERROR_RULES["forced-selection"],
        )


def _bad_entries(good: list[int], n: int) -> list[tuple[str, list[int]]]:
    """Forced entries that are not k distinct tokens of the pool."""
    bad = [("a token outside the pool", [*good[:-1], n])]
    if len(good) > 1:
        bad.append(("a repeated token, one fewer than k", [good[0]] * len(good)))
    if len(good) < n:
        extra = next(i for i in range(n) if i not in good)
        bad.append(("k + 1 tokens", sorted([*good, extra])))
    return bad


@pytest.mark.spec("selection.forced")
@given(data=st.data())
def test_forced_selection(impl, data):
    case = draw_case(data, layout=layouts(min_images=1))
    run_check(check_forced, impl, case, seed=data.draw(st.integers(0, 2**16), label="forced_seed"))


# ---------------------------------------------------------------------------------------------
# schedule.keep-count, scoring.probe.query-row, scoring.probe.dtype
# ---------------------------------------------------------------------------------------------


def check_count_text_only(impl, case):
    """A count schedule on a batch with a text-only sample: no error, no decision for that sample."""
    out = _no_error(
        "schedule.keep-count", "a count schedule on a batch with a text-only sample", _prefill(impl, case)
    )
    obs = observe(impl, case, out=out)
    check_structure(obs)  # the text-only sample records no decision (layout.text-only)
    check_logits(obs, "schedule.keep-count")


@pytest.mark.spec("schedule.keep-count", "layout.text-only")
@given(data=st.data())
def test_count_schedule_text_only_sample(impl, data):
    case = draw_case(data, unit="count", layout=layouts(max_batch=3, min_images=1))
    layout = case.layout.with_sample((2,))
    run_check(check_count_text_only, impl, dataclasses.replace(case, layout=layout))


def check_random_without_text(impl, case):
    """The random scorer reads no query row: a sample of visual tokens only is routed, not refused."""
    out = _no_error(
        "scoring.probe.query-row", "the random scorer on a sample without text", _prefill(impl, case)
    )
    obs = observe(impl, case, out=out)
    check_structure(obs)
    check_scores(obs, "scoring.probe.query-row")
    check_decisions(obs)
    check_logits(obs, "scoring.probe.query-row")


@pytest.mark.spec("scoring.probe.query-row", "scoring.scorer.random")
@given(data=st.data())
def test_random_scorer_without_text(impl, data):
    scorer = st.builds(Scorer, kind=st.just("random"), seed=st.integers(0, 2**16))
    case = draw_case(
        data,
        scorer=scorer,
        layout=layouts(max_batch=2, min_images=1, text=False),
        not_on_qwen="a Qwen image's vision start/end markers are text tokens: no Qwen sample is without text",
    )
    run_check(check_random_without_text, impl, case)


def check_score_dtype(impl, case):
    """Scores are recorded in the score dtype: float32 below float64, float64 in a float64 run."""
    for dtype in dict.fromkeys((case.dtype, "float64")):
        obs = observe(impl, dataclasses.replace(case, dtype=dtype))
        check_structure(obs)
        check_scores(obs, "scoring.probe.dtype")  # the dtype first, then the values


@pytest.mark.spec("scoring.probe.dtype")
@given(data=st.data())
def test_score_dtype(impl, data):
    run_check(check_score_dtype, impl, draw_case(data, scorer=st.just(Scorer())))


# ---------------------------------------------------------------------------------------------
# layout.pixel-values
# ---------------------------------------------------------------------------------------------


def check_pixel_values(impl, case):
    """Flat pixel_values fill the batch's placeholders in batch order; one image too many is an error."""
    obs = observe(impl, case)
    check_structure(obs)
    check_kv(obs, "layout.pixel-values")
    check_logits(obs, "layout.pixel-values")
    expect_error(
        "layout.pixel-values",
        "a batch with one image more than its placeholder tokens announce",
        _prefill(impl, case, **one_image_more(case, case.inputs(case.device))),
        must_mention=ERROR_RULES["image-features"],
    )


@pytest.mark.spec("layout.pixel-values", "layout.visual-set")
@given(data=st.data())
def test_pixel_values(impl, data):
    run_check(check_pixel_values, impl, draw_case(data, layout=layouts(min_batch=2, min_images=1)))


# ---------------------------------------------------------------------------------------------
# cache.snapshot
# ---------------------------------------------------------------------------------------------


def check_snapshot(impl, case, steps):
    """The cache the prefill reported is unchanged by decode steps."""
    obs = observe(impl, case)
    before = [[tuple(t.detach().clone() for t in kv) for kv in sample] for sample in obs.out.kv]
    generator = torch.Generator().manual_seed(steps)
    for step in range(steps):
        tokens = torch.randint(4, 32, (len(case.layout.samples),), generator=generator)
        impl.decode_step(case.model(), case.config, obs.out, tokens.to(case.device), step)
    for b, sample in enumerate(obs.out.kv):
        for layer, kv in enumerate(sample):
            same = all(
                a.shape == t.shape and torch.equal(a.detach().cpu(), t.detach().cpu())
                for a, t in zip(kv, before[b][layer])
            )
            check(
                same,
                "cache.snapshot",
                f"sample {b}, layer {layer}: PrefillOutput.kv changed over {steps} decode steps "
                f"({before[b][layer][0].shape[-2]} entries after prefill, {kv.keys.shape[-2]} now); the prefill's "
                "cache must stay as it was (report copies, or views decoding never writes through)",
            )


@pytest.mark.spec("cache.snapshot")
@given(data=st.data())
def test_snapshot(impl, data):
    case = draw_case(data, layout=layouts(max_batch=2))
    run_check(check_snapshot, impl, case, steps=data.draw(st.integers(1, 2), label="steps"))


# ---------------------------------------------------------------------------------------------
# routing.errors.ids, routing.kernels
# ---------------------------------------------------------------------------------------------


def check_error_ids(impl, case):
    """Each refused input raises an error (any type but NotImplementedError) naming one of its listed rules."""
    L = case.host.num_layers
    n_min = min(n for n in case.layout.num_visual(case.host) if n)
    bad = {
        "decision-layer": case.with_config(schedule=Schedule((L,), (0.5,))),
        "keep-count": case.with_config(schedule=Schedule((0,), (n_min + 1,), unit="count")),
        "no-text": case.on_samples(((0, 0),)),
    }
    if case.host.is_qwen:  # a Qwen image's vision start/end markers are text: no sample is without text
        del bad["no-text"]
    for key, bad_case in bad.items():
        expect_error(
            "routing.errors.ids",
            f"{key} ({bad_case.config.schedule}, samples {bad_case.layout.samples})",
            _prefill(impl, bad_case),
            must_mention=ERROR_RULES[key],
        )


@pytest.mark.spec("routing.errors.ids")
@given(data=st.data())
def test_error_ids(impl, data):
    run_check(check_error_ids, impl, draw_case(data, scorer=st.just(Scorer()), layout=layouts(min_images=1)))


OTHER_KERNEL = "flex_attention"  # a kernel transformers offers on every machine, outside SUPPORTED_ATTENTION


@functools.lru_cache(maxsize=8)
def _other_kernel_model(host: HostSpec, dtype: str, device: str):
    model = copy.deepcopy(build_model(host, dtype, device))
    model.set_attn_implementation({"text_config": OTHER_KERNEL})
    return model


def check_kernels(impl, case):
    """A host set to a kernel outside eager/sdpa is run correctly under one of them, or refused naming routing.errors."""
    assert OTHER_KERNEL not in SUPPORTED_ATTENTION
    model = _other_kernel_model(case.host, case.dtype, case.device)
    try:
        out = impl.prefill(model, case.config, **case.inputs(case.device))
    except AssertionError:
        raise
    except Exception as error:
        named = any(rule in str(error) for rule in ERROR_RULES["attention"])
        check(
            named,
            "routing.kernels",
            f"a host set to {OTHER_KERNEL!r}: raised {type(error).__name__}({error!s:.300}), which names none of "
            f"{list(ERROR_RULES['attention'])}",
        )
    else:
        obs = observe(impl, case, out=out)
        check_structure(obs)
        check_logits(obs, "routing.kernels")
    setting = model.config.get_text_config()._attn_implementation
    check(
        setting == OTHER_KERNEL,
        "routing.kernels",
        f"the prefill changed the host's attention implementation from {OTHER_KERNEL!r} to {setting!r}",
    )


@pytest.mark.spec("routing.kernels", "routing.errors")
@given(data=st.data())
def test_kernels(impl, data):
    case = draw_case(
        data,
        host=hosts(max_layers=3),
        not_on_qwen=f"transformers' Qwen2.5-VL text model refuses {OTHER_KERNEL!r} (set_attn_implementation "
        "raises), and no other kernel outside eager/sdpa runs on every machine",
    )
    run_check(check_kernels, impl, case)
