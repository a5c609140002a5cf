"""KV cache contents and decoding (spec/cache.md)."""

from __future__ import annotations

import copy

import pytest
import torch

from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.reference import Reference, RoutingConfig, Schedule, decode_step, greedy_generate
from rerouting.reference.compat import output_cache

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))


@pytest.mark.spec("cache.contents")
def test_cache_holds_text_plus_active_visual_per_layer(llava, mixed_batch):
    batch, _ = mixed_batch
    result = Reference(llava, RoutingConfig(MULTI)).prefill(**batch)
    for sample, cache in zip(result.trace.samples, result.caches):
        for layer in range(6):
            keys, values = cache.layer_kv(layer)
            assert keys.shape[1] == values.shape[1] == sample.kv_lengths[layer]
            text = [p for p in range(sample.seq_len) if p not in sample.visual_positions]
            active = sorted(text + [sample.visual_positions[i] for i in sample.active_visual[layer]])
            assert cache.positions[layer].tolist() == active


@pytest.mark.spec("cache.contents")
def test_dense_prefix_cache_equals_the_models_cache(llava, single):
    result = Reference(llava, RoutingConfig(Schedule((2,), (0.25,)), compute_dtype=torch.float64)).prefill(
        **single
    )
    with torch.no_grad():
        hf64 = copy.deepcopy(llava).double()(**{**single, "pixel_values": single["pixel_values"].double()})
        hf32 = llava(**single, use_cache=True)
    for layer in (0, 1):
        for i in (0, 1):
            ours = result.caches[0].layer_kv(layer)[i]
            truth = (output_cache(hf64).layers[layer].keys, output_cache(hf64).layers[layer].values)[i][0]
            yard = (output_cache(hf32).layers[layer].keys, output_cache(hf32).layers[layer].values)[i][0]
            assert_close("dense-prefix kv", ours, truth, yard, torch.float32, rule="cache.contents")


@pytest.mark.spec("cache.decode.unrouted", "cache.decode.positions", "cache.decode.equiv")
def test_cached_decode_equals_recomputed_forward(llava, mixed_batch):
    batch, _ = mixed_batch
    ref = Reference(llava, RoutingConfig(MULTI))
    generated, prefill = greedy_generate(ref, **batch, max_new_tokens=4)
    images_before = 0
    for b, sample in enumerate(prefill.trace.samples):
        valid = batch["attention_mask"][b].bool()
        ids = torch.cat([batch["input_ids"][b, valid], generated[b, :-1]])[None]
        inputs = {"input_ids": ids}
        num_images = sample.num_visual // 16
        if num_images:
            inputs["pixel_values"] = batch["pixel_values"][images_before : images_before + num_images]
        images_before += num_images
        forced = [[d.selected for d in sample.decisions]]
        recomputed = ref.prefill(**inputs, forced_selection=forced)
        # The token after each prompt prefix is the argmax of the recomputed forward at that row.
        T = sample.seq_len
        assert recomputed.logits[0, T - 1 :].argmax(-1).tolist() == generated[b].tolist()
        assert [len(p) for p in recomputed.caches[0].positions] == [n + 3 for n in sample.kv_lengths]


@pytest.mark.spec("cache.decode.unrouted", "cache.decode.positions")
def test_decode_step_logits_match_recompute(llava, single):
    ref = Reference(llava, RoutingConfig(MULTI))
    ref64 = Reference(llava, RoutingConfig(MULTI, compute_dtype=torch.float64))
    result = ref.prefill(**single)
    token = torch.tensor([7])
    step_logits = decode_step(ref, result, token, 0)
    assert [result.caches[0].layer_kv(layer)[0].shape[1] for layer in range(6)] == [
        n + 1 for n in result.trace.samples[0].kv_lengths
    ]
    forced = [[d.selected for d in result.trace.samples[0].decisions]]
    ids = torch.cat([single["input_ids"], token[None]], dim=1)
    truth = ref64.prefill(ids, pixel_values=single["pixel_values"], forced_selection=forced).logits[0, -1]
    yard = ref.prefill(ids, pixel_values=single["pixel_values"], forced_selection=forced).logits[0, -1]
    assert_close("decode logits", step_logits[0], truth, yard, torch.float32, rule="cache.decode.positions")
    wrong_position = ref.prefill(**single)
    shifted = decode_step(ref, wrong_position, token, 5)  # as if at T_b + 5: must differ
    assert not torch.allclose(shifted, step_logits)
