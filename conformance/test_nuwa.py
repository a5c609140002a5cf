"""Conformance of spec/nuwa.md: stage 1 (the ``nuwa`` reducer) and stage 2 routed over its anchors, and decoding.

Cases are ordinary drawn cases (hosts, layouts with 0-2 images per sample, padding, schedules, policies,
scorers) with the ``nuwa`` reducer and drawn stage-1 parameters; the host's CLIP tower gets 3 layers and a
patch grid of 1-5 (odd grids included). The entering sets are checked first against the float64 reference's
stage 1 (outside the salience near-tie band), then the KV, the logits and the stage-2 decisions as for any
routed case, and decode continues at ``T_b + j``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_decisions,
    check_decode,
    check_kv,
    check_logits,
    check_structure,
    expect_error,
    observe,
    run_check,
    run_decode,
)
from rerouting.conformance.oracle.strategies import Case, HostSpec, Layout, draw_case, hosts, layouts, scorers
from rerouting.conformance.oracle.tolerance import compare
from rerouting.conformance.protocol import check, fail
from rerouting.reference import PRESETS, NuwaParams, RoutingConfig, Schedule, host_for
from rerouting.reference.budget import schedule_trace
from rerouting.reference.nuwa import check_outputs, encode_images, image_reductions, salience

VISION_LAYERS = 3
NOT_ON_QWEN = "the nuwa reducer reads a CLIP tower's [CLS] attention (LLaVA-1.5 only)"


@st.composite
def nuwa_params(draw) -> NuwaParams:
    a = draw(st.integers(1, VISION_LAYERS))
    return NuwaParams(
        tokens=draw(st.integers(1, 12)),
        top_n=draw(st.integers(1, 4)),
        distance=draw(st.sampled_from([0.0, 2.0, 8.0, 280.0])),
        pillar_quantile=draw(st.sampled_from([0.0, 0.55, 1.0])),
        feature_layers=(a, draw(st.integers(a, VISION_LAYERS))),
        normalisation=draw(st.sampled_from(["code", "convex"])),
        salience=draw(st.sampled_from(["cls", "cls-key-norm"])),
        pillar_score=draw(st.sampled_from(["salience", "key-norm"])),
    )


def needs_nuwa(impl) -> None:
    """The implementation must take the ``nuwa`` reducer, or these properties are skipped, saying why."""
    if not impl.supports_reducer("nuwa"):
        pytest.skip(f"{impl.name} declares reducers {list(impl.impl.reducers)}, not 'nuwa' (spec/nuwa.md)")


def draw_nuwa_case(data, layout=None, **options):
    host = hosts(max_grid=5).map(lambda h: replace(h, vision_layers=VISION_LAYERS))
    case = draw_case(
        data,
        host=host,
        layout=layout if layout is not None else layouts(max_images=2),
        scorer=scorers(random=False),
        not_on_qwen=NOT_ON_QWEN,
        **options,
    )
    params = data.draw(nuwa_params(), label="nuwa")
    return replace(case, config=replace(case.config, reducer="nuwa", reducer_params=params))


def _saliences(case, inputs, layouts, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every image's salience ``[P]`` from the reference in ``dtype`` (float64: the truth's model)."""
    model = case.model64() if dtype == torch.float64 else case.model_lp()
    host = host_for(model)
    with torch.no_grad():
        outputs = encode_images(host, inputs["pixel_values"].to(dtype))
        hidden, layer, select, _ = check_outputs(host, outputs, layouts, case.config.reducer_params)
        kind = case.config.reducer_params.salience
        return [salience(layer, hidden[select - 1][i], kind) for i in range(hidden[0].shape[0])]


