"""Qwen3-VL as a host (reference/host_qwen3.py; spec/hosts.md): q/k norms in the probe, DeepStack, generate.

A tiny random Qwen3-VL from a real config (reference/tiny_qwen3.py: GQA 4/2, head_dim 16, q/k norms with
widened weights, interleaved mRoPE, two DeepStack levels after layers 0 and 1), two left-padded samples
with two images of different grids each.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.optimized import greedy_generate, route, routed_prefill
from rerouting.reference import Qwen3VLHost, Reference, RoutingConfig, RoutingError, Schedule
from rerouting.reference import greedy_generate as reference_greedy
from rerouting.reference.host import AttentionParts, bind_ids
from rerouting.reference.host_qwen3 import qwen3_release_refusal
from rerouting.reference.hybrid import embed_inputs
from rerouting.reference.scoring import probe_probabilities
from rerouting.reference.tiny_qwen import IMAGE_TOKEN_ID, TWO_SAMPLES, make_qwen_batch
from rerouting.reference.tiny_qwen3 import PATCH_COLUMNS_16, tiny_qwen3vl

MULTI = Schedule((2, 3, 5), (0.5, 0.5, 0.25))  # d_0 = 2 = L_ds: every injection in the dense prefix
KEEP_ALL = Schedule((2, 3, 5), (1.0, 1.0, 1.0))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REFUSED = qwen3_release_refusal("qwen3-vl")


@pytest.fixture(scope="module")
def model():
    if REFUSED:
        pytest.skip(REFUSED)
    return tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def batch():
    return make_qwen_batch(TWO_SAMPLES, padding="left", seed=0, patch_columns=PATCH_COLUMNS_16)


def unrouted(model, batch, dtype):
    model = copy.deepcopy(model).to(dtype)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        return model(**inputs, mm_token_type_ids=(batch["input_ids"] == IMAGE_TOKEN_ID).int()).logits


def rows(logits, batch):
    return logits[batch["attention_mask"].bool()]


def decisions(trace):
    return [[d.selected for d in sample.decisions] for sample in trace.samples]


@pytest.mark.spec("routing.equiv.keep-all", "hosts.deepstack")
@pytest.mark.parametrize("impl", ["reference", "optimized"])
def test_keep_all_equals_the_unrouted_model(model, batch, impl):
    config = RoutingConfig(KEEP_ALL)
    run = (
        Reference(model, config).prefill
        if impl == "reference"
        else lambda **b: routed_prefill(model, config, **b)
    )
    out = run(**batch).logits
    truth, yardstick = unrouted(model, batch, torch.float64), unrouted(model, batch, torch.float32)
    assert_close(
        f"{impl} keep-all",
        rows(out, batch),
        rows(truth, batch),
        rows(yardstick, batch),
        torch.float32,
        rule="routing.equiv.keep-all",
    )


@pytest.mark.spec("hosts.qk-norm", "scoring.probe.projection")
def test_probe_is_the_layers_own_attention_with_qk_norm(model, batch):
    """The probe's probabilities are the layer's own eager attention weights; without q/k norm they are not."""
    host = Qwen3VLHost(model)
    layouts = host.layouts(
        batch["input_ids"], batch["attention_mask"], image_grid_thw=batch["image_grid_thw"]
    )
    from rerouting.reference.host import RotaryIds

    bound = bind_ids(host, RotaryIds.from_layouts(layouts[:1]))
    embeds, _ = embed_inputs(
        host, batch["input_ids"], batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
    )
    states = embeds[0, layouts[0].valid]  # [T_b, D]
    layer = host.layers[2]
    positions = torch.arange(len(states))
    with torch.no_grad():
        probs = probe_probabilities(bound, layer, states, positions, torch.float32)  # [H, n, n]
        x = layer.input_layernorm(states[None])
        cos, sin = bound.rotary_embeddings(x, positions[None])
        mask = torch.full((len(states),) * 2, torch.finfo(torch.float32).min).triu(1)[None, None]
        model.set_attn_implementation({"text_config": "eager"})
        try:
            _, weights = layer.self_attn(x, position_embeddings=(cos, sin), attention_mask=mask)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
        assert torch.allclose(probs, weights[0], atol=1e-6)
        parts = host.attention_parts(layer)
        assert parts.q_norm is layer.self_attn.q_norm and parts.head_dim == 16

        class NoNorm:  # a probe that skips q/k norm: the scores of another attention
            def __getattr__(self, name):
                return getattr(bound, name)

            def attention_parts(self, layer):
                p = host.attention_parts(layer)
                return AttentionParts(p.input_norm, p.q_proj, p.k_proj, p.head_dim, p.scaling)

        wrong = probe_probabilities(NoNorm(), layer, states, positions, torch.float32)
        assert (wrong - weights[0]).abs().max() > 1e-2


@pytest.mark.spec("hosts.deepstack", "cache.contents", "scoring.probe.projection")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_reference_equals_optimized(model, batch, policy):
    config = RoutingConfig(MULTI, policy=policy)
    ref, opt = Reference(model, config).prefill(**batch), routed_prefill(model, config, **batch)
    assert decisions(ref.trace) == decisions(opt.trace)
    for r, o in zip(ref.trace.samples, opt.trace.samples):
        for x, y in zip(r.decisions, o.decisions):
            assert torch.allclose(x.scores, y.scores, atol=1e-6)
    assert torch.allclose(rows(ref.logits, batch), rows(opt.logits, batch), atol=1e-5)
    for rc, oc in zip(ref.caches, opt.caches):
        for layer in range(6):
            assert rc.positions[layer].tolist() == oc.positions[layer].tolist()
            for p, q in zip(rc.layer_kv(layer), oc.layer_kv(layer)):
                assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.spec("hosts.deepstack", "layout.batch-independence")
def test_injections_change_the_visual_rows_and_batch_equals_alone(model, batch):
    host = Qwen3VLHost(model)
    _, levels = embed_inputs(
        host, batch["input_ids"], batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
    )
    visual = batch["input_ids"] == IMAGE_TOKEN_ID
    assert len(levels) == 2 and all(bool((level[~visual] == 0).all()) for level in levels)
    assert all(bool((level[visual].abs().sum(-1) > 0).all()) for level in levels)
    config = RoutingConfig(MULTI)
    together = routed_prefill(model, config, **batch)
    grids, per = batch["image_grid_thw"], [int(t * h * w) for t, h, w in batch["image_grid_thw"].tolist()]
    for b, (first, start) in enumerate(((0, 0), (2, per[0] + per[1]))):
        keep = batch["attention_mask"][b].bool()
        single = {
            "input_ids": batch["input_ids"][b, keep][None],
            "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
            "pixel_values": batch["pixel_values"][start : start + per[first] + per[first + 1]],
            "image_grid_thw": grids[first : first + 2],
        }
        own = routed_prefill(model, config, **single)
        assert decisions(own.trace) == [decisions(together.trace)[b]]
        assert torch.allclose(together.logits[b, keep], own.logits[0], atol=1e-5)


@pytest.mark.spec("hosts.deepstack", "routing.errors")
def test_a_decision_inside_the_injections_is_an_error(model, batch):
    early = RoutingConfig(Schedule((1, 3), (0.5, 0.25)))
    for run in (
        lambda: Reference(model, early),
        lambda: routed_prefill(model, early, **batch),
        lambda: route(model, early),
    ):
        with pytest.raises(
            RoutingError, match=r"first decision layer 1 .* must be >= 2.*\[rule hosts\.deepstack\]"
        ):
            run()
    features = model.model.get_image_features(
        batch["pixel_values"], batch["image_grid_thw"], return_dict=True
    )
    with pytest.raises(RoutingError, match=r"without their DeepStack features.*\[rule hosts\.deepstack\]"):
        routed_prefill(
            model,
            RoutingConfig(MULTI),
            batch["input_ids"],
            batch["attention_mask"],
            image_features=features.pooler_output,
            image_grid_thw=batch["image_grid_thw"],
        )
    given = routed_prefill(
        model,
        RoutingConfig(MULTI),
        batch["input_ids"],
        batch["attention_mask"],
        image_features=features.pooler_output,
        deepstack_features=features.deepstack_features,
        image_grid_thw=batch["image_grid_thw"],
    )
    assert torch.equal(given.logits, routed_prefill(model, RoutingConfig(MULTI), **batch).logits)


@pytest.mark.spec("cache.decode.positions", "cache.decode.unrouted", "hosts.deepstack")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_generate_under_route_carries_deepstack(model, batch, policy):
    """``generate`` hands the DeepStack levels in ``mm_encoder_outputs``: same tokens as the functional path."""
    config = RoutingConfig(MULTI, policy=policy)
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = None
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    functional, _ = greedy_generate(
        model, config, *args, max_new_tokens=5, image_grid_thw=batch["image_grid_thw"]
    )
    reference, _ = reference_greedy(
        Reference(model, config), *args, max_new_tokens=5, image_grid_thw=batch["image_grid_thw"]
    )
    assert torch.equal(functional, reference)
    with route(model, config) as router:
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated[:, -5:], functional)
    assert all(s.routed for s in router.last_trace.samples)
    if policy == "reroute":  # keep-all under route is the unrouted model's own generate
        with route(model, RoutingConfig(KEEP_ALL)):
            routed = model.generate(**batch, max_new_tokens=5, do_sample=False)
        plain = model.generate(
            **batch,
            mm_token_type_ids=(batch["input_ids"] == IMAGE_TOKEN_ID).int(),
            max_new_tokens=5,
            do_sample=False,
        )
        assert torch.equal(routed, plain)


@pytest.mark.spec("routing.errors")
def test_old_releases_are_refused_with_a_reason():
    for family in ("qwen3-vl", "qwen3.5"):
        reason = qwen3_release_refusal(family, "5.4.0")
        assert reason is not None and "5.4.0" in reason and ">=5.6" in reason
        assert qwen3_release_refusal(family, "5.24.0") is None


@pytest.mark.spec("routing.errors")
@pytest.mark.skipif(REFUSED is None, reason="the installed transformers serves the Qwen3 hosts")
def test_the_installed_old_release_is_refused():
    """On the CI floor leg (5.4) both Qwen3 hosts refuse a real model, naming the release."""
    from rerouting.reference import Qwen3_5Host
    from rerouting.reference.tiny_qwen3 import tiny_qwen35

    for build, host in ((tiny_qwen3vl, Qwen3VLHost), (tiny_qwen35, Qwen3_5Host)):
        with pytest.raises(RoutingError, match=r"host refused: transformers .*\[rule routing\.errors\]"):
            host(build(seed=0))
