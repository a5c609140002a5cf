"""Conformance of spec/scoring.md: the scorers, the attention probe's parts and its two named variants."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    _decisions,
    check_decisions,
    check_scores,
    check_structure,
    expect_error,
    observe,
    run_check,
    score_tolerance,
)
from rerouting.conformance.oracle.strategies import (
    SETTINGS,
    Case,
    HostSpec,
    Layout,
    draw_case,
    hosts,
    layouts,
    scorers,
)
from rerouting.conformance.protocol import ERROR_RULES, check
from rerouting.reference import RoutingConfig, RoutingError, Schedule, Scorer


def _probe(impl, case, rule):
    obs = observe(impl, case)
    check_structure(obs)
    check_scores(obs, rule)
    check_decisions(obs)
    return obs


def check_scorer(impl, case):
    """The scorer is the attention probe or the seeded random baseline; no other kind exists."""
    _probe(impl, case, "scoring.scorer")
    try:
        Scorer(kind="entropy")
    except RoutingError as error:
        check(
            "scoring.scorer" in str(error), "scoring.scorer", f"unknown scorer error names no rule: {error}"
        )
    else:
        check(False, "scoring.scorer", "Scorer(kind='entropy') was accepted")


@pytest.mark.spec("scoring.scorer")
@given(data=st.data())
def test_scorer(impl, data):
    run_check(check_scorer, impl, draw_case(data, scorer=scorers(variants=False)))


def check_random(impl, case):
    """Random scores are the seeded float64 draws cast to float32, bit for bit; decisions are then exact.

    The random scorer runs no probe, so every decision records ``probe_keys = probe_queries = 0``
    ([budget.flops.probe]: "the random scorer costs zero"; the budget is computed from those sizes).
    """
    obs = _probe(impl, case, "scoring.scorer.random")
    for b, sample in enumerate(obs.out.trace.samples):
        for decision in sample.decisions:
            sizes = (int(decision.probe_keys), int(decision.probe_queries))
            check(
                sizes == (0, 0),
                "budget.flops.probe",
                f"sample {b}, decision at layer {decision.layer}: the random scorer runs no probe, but the "
                f"trace records probe_keys={sizes[0]}, probe_queries={sizes[1]} (expected 0, 0)",
                observed=sizes,
                allowed=(0, 0),
            )


@pytest.mark.spec("scoring.scorer.random", "budget.flops.probe")
@given(data=st.data())
def test_random(impl, data):
    scorer = st.builds(Scorer, kind=st.just("random"), seed=st.integers(0, 2**16))
    run_check(check_random, impl, draw_case(data, scorer=scorer))


def check_probe_input(impl, case):
    """The probe reads the states entering layer d: reroute over every token (stale deferred ones), remove over text + pool."""
    _probe(impl, case, "scoring.probe.input")


@pytest.mark.spec("scoring.probe.input")
@given(data=st.data())
def test_probe_input(impl, data):
    run_check(check_probe_input, impl, draw_case(data, host=hosts(min_layers=3), exact_decisions=None))


def check_projection(impl, case):
    """Layer d's own norm and q/k projections, RoPE at original positions, each KV head serving its query group."""
    _probe(impl, case, "scoring.probe.projection")


@pytest.mark.spec("scoring.probe.projection")
@given(data=st.data())
def test_projection(impl, data):
    run_check(check_projection, impl, draw_case(data, host=hosts(ties=st.just("none"))))


def check_softmax(impl, case):
    """fp32 logits, causal mask, softmax over every probe key (text included): scores sum to at most 1."""
    obs = _probe(impl, case, "scoring.probe.softmax")
    heads = case.host.num_heads
    for b, s, mine, truth, yard in _decisions(obs):
        beta, _ = score_tolerance(
            truth.scores,
            yard.scores,
            keys=truth.probe_keys,
            heads=heads,
            queries=truth.probe_queries,
            dtype=obs.score_dtype,
        )
        total = float(mine.scores.double().sum())
        allowed = 1.0 + beta * len(truth.pool)
        check(
            total <= allowed,
            "scoring.probe.softmax",
            f"sample {b}, decision {s}: visual scores sum to {total:.9g} > 1 (+ tolerance): the softmax must run over "
            "every probe key, text included, with no renormalisation over visual keys",
            observed=total,
            allowed=allowed,
        )