def check_entering(obs) -> None:
    """[nuwa.anchors] The entering sets equal the float64 reference's stage 1 outside the salience near-tie band."""
    case, inputs, params = obs.case, obs.inputs, obs.case.config.reducer_params
    if inputs["pixel_values"] is None:
        return
    host = host_for(case.model64())
    with torch.no_grad():
        outputs = encode_images(host, inputs["pixel_values"].double())
        truth = image_reductions(host, outputs, obs.layouts, params)
    scores64, scores_lp = None, None
    image = 0
    for b, (layout, sample) in enumerate(zip(obs.layouts, obs.out.trace.samples)):
        expected = tuple(span.start + a for span, r in zip(layout.images, truth[b]) for a in r.anchors)
        mine = getattr(sample, "entering", None)
        if not layout.visual:
            check(mine is None, "nuwa.images", f"sample {b} has no image but records entering set {mine}")
            continue
        if tuple(mine or ()) != expected:
            if scores64 is None:
                scores64 = _saliences(case, inputs, obs.layouts, torch.float64)
                scores_lp = _saliences(case, inputs, obs.layouts, case.torch_dtype)
            flat64 = torch.cat(scores64[image : image + len(layout.images)])
            flat_lp = torch.cat(scores_lp[image : image + len(layout.images)])
            band = 2 * compare(flat_lp, flat64, flat_lp, case.torch_dtype).allowed
            differ = sorted(set(mine or ()) ^ set(expected))
            near = all(
                any(q != p and abs(float(flat64[p] - flat64[q])) <= band for q in differ) for p in differ
            )
            if near:
                reject()  # a near tie in the salience: either order is right at this precision
            fail(
                "nuwa.anchors",
                f"sample {b}: entering set {list(mine or ())}, the reference's {list(expected)} "
                f"(salience differences beyond the near-tie band {band:.3e})",
            )
        image += len(layout.images)


def check_stages(impl, case):
    """Stage 1's entering sets, then the routed forward over them: KV, logits, stage-2 decisions."""
    obs = observe(impl, case)
    check_entering(obs)
    check_structure(obs)
    check_kv(obs, "nuwa.entering")
    check_logits(obs, "nuwa.projection")
    check_decisions(obs)


@pytest.mark.spec(
    "nuwa.probe",
    "nuwa.salience",
    "nuwa.regions",
    "nuwa.anchors",
    "nuwa.similarity",
    "nuwa.proximity",
    "nuwa.pillars",
    "nuwa.collectors",
    "nuwa.projection",
    "nuwa.entering",
    "nuwa.images",
)
@given(data=st.data())
def test_stages(impl, data):
    needs_nuwa(impl)
    run_check(check_stages, impl, draw_nuwa_case(data))


def check_decode_after_gaps(impl, case, steps, token_seed):
    """Decoded tokens take positions T_b, T_b+1, ... after stage 1's gaps, and their logits are the recompute's."""
    run = run_decode(impl, case, steps, token_seed)
    check_entering(run.obs)
    kv = impl.decode_kv(run.outputs[-1])
    for b, layout in enumerate(run.obs.layouts):
        expected = list(range(layout.length, layout.length + steps))
        for layer, entry in enumerate(kv[b]):
            tail = [int(p) for p in entry.positions.tolist()[-steps:]]
            check(
                tail == expected,
                "cache.decode.positions",
                f"sample {b}, layer {layer}: decoded tokens cached at {tail}, expected {expected} (T_b = {layout.length})",
            )
    check_decode(run, "nuwa.entering")


@pytest.mark.spec("nuwa.entering", "cache.decode.positions")
@given(data=st.data())
def test_decode_after_gaps(impl, data):
    needs_nuwa(impl)
    case = draw_nuwa_case(data)
    steps = data.draw(st.integers(1, 2), label="steps")
    run_check(check_decode_after_gaps, impl, case, steps=steps, token_seed=data.draw(st.integers(0, 99)))


def check_keep_all(impl, case):
    """Stage 1 keeping every patch with D = 0: every visual token enters, and the routed forward is the identity's."""
    obs = observe(impl, case)
    for b, (layout, sample) in enumerate(zip(obs.layouts, obs.out.trace.samples)):
        if layout.visual:
            check(
                tuple(sample.entering or ()) == tuple(range(len(layout.visual))),
                "nuwa.equiv.keep-all",
                f"sample {b}: entering set {sample.entering}, expected every visual token",
            )
    identity = replace(case, config=replace(case.config, reducer="identity", reducer_params=None))
    # the identity's truth for the same output (its trace without the entering record, which is the same set)
    samples = tuple(replace(sample, entering=None) for sample in obs.out.trace.samples)
    out = replace(obs.out, trace=replace(obs.out.trace, samples=samples))
    unreduced = observe(impl, identity, out=out)
    check_structure(unreduced)
    check_kv(unreduced, "nuwa.equiv.keep-all")
    check_logits(unreduced, "nuwa.equiv.keep-all")
    check_decisions(unreduced)


