"""Qwen3.5 as a host (reference/host_qwen3.py; spec/hosts.md): hybrid decoder, both linear-attention semantics.

A tiny random Qwen3.5 from a real config (reference/tiny_qwen3.py): 8 layers, softmax attention at 1, 3, 5,
7 (gated query, zero-centred q/k norms, partial rotary over 4 of 16 dims), Gated DeltaNet elsewhere; two
left-padded samples with two images each.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.optimized import greedy_generate, route, routed_prefill
from rerouting.reference import Qwen3_5Host, Reference, RoutingConfig, RoutingError, Schedule
from rerouting.reference import greedy_generate as reference_greedy
from rerouting.reference.host import RotaryIds, bind_ids
from rerouting.reference.host_qwen3 import qwen3_release_refusal
from rerouting.reference.hybrid import embed_inputs, layer_visual, run_linear_block
from rerouting.reference.scoring import probe_probabilities
from rerouting.reference.tiny_qwen import IMAGE_TOKEN_ID, TWO_SAMPLES, make_qwen_batch
from rerouting.reference.tiny_qwen3 import PATCH_COLUMNS_16, tiny_qwen35

MULTI = Schedule((1, 3, 5), (0.5, 0.5, 0.25))  # the softmax layers of the tiny model
KEEP_ALL = Schedule((1, 3, 5), (1.0, 1.0, 1.0))
SEMANTICS = ("dense", "bypass")
SOFTMAX = (1, 3, 5, 7)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REFUSED = qwen3_release_refusal("qwen3.5")


@pytest.fixture(scope="module")
def model():
    if REFUSED:
        pytest.skip(REFUSED)
    return tiny_qwen35(seed=0)


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


def alone(batch, b):
    grids = batch["image_grid_thw"]
    per = [int(t * h * w) for t, h, w in grids.tolist()]
    start = 0 if b == 0 else per[0] + per[1]
    keep = batch["attention_mask"][b].bool()
    return {
        "input_ids": batch["input_ids"][b, keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "pixel_values": batch["pixel_values"][start : start + per[2 * b] + per[2 * b + 1]],
        "image_grid_thw": grids[2 * b : 2 * b + 2],
    }


@pytest.mark.spec("routing.equiv.keep-all", "hosts.linear.semantics", "hosts.partial-rotary")
@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("impl", ["reference", "optimized"])
def test_keep_all_equals_the_unrouted_model(model, batch, impl, semantics):
    config = RoutingConfig(KEEP_ALL, linear_attention=semantics)
    if impl == "reference":
        out = Reference(model, config).prefill(**batch).logits
    else:
        out = routed_prefill(model, config, **batch).logits
    truth, yardstick = unrouted(model, batch, torch.float64), unrouted(model, batch, torch.float32)
    assert_close(
        f"{impl} keep-all ({semantics})",
        rows(out, batch),
        rows(truth, batch),
        rows(yardstick, batch),
        torch.float32,
        rule="routing.equiv.keep-all",
    )


@pytest.mark.spec("hosts.gated-query", "hosts.qk-norm", "hosts.partial-rotary")
def test_probe_is_the_layers_own_attention(model, batch):
    """Gated query (query half), zero-centred q/k norms, RoPE over the first 4 dims: the layer's eager weights."""
    host = Qwen3_5Host(model)
    layouts = host.layouts(
        batch["input_ids"], batch["attention_mask"], image_grid_thw=batch["image_grid_thw"]
    )
    bound = bind_ids(host, RotaryIds.from_layouts(layouts[:1]))
    embeds, _ = embed_inputs(
        host, batch["input_ids"], batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
    )
    states = embeds[0, layouts[0].valid]
    layer, positions = host.layers[3], torch.arange(len(states))
    with torch.no_grad():
        probs = probe_probabilities(bound, layer, states, positions, torch.float32)
        x = layer.input_layernorm(states[None])
        cos, sin = bound.rotary_embeddings(x, positions[None])
        assert cos.shape[-1] == 4  # partial_rotary_factor 0.25 of head_dim 16
        mask = torch.full((len(states),) * 2, torch.finfo(torch.float32).min).triu(1)[None, None]
        model.set_attn_implementation({"text_config": "eager"})
        try:
            _, weights = layer.self_attn(x, position_embeddings=(cos, sin), attention_mask=mask)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.allclose(probs, weights[0], atol=1e-6)
    assert host.attention_parts(layer).query_gate


@pytest.mark.spec("hosts.linear.dense", "hosts.linear.bypass", "cache.contents", "hosts.linear.cache")
@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_reference_equals_optimized(model, batch, policy, semantics):
    config = RoutingConfig(MULTI, policy=policy, linear_attention=semantics)
    ref, opt = Reference(model, config).prefill(**batch), routed_prefill(model, config, **batch)
    assert decisions(ref.trace) == decisions(opt.trace)
    assert [s.active_visual for s in ref.trace.samples] == [s.active_visual for s in opt.trace.samples]
    for r, o in zip(ref.trace.samples, opt.trace.samples):
        for x, y in zip(r.decisions, o.decisions):
            assert torch.allclose(x.scores, y.scores, atol=1e-6)
    assert torch.allclose(rows(ref.logits, batch), rows(opt.logits, batch), atol=1e-5)
    kinds = Qwen3_5Host(model).layer_kinds
    for b, rc in enumerate(ref.caches):
        oc = opt.caches[b]
        for layer in range(8):
            assert rc.positions[layer].tolist() == oc.positions[layer].tolist()
            if kinds[layer] == "linear":
                ours = opt.cache.layer_state(layer, b)
                theirs = (
                    rc.cache.layers[layer].conv_states[0][0],
                    rc.cache.layers[layer].recurrent_states[0][0],
                )
                assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(ours, theirs))
            else:
                for p, q in zip(rc.layer_kv(layer), oc.layer_kv(layer)):
                    assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.spec("hosts.linear.semantics", "hosts.linear.dense", "hosts.linear.bypass")
