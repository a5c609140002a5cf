"""The reference routed prefill (spec/routing.md, spec/layout.md)."""

from __future__ import annotations

import copy

import pytest
import torch

import rerouting.reference.routing as reference_routing
from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.reference import Reference, RoutingConfig, RoutingError, Schedule
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))


def unrouted_logits(model, batch, dtype=torch.float32):
    model = copy.deepcopy(model).to(dtype)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.spec("routing.equiv.keep-all")
def test_keep_all_equals_unrouted_model(llava, single):
    keep_all = Schedule((1, 3, 5), (1.0, 1.0, 1.0))
    out = Reference(llava, RoutingConfig(keep_all)).prefill(**single).logits
    truth = unrouted_logits(llava, single, torch.float64)
    yardstick = unrouted_logits(llava, single, torch.float32)
    assert_close("keep-all logits", out, truth, yardstick, torch.float32, rule="routing.equiv.keep-all")


@pytest.mark.spec("routing.equiv.one-decision")
def test_one_decision_reroute_equals_remove_exactly(llava, single):
    schedule = Schedule((2,), (0.25,))
    a = Reference(llava, RoutingConfig(schedule, policy="reroute")).prefill(**single)
    b = Reference(llava, RoutingConfig(schedule, policy="remove")).prefill(**single)
    assert a.trace.samples[0].decisions[0].selected == b.trace.samples[0].decisions[0].selected
    assert torch.equal(a.logits, b.logits)
    for layer in range(6):
        assert all(
            torch.equal(x, y) for x, y in zip(a.caches[0].layer_kv(layer), b.caches[0].layer_kv(layer))
        )


@pytest.mark.spec("routing.readmit", "selection.pool")
def test_reroute_readmits_deferred_tokens(llava_config):
    """Guards against reroute silently degenerating into remove: some seed must re-admit."""
    readmitted = 0
    for seed in range(4):
        model = tiny_llava(llava_config, seed=seed)
        batch = make_batch(llava_config, [SampleSpec((5, 3))], seed=seed)
        sample = Reference(model, RoutingConfig(MULTI)).prefill(**batch).trace.samples[0]
        readmitted += sum(len(sample.readmitted(s)) for s in range(1, 3))
        remove = Reference(model, RoutingConfig(MULTI, policy="remove")).prefill(**batch).trace.samples[0]
        assert all(not remove.readmitted(s) for s in range(3))
    assert readmitted > 0


@pytest.mark.spec("routing.bypass", "routing.active-set", "routing.readmit")
def test_deferred_rows_are_bit_identical_through_their_stage(llava, single, monkeypatch):
    calls = []
    original = reference_routing.run_block

    def recording(host, layer, hidden, active, cache):
        out = original(host, layer, hidden, active, cache)
        calls.append((hidden, out, list(active)))
        return out

    monkeypatch.setattr(reference_routing, "run_block", recording)
    result = Reference(llava, RoutingConfig(MULTI)).prefill(**single)
    sample = result.trace.samples[0]
    for hidden, out, active in calls:  # every layer: rows outside the active set untouched
        rest = [p for p in range(hidden.shape[0]) if p not in active]
        assert torch.equal(hidden[rest], out[rest])
        assert not torch.equal(hidden[active], out[active])
    # A token deferred for a whole stage leaves it with exactly the state it entered with.
    layers = (*MULTI.layers, 6)
    for s in range(len(sample.decisions)):
        positions = [sample.visual_positions[i] for i in sample.deferred(s)]
        start, end = calls[layers[s]][0], calls[layers[s + 1] - 1][1]
        assert torch.equal(start[positions], end[positions])


@pytest.mark.spec("routing.equiv.remove")
def test_remove_is_reroute_with_forced_previous_selection(llava, single):
    remove = Reference(llava, RoutingConfig(MULTI, policy="remove")).prefill(**single)
    forced = [[d.selected for d in remove.trace.samples[0].decisions]]
    reroute = Reference(llava, RoutingConfig(MULTI, policy="reroute")).prefill(
        **single, forced_selection=forced
    )
    assert torch.equal(remove.logits, reroute.logits)
    for layer in range(6):
        assert all(
            torch.equal(x, y)
            for x, y in zip(remove.caches[0].layer_kv(layer), reroute.caches[0].layer_kv(layer))
        )


