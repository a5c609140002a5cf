"""Nüwa on the optimized path: batched stage 1, both stages against the reference, ``route`` + ``generate``."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

from rerouting.optimized import route, routed_prefill
from rerouting.optimized.hf import generate_takes_encoder_outputs
from rerouting.optimized.nuwa import reduce_batch
from rerouting.reference import (
    NuwaParams,
    Reference,
    RoutingConfig,
    RoutingError,
    Schedule,
    Scorer,
    host_for,
    preset,
)
from rerouting.reference.decode import decode_step, greedy_generate
from rerouting.reference.hooks import VisionInputs, vision_reducer
from rerouting.reference.nuwa import encode_images
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """8 decoder layers, a 4-layer CLIP tower on a 5x5 patch grid (odd: edge regions one patch wide)."""
    return tiny_llava(tiny_llava_config(num_layers=8, vision_layers=4, image_size=20), seed=5)


@pytest.fixture(scope="module")
def batch(model):
    specs = [SampleSpec((3, 4)), SampleSpec((2, 1, 3)), SampleSpec((6,)), SampleSpec((0, 2))]
    return make_batch(model.config, specs, padding="right", seed=6)


@pytest.fixture(scope="module")
def preset_model():
    """LLaVA-1.5-shaped toy: 32 decoder layers, a 24-layer CLIP tower (the presets' feature layers 16..24)."""
    return tiny_llava(tiny_llava_config(num_layers=32, vision_layers=24, image_size=24), seed=7)


def nuwa(params: NuwaParams, schedule=None, policy="remove", scorer=None) -> RoutingConfig:
    schedule = schedule or Schedule((3, 5), (4, 2), unit="count")
    scorer = scorer or Scorer(probe_layer="previous")
    return RoutingConfig(schedule, policy=policy, scorer=scorer, reducer="nuwa", reducer_params=params)


@pytest.mark.spec("nuwa.anchors", "nuwa.pillars", "nuwa.collectors", "nuwa.projection", "nuwa.images")
@pytest.mark.parametrize(
    "options",
    [
        {"normalisation": "code"},
        {"normalisation": "convex"},
        {"salience": "cls-key-norm", "pillar_score": "key-norm", "pillar_quantile": 0.75},  # the paper's
    ],
)
def test_batched_stage1_equals_the_reference(model, batch, options):
    params = NuwaParams(tokens=7, top_n=2, distance=5.0, feature_layers=(2, 4), **options)
    host = host_for(model)
    with torch.no_grad():
        outputs = encode_images(host, batch["pixel_values"])
        plain = host.embed(batch["input_ids"], None, outputs.pooler_output)
        layouts = host.layouts(batch["input_ids"], batch["attention_mask"])
        vision = VisionInputs(host, outputs, params)
        ref, ref_layouts = vision_reducer("nuwa")(plain, layouts, vision)
        opt, opt_layouts = reduce_batch(plain, layouts, vision)
    assert [lay.entering for lay in opt_layouts] == [lay.entering for lay in ref_layouts]
    assert [None if lay.entering is None else len(lay.entering) for lay in ref_layouts] == [7, 8, None, 7]
    torch.testing.assert_close(opt, ref)
    changed = (opt != plain).any(-1)  # only collectors' rows move; pillars equal the host's, bit for bit
    assert changed.any() and bool((changed == (ref != plain).any(-1)).all())


@pytest.mark.spec("nuwa.entering", "nuwa.stage2", "nuwa.reroute", "layout.batch-independence")
@pytest.mark.parametrize("policy", ["remove", "reroute"])
def test_optimized_equals_reference_for_both_stages(model, batch, policy):
    config = nuwa(NuwaParams(tokens=7, top_n=2, distance=5.0, feature_layers=(2, 4)), policy=policy)
    ref = Reference(model, config).prefill(**batch)
    opt = routed_prefill(model, config, **batch)
    for a, b in zip(ref.trace.samples, opt.trace.samples):
        assert (a.entering, a.active_visual) == (b.entering, b.active_visual)
        for x, y in zip(a.decisions, b.decisions):
            assert (x.pool, x.k, x.selected, x.probe_keys, x.probe_queries) == (
                y.pool,
                y.k,
                y.selected,
                y.probe_keys,
                y.probe_queries,
            )
            torch.testing.assert_close(x.scores, y.scores)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(opt.logits[valid], ref.logits[valid], rtol=1e-4, atol=1e-5)
    for c, d in zip(ref.caches, opt.caches):
        assert [p.tolist() for p in c.positions] == [p.tolist() for p in d.positions]


@pytest.mark.spec("nuwa.entering", "cache.decode.positions", "nuwa.reroute")
def test_route_and_generate_under_the_preset_continue_after_the_gaps(preset_model):
    config = preset("ours_vs_nuwa_avg64")
    specs = [SampleSpec((5, 3)), SampleSpec((2, 2, 4))]
    inputs = make_batch(preset_model.config, specs, padding="left", seed=8)
    if not generate_takes_encoder_outputs(preset_model):  # transformers < 5.24: refused, naming the release
        with route(preset_model, config), pytest.raises(RoutingError, match=r"\[rule nuwa.probe\]"):
            preset_model.generate(**inputs, max_new_tokens=3, do_sample=False)
        return
    with route(preset_model, config) as router:
        forward = preset_model(**inputs).logits  # the plain forward is routed too (stage 1 from the pixels)
        generated = preset_model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        trace = router.last_trace
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(forward[valid], routed_prefill(preset_model, config, **inputs).logits[valid])
    assert [len(s.entering) for s in trace.samples] == [9, 18]  # min(112, 9 regions); 2 images x min(56, 9)
    reference = Reference(preset_model, config)
    tokens, result = greedy_generate(reference, **inputs, max_new_tokens=3)
    assert torch.equal(generated, tokens)
    # Decode positions: the j-th generated token sits at T_b + j (as if every dropped patch were present).
    # Recomputing the routed prefill over prompt + generated tokens, decisions forced, gives its logits.
    forced = [[list(d.selected) for d in s.decisions] for s in result.trace.samples]
    working = result
    for j in range(2):
        longer = torch.cat([inputs["input_ids"], tokens[:, : j + 1]], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, j + 1, dtype=torch.long)], dim=1)
        again = reference.prefill(longer, mask, inputs["pixel_values"], forced_selection=forced)
        step = decode_step(reference, working, tokens[:, j], j)
        torch.testing.assert_close(step, again.logits[:, -1], rtol=1e-4, atol=1e-5)
        assert [c.length for c in again.caches] == [c.length + j + 1 for c in result.caches]


@pytest.mark.spec("nuwa.images", "nuwa.probe")
@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"),
    reason="get_image_features(return_dict=True) is a later 5.x API than this transformers release",
)
def test_projected_features_alone_are_refused(model, batch):
    config = nuwa(NuwaParams(tokens=7, feature_layers=(2, 4)))
    host = host_for(model)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    with pytest.raises(RoutingError, match=r"\[rule nuwa.images\]"):
        routed_prefill(
            model, config, batch["input_ids"], batch["attention_mask"], image_features=features.pooler_output
        )
    with pytest.raises(RoutingError, match=r"\[rule nuwa.images\]"):
        routed_prefill(model, config, batch["input_ids"], batch["attention_mask"], vision_outputs=features)
    assert host.num_layers == 8
