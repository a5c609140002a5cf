"""Conformance of spec/layout.md: valid tokens and positions, the visual and text sets, text-only samples, batches."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from rerouting.conformance.oracle.inputs import one_image_fewer, sample_inputs
from rerouting.conformance.oracle.strategies import draw_case, layouts
from rerouting.conformance.oracle.tolerance import compare
from rerouting.conformance.protocol import ERROR_RULES, check


def check_sequence(impl, case):
    """Padding is not part of a sample: both padding sides give the truth's logits and caches (positions 0..T_b-1)."""
    for padding in ("left", "right"):
        padded = dataclasses.replace(case, layout=dataclasses.replace(case.layout, padding=padding))
        obs = observe(impl, padded)
        check_structure(obs)
        check_kv(obs, "layout.sequence")
        check_logits(obs, "layout.sequence")
        check_decisions(obs)


@pytest.mark.spec("layout.sequence")
@given(data=st.data())
def test_sequence(impl, data):
    run_check(check_sequence, impl, draw_case(data, layout=layouts(min_batch=2)))


def check_visual_set(impl, case):
    """V is every image placeholder of every image; fewer image features than placeholders is an error."""
    obs = observe(impl, case)
    check_structure(obs)
    short = one_image_fewer(case, case.inputs(case.device))
    expect_error(
        "layout.visual-set",
        "a batch with one image fewer than its placeholder tokens announce",
        lambda: impl.prefill(case.model(), case.config, **short),
        must_mention=ERROR_RULES["image-features"],
    )


@pytest.mark.spec("layout.visual-set", "layout.vision-reducer")  # identity: V is the host's own
@given(data=st.data())
def test_visual_set(impl, data):
    run_check(check_visual_set, impl, draw_case(data, layout=layouts(min_images=1)))


def check_text_set(impl, case):
    """Text is never scored or deferred: every layer caches every text token and text rows match the truth."""
    obs = observe(impl, case)
    check_structure(obs)
    for b, layout in enumerate(obs.layouts):
        for layer, kv in enumerate(obs.out.kv[b]):
            missing = sorted(set(layout.text) - set(kv.positions.tolist()))
            check(
                not missing,
                "layout.text-set",
                f"sample {b}, layer {layer}: text positions {missing} have no cache entry",
            )
    check_logits(obs, "layout.text-set", positions=lambda b: obs.layouts[b].text)


@pytest.mark.spec("layout.text-set")
@given(data=st.data())
def test_text_set(impl, data):
    run_check(check_text_set, impl, draw_case(data))


def check_text_only(impl, case):
    """A sample without visual tokens is not routed: no decision, every layer dense, the unrouted host's logits."""
    obs = observe(impl, case)
    check_structure(obs)
    check_logits(obs, "layout.text-only")
    check_kv(obs, "layout.text-only")
    text_only = [b for b, n in enumerate(case.layout.images) if not n]
    for b in text_only:
        check(
            not obs.out.trace.samples[b].routed,
            "layout.text-only",
            f"sample {b} has no image but trace.routed is True",
        )
    check_against_host(obs, "layout.text-only", text_only)


@pytest.mark.spec("layout.text-only")
@given(data=st.data())
def test_text_only(impl, data):
    mixed = st.one_of(layouts(max_images=0, routed=False), layouts(min_batch=2, max_images=1))
    run_check(check_text_only, impl, draw_case(data, layout=mixed))


def check_batch_independence(impl, case):
    """Each sample of a batch is routed on its own: the batch equals every sample run alone."""
    batch = observe(impl, case)
    check_structure(batch)
    check_logits(batch, "layout.batch-independence")
    check_decisions(batch)
    for b in range(len(case.layout.samples)):
        inputs = {k: None if v is None else v.to(case.device) for k, v in sample_inputs(case, b).items()}
        single = impl.prefill(case.model(), case.config, **inputs)
        mine = [list(map(int, d.selected)) for d in batch.out.trace.samples[b].decisions]
        theirs = [list(map(int, d.selected)) for d in single.trace.samples[0].decisions]
        if mine != theirs:  # both may be valid near-tie choices; each is then held to the truth on its own
            continue
        cols = batch.layouts[b].valid
        out_batch = batch.out.logits.detach().cpu()[b, cols].double()
        out_alone = single.logits.detach().cpu()[0].double()
        truth = batch.truth.logits[b, cols]
        yard = batch.yardstick.logits[b, cols]
        allowed = 2 * compare(out_alone, truth, yard, case.torch_dtype).allowed
        error = float((out_batch - out_alone).abs().max())
        check(
            error <= allowed,
            "layout.batch-independence",
            f"sample {b}: logits in the batch differ from the sample run alone by {error:.3e} > {allowed:.3e} "
            "(twice the derived tolerance: each run may err by it)",
            observed=error,
            allowed=allowed,
        )


@pytest.mark.spec("layout.batch-independence")
@given(data=st.data())
def test_batch_independence(impl, data):
    run_check(check_batch_independence, impl, draw_case(data, layout=layouts(min_batch=2)))