@pytest.mark.spec("layout.batch-independence", "layout.sequence")
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_equals_each_sample_alone(llava, llava_config, padding):
    specs = [SampleSpec((5, 3)), SampleSpec((2, 4, 6)), SampleSpec((9,)), SampleSpec((1, 1))]
    batch = make_batch(llava_config, specs, padding=padding, seed=3)
    ref = Reference(llava, RoutingConfig(MULTI))
    ref64 = Reference(llava, RoutingConfig(MULTI, compute_dtype=torch.float64))
    together = ref.prefill(**batch)
    images_before = 0
    for b, spec in enumerate(specs):
        valid = batch["attention_mask"][b].bool()
        alone = {"input_ids": batch["input_ids"][b : b + 1, valid]}
        if spec.num_images:
            alone["pixel_values"] = batch["pixel_values"][images_before : images_before + spec.num_images]
        images_before += spec.num_images
        single = ref.prefill(**alone)
        # The vision tower sees a different image batch, so agreement is to rounding, not bitwise.
        truth = ref64.prefill(**alone).logits[0]
        assert_close(
            "batched logits",
            together.logits[b, valid],
            truth,
            single.logits[0],
            torch.float32,
            rule="layout.batch-independence",
        )
        assert len(together.trace.samples[b].decisions) == len(single.trace.samples[0].decisions)
        for x, y in zip(together.trace.samples[b].decisions, single.trace.samples[0].decisions):
            assert (x.selected, x.k) == (y.selected, y.k)
        assert together.trace.samples[b].kv_lengths == single.trace.samples[0].kv_lengths
        assert (~valid).sum() == 0 or together.logits[b, ~valid].abs().max() == 0


@pytest.mark.spec("layout.text-only")
def test_text_only_input_is_the_base_model(llava, llava_config):
    batch = make_batch(llava_config, [SampleSpec((12,))], seed=4)
    result = Reference(llava, RoutingConfig(MULTI)).prefill(**batch)
    sample = result.trace.samples[0]
    assert not sample.routed and sample.decisions == () and sample.layer_visual_counts == (0,) * 6
    truth = unrouted_logits(llava, batch, torch.float64)
    yardstick = unrouted_logits(llava, batch, torch.float32)
    assert_close("text-only logits", result.logits, truth, yardstick, torch.float32, rule="layout.text-only")


@pytest.mark.spec("layout.visual-set")
def test_two_images_are_one_visual_set(llava, llava_config):
    batch = make_batch(llava_config, [SampleSpec((3, 2, 4))], seed=5)
    sample = Reference(llava, RoutingConfig(MULTI)).prefill(**batch).trace.samples[0]
    assert sample.num_visual == 32 and sample.num_text == 9
    assert sample.visual_positions == tuple(range(3, 19)) + tuple(range(21, 37))
    assert sample.decisions[0].k == 16  # k from N = 32, the union of both images


@pytest.mark.spec("layout.visual-set", "routing.errors")
def test_image_feature_mismatch_is_an_error(llava, single):
    ids = single["input_ids"].clone()
    ids[0, 0] = 3  # one extra placeholder: 17 tokens for 16 features
    with pytest.raises(
        RoutingError, match=r"17 image placeholder tokens .* 16 image features.*layout.visual-set"
    ):
        Reference(llava, RoutingConfig(MULTI)).prefill(input_ids=ids, pixel_values=single["pixel_values"])


@pytest.mark.spec("routing.errors")
def test_unsupported_model_class_is_named(llava_config):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llava_config().text_config)
    with pytest.raises(RoutingError, match=r"model class LlamaForCausalLM is not supported.*routing.errors"):
        Reference(model, RoutingConfig(MULTI))


@pytest.mark.spec("routing.output", "routing.active.positions")
def test_routed_logits_differ_from_dense_and_reference_leaves_model_untouched(llava, single):
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    attn = llava.config.get_text_config()._attn_implementation
    routed = Reference(llava, RoutingConfig(MULTI, compute_dtype=torch.float64)).prefill(**single).logits
    dense = unrouted_logits(llava, single, torch.float64)
    last = single["input_ids"].shape[1] - 1
    assert not torch.allclose(routed[0, last], dense[0, last])
    assert llava.config.get_text_config()._attn_implementation == attn
    assert all(torch.equal(before[k], v) for k, v in llava.state_dict().items())


