"""Conformance of spec/schedule.md: decision layers, keep ratios and counts, the dense prefix, stages, presets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_decisions,
    check_kv,
    check_logits,
    check_structure,
    expect_error,
    observe,
    run_check,
)
from rerouting.conformance.oracle.strategies import (
    SETTINGS,
    Case,
    HostSpec,
    draw_case,
    dtypes,
    hosts,
    layouts,
    presets,
)
from rerouting.conformance.protocol import ERROR_RULES, check
from rerouting.reference import PRESETS, RoutingError, Schedule, preset


def check_decision_layers(impl, case):
    """Decisions happen at exactly the schedule's layers; a layer outside [0, L) is an error."""
    obs = observe(impl, case)
    check_structure(obs)
    L = case.host.num_layers
    bad = case.with_config(schedule=Schedule((L,), (0.5,)))
    expect_error(
        "schedule.decision-layers",
        f"decision layer {L} in a decoder of {L} layers",
        lambda: impl.prefill(bad.model(), bad.config, **bad.inputs(bad.device)),
        must_mention=ERROR_RULES["decision-layer"],
    )


@pytest.mark.spec("schedule.decision-layers")
@given(data=st.data())
def test_decision_layers(impl, data):
    run_check(check_decision_layers, impl, draw_case(data))


def check_keep_ratio(impl, case):
    """k = max(1, floor(N·r)) of the sample's ORIGINAL N (then capped by the pool)."""
    obs = observe(impl, case)
    check_structure(obs)
    schedule = case.config.schedule
    for b, sample in enumerate(obs.out.trace.samples):
        n = sample.num_visual
        for s, decision in enumerate(sample.decisions):
            expected = min(max(1, math.floor(n * schedule.keep[s])), len(decision.pool))
            check(
                decision.k == expected,
                "schedule.keep-ratio",
                f"sample {b}, decision {s}: k={decision.k}, max(1, floor({n} x {schedule.keep[s]})) capped by the pool = {expected}",
            )


@pytest.mark.spec("schedule.keep-ratio")
@given(data=st.data())
def test_keep_ratio(impl, data):
    run_check(check_keep_ratio, impl, draw_case(data, unit="ratio"))


def check_keep_count(impl, case):
    """An absolute keep count is taken as is; a count above a sample's N is an error."""
    obs = observe(impl, case)
    check_structure(obs)
    n_min = min(n for n in case.layout.num_visual(case.host) if n)
    too_many = case.with_config(
        schedule=Schedule(case.config.schedule.layers[:1], (n_min + 1,), unit="count")
    )
    expect_error(
        "schedule.keep-count",
        f"keep count {n_min + 1} for a sample with N={n_min}",
        lambda: impl.prefill(too_many.model(), too_many.config, **too_many.inputs(too_many.device)),
        must_mention=ERROR_RULES["keep-count"],
    )


@pytest.mark.spec("schedule.keep-count")
@given(data=st.data())
def test_keep_count(impl, data):
    run_check(check_keep_count, impl, draw_case(data, unit="count"))


def check_dense_prefix(impl, case):
    """Layers before d_0 run every token: full active sets and caches, the truth's K/V there."""
    obs = observe(impl, case)
    check_structure(obs)
    check_kv(obs, "schedule.dense-prefix")


@pytest.mark.spec("schedule.dense-prefix")
@given(data=st.data())
def test_dense_prefix(impl, data):
    run_check(check_dense_prefix, impl, draw_case(data, min_first_layer=1, host=hosts(min_layers=3)))


def check_stages(impl, case):
    """Stage s covers [d_s, d_{s+1}) and reuses decision s at every layer: active sets and caches per stage."""
    obs = observe(impl, case)
    check_structure(obs)
    check_kv(obs, "schedule.stages")
    check_decisions(obs)


@pytest.mark.spec("schedule.stages")
@given(data=st.data())
def test_stages(impl, data):
    run_check(check_stages, impl, draw_case(data, host=hosts(min_layers=3, max_layers=6)))


def check_preset(impl, case, name):
    """A named preset runs as its schedule says (on a tiny host with the preset's 32 layers)."""
    obs = observe(impl, case)
    check_structure(obs)
    check_logits(obs, "schedule.presets")
    check_decisions(obs)
    try:
        preset("no-such-preset")
    except RoutingError as error:
        check(
            all(n in str(error) for n in PRESETS) and "schedule.presets" in str(error),
            "schedule.presets",
            f"the unknown-preset error does not list every valid name: {error}",
        )
    else:
        check(False, "schedule.presets", "preset('no-such-preset') raised no error")


@pytest.mark.spec("schedule.presets")
@given(data=st.data())
def test_presets(impl, data):
    name = data.draw(presets(32), label="preset")
    host = HostSpec(
        num_layers=32, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16, grid=3
    )
    layout = data.draw(layouts(max_batch=2, min_images=1, max_images=2), label="layout")
    dtype = data.draw(dtypes(), label="dtype")
    run_check(
        check_preset, impl, Case(host, layout, PRESETS[name], dtype=dtype, device=SETTINGS.device), name=name
    )


def check_keep_zero(impl, case):
    """A final decision keeping 0 (any scorer, any policy): no visual token after it, no scorer run, the rest as usual."""
    obs = observe(impl, case)
    check_structure(obs)  # k = 0, an empty selection, no probe ([schedule.keep-zero])
    check_logits(obs, "schedule.keep-zero")
    check_decisions(obs)
    for b, sample in enumerate(obs.out.trace.samples):
        if sample.decisions:
            wipe = case.config.schedule.layers[-1]
            check(
                not any(sample.active_visual[wipe:]),
                "schedule.keep-zero",
                f"sample {b}: visual tokens active at or after the k = 0 decision at layer {wipe}",
            )


@pytest.mark.spec("schedule.keep-zero")
@given(data=st.data())
def test_keep_zero(impl, data):
    case = draw_case(data, unit="count")
    schedule = case.config.schedule
    L = case.host.num_layers
    if schedule.layers[-1] < L - 1 and data.draw(st.booleans(), label="append_wipe"):
        wipe = data.draw(st.integers(schedule.layers[-1] + 1, L - 1), label="wipe_layer")
        zeroed = Schedule((*schedule.layers, wipe), (*schedule.keep, 0), unit="count")
    else:
        zeroed = Schedule(schedule.layers, (*schedule.keep[:-1], 0), unit="count")
    run_check(check_keep_zero, impl, case.with_config(schedule=zeroed))