@pytest.mark.spec("nuwa.equiv.keep-all")
@given(data=st.data())
def test_keep_all(impl, data):
    needs_nuwa(impl)
    case = draw_nuwa_case(data)
    keep = NuwaParams(tokens=4 * 25 * 2, top_n=4, distance=0.0, feature_layers=(1, 1))
    run_check(check_keep_all, impl, replace(case, config=replace(case.config, reducer_params=keep)))


def check_one_decision(impl, case):
    """Nüwa + Reroute with one stage-2 decision is Nüwa: the reroute run meets the remove run's truth."""
    remove = replace(case, config=replace(case.config, policy="remove"))
    rerouted = impl.prefill(case.model(), case.config, **case.inputs(case.device))
    obs = observe(impl, remove, out=rerouted)
    check_entering(obs)
    check_structure(obs)
    check_kv(obs, "nuwa.equiv.one-decision")
    check_logits(obs, "nuwa.equiv.one-decision")
    check_decisions(obs)


@pytest.mark.spec("nuwa.equiv.one-decision")
@given(data=st.data())
def test_one_decision(impl, data):
    needs_nuwa(impl)
    case = draw_nuwa_case(data, exact_decisions=1, policy="reroute")
    run_check(check_one_decision, impl, case)


PRESET_HOST = HostSpec(num_layers=32, vision_layers=24, grid=4, hidden_size=16, num_heads=2, head_dim=8)


@pytest.mark.spec("nuwa.stage2", "nuwa.reroute", "schedule.presets")
@pytest.mark.parametrize("name", ["nuwa_avg64", "ours_vs_nuwa_avg64"])
def test_presets(impl, name):
    """Fixed cases (32 decoder layers and a 24-layer tower are the costly part): one and two images, padded."""
    needs_nuwa(impl)
    layout = Layout(((2, 3), (1, 2, 2)), padding="left", seed=3)
    run_check(check_stages, impl, Case(PRESET_HOST, layout, PRESETS[name]))


def check_budget(impl, case):
    """Per-layer visual counts of a one-image sample: n_V in the dense prefix, as the model-free trace says."""
    obs = observe(impl, case)
    for b, (layout, sample) in enumerate(zip(obs.layouts, obs.out.trace.samples)):
        if len(layout.images) != 1:
            continue
        model_free = schedule_trace(
            case.config,
            num_text=len(layout.text),
            num_visual=len(layout.visual),
            num_layers=case.host.num_layers,
        ).samples[0]
        check(
            sample.layer_visual_counts == model_free.layer_visual_counts,
            "nuwa.budget",
            f"sample {b}: visual counts per layer {sample.layer_visual_counts}, the schedule's {model_free.layer_visual_counts}",
        )
        check(
            [d.probe_keys for d in sample.decisions] == [d.probe_keys for d in model_free.decisions],
            "nuwa.budget",
            f"sample {b}: probe keys {[d.probe_keys for d in sample.decisions]}, "
            f"the schedule's {[d.probe_keys for d in model_free.decisions]}",
        )


@pytest.mark.spec("nuwa.budget")
@given(data=st.data())
def test_budget(impl, data):
    needs_nuwa(impl)
    run_check(check_budget, impl, draw_nuwa_case(data, layout=layouts(min_images=1, max_images=1)))


def check_refusals(impl, case):
    """A tower with fewer layers than the feature layers, and a bad record, are refused naming the rule."""
    model, inputs = case.model(), case.inputs(case.device)
    deep = replace(case.config, reducer_params=NuwaParams(feature_layers=(1, VISION_LAYERS + 1)))
    expect_error(
        "nuwa.params",
        "feature layers beyond the tower",
        lambda: impl.prefill(model, deep, **inputs),
        must_mention=("nuwa.params",),
    )
    bad = RoutingConfig(Schedule((0,), (1,), unit="count"), reducer="nuwa", reducer_params="not a record")
    expect_error(
        "nuwa.params",
        "a record that is no NuwaParams",
        lambda: impl.prefill(model, bad, **inputs),
        must_mention=("nuwa.params",),
    )


@pytest.mark.spec("nuwa.params")
@given(data=st.data())
def test_refusals(impl, data):
    needs_nuwa(impl)
    run_check(check_refusals, impl, draw_nuwa_case(data, layout=layouts(min_images=1, max_images=1)))