@pytest.mark.spec("routing.active.causal")
def test_a_later_token_never_changes_earlier_rows(llava, single):
    ref = Reference(llava, RoutingConfig(MULTI))
    base = ref.prefill(**single)
    forced = [[d.selected for d in base.trace.samples[0].decisions]]
    ids = single["input_ids"].clone()
    ids[0, -1] = (ids[0, -1] + 1) % 90 + 4  # another text token at the last position
    changed = ref.prefill(ids, pixel_values=single["pixel_values"], forced_selection=forced)
    assert torch.equal(base.logits[0, :-1], changed.logits[0, :-1])
    assert not torch.equal(base.logits[0, -1], changed.logits[0, -1])


@pytest.mark.spec("layout.text-set")
def test_text_tokens_are_always_active_and_never_scored(llava, mixed_batch):
    batch, _ = mixed_batch
    extreme = Schedule((1, 3), (1, 1), unit="count")
    result = Reference(llava, RoutingConfig(extreme)).prefill(**batch)
    for sample, cache in zip(result.trace.samples, result.caches):
        text = [p for p in range(sample.seq_len) if p not in sample.visual_positions]
        assert sample.num_text == len(text)
        for layer in range(6):
            assert set(text) <= set(cache.positions[layer].tolist())
        for decision in sample.decisions:
            assert decision.scores.shape == (sample.num_visual,) and decision.k == 1


@pytest.mark.spec("scoring.probe.softmax", "routing.errors")
def test_yardstick_switches_are_explicit_and_validated(llava, single):
    """The reference's yardstick modes are arguments (the oracle patches nothing), marked, and checked."""
    config = RoutingConfig(Schedule((1, 3), (0.5, 0.25)))
    plain = Reference(llava, config)
    assert not plain.yardstick and (plain.compute_dtype, plain.score_dtype) == (torch.float32, torch.float32)
    lowp = Reference(llava, config, compute_dtype=torch.bfloat16, attention="sdpa")
    assert lowp.yardstick and lowp.score_dtype == torch.float32 and lowp.attention == "sdpa"
    assert next(llava.parameters()).dtype == torch.float32  # the caller's model is never converted
    out, low = plain.prefill(**single), lowp.prefill(**single)
    assert low.trace.samples[0].decisions[0].scores.dtype == torch.float32
    assert low.logits.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    sdpa = Reference(llava, config, attention="sdpa").prefill(**single)
    selections = lambda r: [[d.selected for d in s.decisions] for s in r.trace.samples]  # noqa: E731
    assert selections(sdpa) == selections(out)
    truth = Reference(llava, RoutingConfig(config.schedule, compute_dtype=torch.float64)).prefill(**single)
    assert_close(
        "sdpa yardstick logits", sdpa.logits, truth.logits, out.logits, torch.float32, rule="routing.errors"
    )
    with pytest.raises(RoutingError, match=r"score_dtype torch.bfloat16 .*scoring.probe.softmax"):
        Reference(llava, config, score_dtype=torch.bfloat16)
    with pytest.raises(RoutingError, match=r"attention 'flash' is not one of \['eager', 'sdpa'\]"):
        Reference(llava, config, attention="flash")


@pytest.mark.spec("routing.readmit", "layout.text-only")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_trace_summary_reads_the_stages(llava, llava_config, policy):
    from rerouting.reference.tiny import SampleSpec, make_batch

    batch = make_batch(llava_config, [SampleSpec((5, 3)), SampleSpec((9,))], padding="left", seed=1)
    config = RoutingConfig(Schedule((1, 3, 4), (0.5, 0.5, 0.25)), policy=policy)
    trace = Reference(llava, config).prefill(**batch).trace
    text = str(trace)
    assert text == trace.summary() and text.startswith(f"Trace: policy {policy}, 6 layers, 2 sample(s)")
    rows = [line.split() for line in text.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    sample = trace.samples[0]
    for row, decision in zip(rows, sample.decisions, strict=True):
        stage, layer, pool, k, selected, left, readmitted = map(int, row)
        assert (stage, layer, pool, k, selected) == (
            decision.stage,
            decision.layer,
            len(decision.pool),
            decision.k,
            len(decision.selected),
        )
        assert left == sample.num_visual - selected and readmitted == len(sample.readmitted(stage))
    assert ("removed" in text) == (policy == "remove")
    assert "sample 1: 0 visual + 9 text tokens; not routed (text only)" in text