def test_the_semantics_differ_under_reroute_only(model, batch):
    out = {
        (policy, sem): Reference(model, RoutingConfig(MULTI, policy=policy, linear_attention=sem)).prefill(
            **batch
        )
        for policy in ("reroute", "remove")
        for sem in SEMANTICS
    }
    assert torch.equal(out["remove", "dense"].logits, out["remove", "bypass"].logits)
    assert not torch.allclose(out["reroute", "dense"].logits, out["reroute", "bypass"].logits, atol=1e-4)
    dense, bypass = out["reroute", "dense"].trace.samples[0], out["reroute", "bypass"].trace.samples[0]
    for layer in range(
        8
    ):  # a linear layer of a stage runs every visual token under dense, the selection under bypass
        if layer not in SOFTMAX and layer > 1:
            assert dense.active_visual[layer] == tuple(range(10))
            assert bypass.active_visual[layer] == bypass.active_visual[layer - 1]
    assert layer_visual("linear", "reroute", "dense", 4, (1,)) == (0, 1, 2, 3)
    assert layer_visual("linear", "remove", "dense", 4, (1,)) == (1,)
    assert layer_visual("softmax", "reroute", "dense", 4, (1,)) == (1,)


@pytest.mark.spec("hosts.linear.bypass", "routing.bypass")
def test_bypass_leaves_deferred_rows_bit_identical(model):
    layer = Qwen3_5Host(model).layers[0]
    hidden = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    from rerouting.reference.compat import new_cache

    with torch.no_grad():
        out = run_linear_block(layer, hidden, [0, 2, 3, 6], new_cache(("linear",)))
        alone_rows = run_linear_block(layer, hidden[[0, 2, 3, 6]], [0, 1, 2, 3], new_cache(("linear",)))
    assert torch.equal(out[[1, 4, 5]], hidden[[1, 4, 5]])
    assert torch.equal(out[[0, 2, 3, 6]], alone_rows)  # the recurrence over the active rows, in order


@pytest.mark.spec("layout.batch-independence", "hosts.linear.semantics")
@pytest.mark.parametrize("semantics", SEMANTICS)
def test_batch_equals_each_sample_alone(model, batch, semantics):
    config = RoutingConfig(MULTI, linear_attention=semantics)
    together = routed_prefill(model, config, **batch)
    for b in range(2):
        own = routed_prefill(model, config, **alone(batch, b))
        assert decisions(own.trace) == [decisions(together.trace)[b]]
        keep = batch["attention_mask"][b].bool()
        assert torch.allclose(together.logits[b, keep], own.logits[0], atol=1e-5)


@pytest.mark.spec("hosts.linear.decisions", "routing.errors")
def test_decisions_at_linear_layers_are_errors(model, batch):
    with pytest.raises(
        RoutingError,
        match=r"decision layer 2 is a linear_attention layer.*\[1, 3, 5, 7\].*\[rule hosts\.linear\.decisions\]",
    ):
        Reference(model, RoutingConfig(Schedule((1, 2), (0.5, 0.25))))
    for run in (lambda c: routed_prefill(model, c, **batch), lambda c: route(model, c)):
        with pytest.raises(
            RoutingError, match=r"decision layer 0 is a linear_attention.*hosts\.linear\.decisions"
        ):
            run(RoutingConfig(Schedule((0,), (0.5,))))
    from rerouting.reference import Scorer

    previous = RoutingConfig(MULTI, scorer=Scorer(probe_layer="previous"))
    with pytest.raises(RoutingError, match=r"probe layer 0 is a linear_attention.*hosts\.linear\.decisions"):
        routed_prefill(model, previous, **batch)
    with pytest.raises(RoutingError, match=r"linear_attention 'skip'.*\[rule hosts\.linear\.semantics\]"):
        RoutingConfig(MULTI, linear_attention="skip")


@pytest.mark.spec("cache.decode.unrouted", "cache.decode.positions", "hosts.linear.cache")
@pytest.mark.parametrize(
    ("policy", "semantics"), [("reroute", "dense"), ("reroute", "bypass"), ("remove", "dense")]
)
def test_generate_under_route_equals_functional_greedy(model, batch, policy, semantics):
    config = RoutingConfig(MULTI, policy=policy, linear_attention=semantics)
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
    if (
        semantics == "bypass"
    ):  # keep-all under route: the unrouted model's own generate (its own hybrid cache)
        with route(model, RoutingConfig(KEEP_ALL, linear_attention=semantics)):
            routed = model.generate(**batch, max_new_tokens=5, do_sample=False)
        types = (batch["input_ids"] == IMAGE_TOKEN_ID).int()
        plain = model.generate(**batch, mm_token_type_ids=types, max_new_tokens=5, do_sample=False)
        assert torch.equal(routed, plain)


@pytest.mark.spec("hosts.linear.cache")
def test_routed_cache_follows_beams(model, batch):
    """Reordering the batch (beam search) moves each sample's linear states with its K/V."""
    out = routed_prefill(model, RoutingConfig(MULTI), **batch)
    before = [out.cache.layer_state(0, b) for b in range(2)]
    out.cache.batch_select_indices(torch.tensor([1, 0]))
    after = [out.cache.layer_state(0, b) for b in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(before[0], after[1]))
    with pytest.raises(RoutingError, match=r"layer 1 is a softmax layer.*hosts\.linear\.cache"):
        out.cache.layer_state(1, 0)