@pytest.mark.spec("scoring.probe.softmax")
@given(data=st.data())
def test_softmax(impl, data):
    run_check(check_softmax, impl, draw_case(data, exact_decisions=None))


def check_query_row(impl, case):
    """The query row is the last valid text token; a sample without text is an error."""
    _probe(impl, case, "scoring.probe.query-row")
    if (
        case.host.is_qwen
    ):  # its images' vision start/end markers are text: a sample without text cannot be built
        return
    bad = case.on_samples(((0, 0),))
    expect_error(
        "scoring.probe.query-row",
        "a sample with no text token",
        lambda: impl.prefill(bad.model(), bad.config, **bad.inputs(bad.device)),
        must_mention=ERROR_RULES["no-text"],
    )


@pytest.mark.spec("scoring.probe.query-row")
@given(data=st.data())
def test_query_row(impl, data):
    run_check(check_query_row, impl, draw_case(data))


def check_head_mean(impl, case):
    """Score = mean over query heads of the post-softmax probability at the token's column."""
    _probe(impl, case, "scoring.probe.head-mean")


@pytest.mark.spec("scoring.probe.head-mean")
@given(data=st.data())
def test_head_mean(impl, data):
    run_check(check_head_mean, impl, draw_case(data, host=hosts(ties=st.just("none"))))


def check_variant_layer(impl, case):
    """probe_layer='previous': scores from layer d-1's weights on layer d-1's input (original FastV)."""
    _probe(impl, case, "scoring.probe.variant-layer")


@pytest.mark.spec("scoring.probe.variant-layer")
@given(data=st.data())
def test_variant_layer(impl, data):
    scorer = st.just(Scorer(probe_layer="previous"))
    run_check(check_variant_layer, impl, draw_case(data, scorer=scorer, host=hosts(min_layers=2)))


def check_variant_query(impl, case):
    """query='text-after-image': the mean over text rows after the last visual token; none is an error."""
    _probe(impl, case, "scoring.probe.variant-query")
    if case.host.is_qwen:  # its vision end marker is text after every image: the error case cannot be built
        return
    bad = case.on_samples(((2, 0),))
    expect_error(
        "scoring.probe.variant-query",
        "query='text-after-image' with no text after the image",
        lambda: impl.prefill(bad.model(), bad.config, **bad.inputs(bad.device)),
        must_mention=ERROR_RULES["no-text-after-image"],
    )


@pytest.mark.spec("scoring.probe.variant-query")
@given(data=st.data())
def test_variant_query(impl, data):
    scorer = st.just(Scorer(query="text-after-image"))
    run_check(
        check_variant_query, impl, draw_case(data, scorer=scorer, layout=layouts(text_after_image=True))
    )


# Cases Hypothesis found once, pinned so that every profile runs them (array-api-tests' explicit examples).
PINNED_VARIANT_QUERY = [
    pytest.param(
        Case(
            HostSpec(
                num_layers=2,
                hidden_size=4,
                num_heads=1,
                num_kv_heads=1,
                head_dim=4,
                intermediate_size=16,
                grid=1,
            ),
            Layout(samples=((0, 2), (0, 0, 1)), padding="left", seed=0),
            RoutingConfig(
                Schedule((0, 1), (0.75, 1.0)), policy="remove", scorer=Scorer(query="text-after-image")
            ),
        ),
        id="remove-2-decisions-samples-with-different-text-after-image",  # crashed rerouting.optimized (IndexError)
    ),
]


@pytest.mark.spec("scoring.probe.variant-query")
@pytest.mark.parametrize("case", PINNED_VARIANT_QUERY)
def test_variant_query_pinned(impl, case):
    run_check(check_variant_query, impl, dataclasses.replace(case, device=SETTINGS.device))
