"""Cache policies (spec/cache.md): per-layer and retroactive, in both paths, their budgets and the recompute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rerouting import optimized
from rerouting.reference import Reference, RoutingConfig, RoutingError, Schedule
from rerouting.reference.archs import load_arch
from rerouting.reference.budget import budget_from_trace, schedule_trace
from rerouting.reference.decode import greedy_generate
from rerouting.reference.presets import PRESETS
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = Schedule((1, 3, 4), (12, 8, 4), unit="count")


@pytest.fixture(scope="module")
def model_and_batch():
    config = tiny_llava_config(num_layers=6)
    batch = make_batch(
        config, [SampleSpec((5, 3)), SampleSpec((2, 4, 6)), SampleSpec((9,))], padding="left", seed=4
    )
    return tiny_llava(config, seed=1), batch


@pytest.mark.spec("cache.policy")
def test_unknown_policy_is_an_error():
    with pytest.raises(RoutingError, match=r"cache\.policy"):
        RoutingConfig(SCHEDULE, cache="shrink")
    assert RoutingConfig(SCHEDULE).cache == "per-layer"


@pytest.mark.spec("cache.policy", "cache.policy.retroactive")
@pytest.mark.parametrize("policy", ["remove", "reroute"])
def test_retroactive_cache_in_both_paths(model_and_batch, policy):
    model, batch = model_and_batch
    per_layer = RoutingConfig(SCHEDULE, policy=policy)
    config = dataclasses.replace(per_layer, cache="retroactive")
    plain, cut = Reference(model, per_layer).prefill(**batch), Reference(model, config).prefill(**batch)
    assert torch.equal(plain.logits, cut.logits)  # the prefill itself is unchanged
    fast = optimized.routed_prefill(model, config, **batch)
    layouts = Reference(model, config).host.layouts(batch["input_ids"], batch["attention_mask"])
    for b, sample in enumerate(cut.trace.samples):
        final = set(sample.decisions[-1].selected) if sample.decisions else None
        for layer in range(6):
            kept = (
                set(sample.active_visual[layer])
                if final is None
                else final & set(sample.active_visual[layer])
            )
            expected = sorted(set(layouts[b].text) | {layouts[b].visual[i] for i in kept})
            assert cut.caches[b].positions[layer].tolist() == expected
            assert fast.caches[b].positions[layer].tolist() == expected
            # the entries kept are the per-layer cache's own, unchanged
            rows = [plain.caches[b].positions[layer].tolist().index(p) for p in expected]
            torch.testing.assert_close(
                cut.caches[b].layer_kv(layer)[0], plain.caches[b].layer_kv(layer)[0][:, rows]
            )
            torch.testing.assert_close(
                fast.caches[b].layer_kv(layer)[1], cut.caches[b].layer_kv(layer)[1], rtol=1e-4, atol=1e-5
            )
        if policy == "remove" and final is not None:
            assert {len(p) for p in cut.caches[b].positions} == {len(layouts[b].text) + 4}
    expected, _ = greedy_generate(Reference(model, config), **batch, max_new_tokens=4)
    tokens, _ = optimized.greedy_generate(model, config, **batch, max_new_tokens=4)
    assert torch.equal(tokens, expected)


@pytest.mark.spec("cache.policy.retroactive", "cache.decode.equiv")
def test_decode_equals_the_recompute_under_the_same_rule(model_and_batch):
    model, batch = model_and_batch
    config = RoutingConfig(SCHEDULE, policy="reroute", cache="retroactive", compute_dtype=torch.float64)
    prompt = batch["input_ids"][1][batch["attention_mask"][1].bool()][None]  # sample 1 alone, unpadded
    one = {"input_ids": prompt, "pixel_values": batch["pixel_values"][1:3]}  # its two images
    reference = Reference(model, config)
    tokens, result = greedy_generate(reference, **one, max_new_tokens=3)
    selections = [[list(d.selected) for d in result.trace.samples[0].decisions]]
    T = one["input_ids"].shape[1]
    ids = torch.cat([one["input_ids"], tokens[:, :2]], dim=1)
    again = reference.prefill(ids, None, one["pixel_values"], forced_selection=selections, generated_from=T)
    assert torch.equal(again.logits[0, T - 1 :].argmax(-1), tokens[0])
    plain = Reference(model, dataclasses.replace(config, cache="per-layer"))
    dense = plain.prefill(ids, None, one["pixel_values"], forced_selection=selections)
    assert not torch.allclose(dense.logits[0, T:], again.logits[0, T:])  # the rule changes what decode sees
    with pytest.raises(RoutingError, match=r"cache\.policy\.retroactive"):
        plain.prefill(ids, None, one["pixel_values"], forced_selection=selections, generated_from=T)


@pytest.mark.spec("cache.policy.retroactive", "budget.kv.entries", "budget.kv.bytes")
def test_retroactive_budget_clse_avg64():
    _, arch = load_arch("llava-1.5-7b")
    config = PRESETS["clse_avg64"]
    trace = schedule_trace(config, num_text=64, num_visual=576, num_layers=32)
    per_layer = budget_from_trace(trace, arch, config=config).samples[0]
    cut = budget_from_trace(trace, arch, config=dataclasses.replace(config, cache="retroactive")).samples[0]
    assert [layer.kv_entries for layer in per_layer.layers][:2] == [640, 174]
    assert {layer.kv_entries for layer in cut.layers} == {64 + 20}  # decode KV = 20 visual tokens per layer
    assert cut.kv_bytes == 32 * 84 * 2 * 32 * 128 * 2  # float16
    assert per_layer.kv_bytes / cut.kv_bytes == pytest.approx(
        (640 + 10 * 174 + 10 * 134 + 11 * 84) / (32 * 84)
    )
    assert cut.flops_true == per_layer.flops_true  # the prefill is the same


@pytest.mark.spec("cache.policy.retroactive")
def test_retroactive_is_refused_on_a_host_with_linear_layers():
    from rerouting.reference.tiny_qwen3 import tiny_qwen35

    try:
        model = tiny_qwen35(seed=0)
        Reference(model, RoutingConfig(Schedule((1,), (0.5,))))  # the host itself is served here
    except (ImportError, RoutingError) as error:  # a transformers without Qwen3.5, or one the host refuses
        pytest.skip(f"no Qwen3.5 host here: {error}")
    config = RoutingConfig(Schedule((1,), (0.5,)), cache="retroactive")
    for build in (
        lambda: Reference(model, config),
        lambda: optimized.routed_prefill(model, config, torch.ones(1, 2, dtype=torch.long)),
    ):
        with pytest.raises(RoutingError, match=r"cache\.policy\.retroactive"):
            build()
