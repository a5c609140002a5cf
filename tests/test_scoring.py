"""The attention probe and the random scorer (spec/scoring.md), checked against HF's own attention maps."""

from __future__ import annotations

import copy

import pytest
import torch

from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.reference import Reference, RoutingConfig, RoutingError, Schedule, Scorer
from rerouting.reference.tiny import SampleSpec, make_batch


def hf_attention(model, batch, dtype):
    """Per-layer attention probabilities ``[H, T, T]`` of the unrouted model under eager attention."""
    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation("eager")
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        return [a[0] for a in model(**inputs, output_attentions=True).attentions]


def visual_columns(batch):
    return (batch["input_ids"][0] == 3).nonzero().flatten()


@pytest.mark.spec(
    "scoring.probe.input",
    "scoring.probe.projection",
    "scoring.probe.softmax",
    "scoring.probe.query-row",
    "scoring.probe.head-mean",
)
def test_first_probe_equals_the_models_own_attention_row(llava, single):
    d = 2
    scores = (
        Reference(llava, RoutingConfig(Schedule((d,), (0.5,))))
        .prefill(**single)
        .trace.samples[0]
        .decisions[0]
        .scores
    )
    cols, last = visual_columns(single), single["input_ids"].shape[1] - 1
    truth = hf_attention(llava, single, torch.float64)[d][:, last, cols].mean(0)
    yardstick = hf_attention(llava, single, torch.float32)[d][:, last, cols].mean(0)
    assert_close("probe scores", scores, truth, yardstick, torch.float32, rule="scoring.probe.softmax")


@pytest.mark.spec("scoring.probe.variant-layer")
def test_previous_layer_variant_reads_layer_d_minus_1(llava, single):
    d = 3
    config = RoutingConfig(Schedule((d,), (0.5,)), scorer=Scorer(probe_layer="previous"))
    scores = Reference(llava, config).prefill(**single).trace.samples[0].decisions[0].scores
    cols, last = visual_columns(single), single["input_ids"].shape[1] - 1
    truth = hf_attention(llava, single, torch.float64)[d - 1][:, last, cols].mean(0)
    yardstick = hf_attention(llava, single, torch.float32)[d - 1][:, last, cols].mean(0)
    assert_close("probe scores", scores, truth, yardstick, torch.float32, rule="scoring.probe.variant-layer")
    with pytest.raises(RoutingError, match="scoring.probe.variant-layer"):
        RoutingConfig(Schedule((0,), (0.5,)), scorer=Scorer(probe_layer="previous"))


@pytest.mark.spec("scoring.probe.variant-query")
def test_text_after_image_variant_averages_those_rows(llava, llava_config, single):
    d = 2
    config = RoutingConfig(Schedule((d,), (0.5,)), scorer=Scorer(query="text-after-image"))
    decision = Reference(llava, config).prefill(**single).trace.samples[0].decisions[0]
    cols = visual_columns(single)
    rows = torch.arange(int(cols.max()) + 1, single["input_ids"].shape[1])
    truth = hf_attention(llava, single, torch.float64)[d][:, rows][:, :, cols].mean(0).mean(0)
    yardstick = hf_attention(llava, single, torch.float32)[d][:, rows][:, :, cols].mean(0).mean(0)
    assert decision.probe_queries == 3
    assert_close(
        "probe scores", decision.scores, truth, yardstick, torch.float32, rule="scoring.probe.variant-query"
    )
    image_last = make_batch(llava_config, [SampleSpec((4, 0))], seed=7)
    with pytest.raises(
        RoutingError, match="no text token follows the last visual position 19.*variant-query"
    ):
        Reference(llava, config).prefill(**image_last)


@pytest.mark.spec("scoring.probe.query-row")
def test_a_sample_without_text_cannot_be_probed(llava, llava_config):
    only_image = make_batch(llava_config, [SampleSpec((0, 0))], seed=7)
    with pytest.raises(RoutingError, match="no text token.*scoring.probe.query-row"):
        Reference(llava, RoutingConfig(Schedule((1,), (0.5,)))).prefill(**only_image)


@pytest.mark.spec("scoring.probe.softmax", "scoring.probe.input")
def test_remove_probe_sees_only_the_pool(llava, single):
    schedule = Schedule((1, 3), (0.5, 0.25))
    remove = Reference(llava, RoutingConfig(schedule, policy="remove")).prefill(**single).trace.samples[0]
    second = remove.decisions[1]
    outside = [i for i in range(16) if i not in second.pool]
    assert second.probe_keys == remove.num_text + 8
    assert torch.all(second.scores[outside] == 0) and torch.all(second.scores[list(second.pool)] > 0)
    reroute = Reference(llava, RoutingConfig(schedule)).prefill(**single).trace.samples[0]
    assert reroute.decisions[1].probe_keys == reroute.seq_len
    assert torch.all(reroute.decisions[1].scores > 0)


@pytest.mark.spec("scoring.scorer", "scoring.scorer.random")
def test_random_scorer_is_seeded_per_sample(llava, single):
    config = RoutingConfig(Schedule((1, 3), (0.5, 0.5)), scorer=Scorer(kind="random", seed=11))
    sample = Reference(llava, config).prefill(**single).trace.samples[0]
    gen = torch.Generator().manual_seed(11)
    for decision in sample.decisions:
        expected = torch.rand(16, generator=gen, dtype=torch.float64).float()
        assert torch.equal(decision.scores, expected)
    with pytest.raises(RoutingError, match="scorer kind 'no-such-kind'.*scoring.scorer"):
        Scorer(kind="no-such-kind")
