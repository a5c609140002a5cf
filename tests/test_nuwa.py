"""Nüwa's stage 1 (the ``nuwa`` reducer) and its stage-2 presets, reference side (spec/nuwa.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rerouting.conformance import audit
from rerouting.conformance.audit.inputs import SCHEDULE_GROUPS
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
from rerouting.reference.compat import vision_encoder_layers
from rerouting.reference.hooks import REDUCERS, VisionInputs
from rerouting.reference.nuwa import (
    aggregate,
    anchor_count,
    anchors,
    candidates,
    cls_attention,
    encode_images,
    image_reductions,
    proximity,
    regions,
    similarity,
    stage2_keep,
)
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = NuwaParams(tokens=6, top_n=1, distance=8.0, feature_layers=(1, 3))  # a 4-layer tower, 6x6 grid


@pytest.fixture(scope="module")
def model():
    """8 decoder layers, a 4-layer CLIP tower on a 6x6 patch grid (36 visual tokens per image)."""
    return tiny_llava(tiny_llava_config(num_layers=8, vision_layers=4, image_size=24), seed=3)


@pytest.fixture(scope="module")
def batch(model):
    """Three samples, left padded: one image, two images, no image."""
    specs = [SampleSpec((5, 3)), SampleSpec((2, 4, 3)), SampleSpec((7,))]
    return make_batch(model.config, specs, padding="left", seed=4)


STAGE2 = Schedule((4,), (3,), unit="count")


def config(schedule=STAGE2, policy="remove", params=PARAMS, **kwargs):
    return RoutingConfig(
        schedule,
        policy=policy,
        scorer=Scorer(probe_layer="previous"),
        reducer="nuwa",
        reducer_params=params,
        **kwargs,
    )


# --- hand-made inputs ------------------------------------------------------------------------------


@pytest.mark.spec("nuwa.regions", "nuwa.anchors")
def test_one_salient_token_per_region_gives_those_anchors_in_grid_order():
    scores = [0.0] * 16  # 4x4 grid, regions {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    for patch, value in ((5, 0.4), (2, 0.9), (12, 0.1), (15, 0.7)):
        scores[patch] = value
    assert regions((4, 4))[0] == [0, 1, 4, 5]
    assert candidates(scores, (4, 4), 1) == [5, 2, 12, 15]
    assert anchors(scores, (4, 4), 1, 4) == (2, 5, 12, 15)  # grid order, not salience order
    assert anchors(scores, (4, 4), 1, 2) == (2, 15)  # the two most salient candidates
    # ties: the lower patch index; an odd grid's edge regions are one patch wide
    assert candidates([0.0] * 9, (3, 3), 2) == [0, 1, 2, 5, 6, 7, 8]
    assert anchor_count(NuwaParams(tokens=100, top_n=2), (3, 3), 1) == 7
    assert anchor_count(NuwaParams(tokens=5, top_n=2), (3, 3), 2) == 3  # ceil(5 / 2) per image


@pytest.mark.spec("nuwa.similarity", "nuwa.proximity", "nuwa.collectors")
def test_collinear_features_aggregate_by_proximity_alone():
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    x = torch.stack([v, 2 * v, 3 * v])  # a 1x3 grid of collinear features: every cosine is 1
    hidden = [torch.cat([torch.zeros(1, 3, dtype=torch.float64), x])] * 2  # [CLS] row, then the patches
    sim = similarity(hidden, (0, 1))
    assert torch.allclose(sim, torch.ones(3, 3, dtype=torch.float64))
    near = proximity((1, 3), 4.0, torch.float64)  # sqrt(4) = 2 patches: δ=1 -> 0.5, δ=2 -> 0
    assert near[0].tolist() == [1.0, 0.5, 0.0]
    weights = sim * near
    code = aggregate(x, weights[0], 0, "code")
    assert torch.allclose(code, x[0] + 0.5 / (1.5 + 1e-8) * x[1])  # self weight 1: not convex
    convex = aggregate(x, weights[0], 0, "convex")
    assert torch.allclose(convex, (x[0] + 0.5 * x[1]) / (1.5 + 1e-8))
    opposite = torch.stack([v, -v, v])  # anti-parallel features: the ReLU cuts them off
    assert similarity([torch.cat([torch.zeros(1, 3, dtype=torch.float64), opposite])] * 2, (0, 1))[0, 1] == 0


@pytest.mark.spec("nuwa.proximity", "nuwa.collectors")
def test_distance_zero_turns_aggregation_off():
    assert torch.equal(proximity((3, 4), 0.0, torch.float32), torch.eye(12))
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    weights = torch.relu(torch.randn(12, 12, generator=torch.Generator().manual_seed(1))) * torch.eye(12)
    for c in range(12):
        assert torch.equal(aggregate(x, weights[c], c, "code"), x[c])


@pytest.mark.spec("nuwa.params", "nuwa.stage2")
def test_parameters_are_validated_and_stage2_counts_follow_the_release():
    for bad in (
        {"tokens": 0},
        {"top_n": 5},
        {"distance": -1.0},
        {"pillar_quantile": 1.5},
        {"feature_layers": (3, 2)},
        {"normalisation": "softmax"},
        {"salience": "key-norm"},
        {"pillar_score": "cls"},
        {"feature_layers": 3},
    ):
        with pytest.raises(RoutingError, match=r"\[rule nuwa.params\]"):
            NuwaParams(**bad)
    with pytest.raises(RoutingError, match=r"\[rule layout.vision-reducer\]"):
        RoutingConfig(Schedule((4,), (3,), unit="count"), reducer_params=PARAMS)
    assert [stage2_keep(n) for n in (112, 224, 336, 50, 5)] == [16, 32, 48, 5, 1]
    assert "nuwa" in REDUCERS


@pytest.mark.spec("nuwa.params")
def test_tower_and_record_are_checked(model, batch):
    with pytest.raises(RoutingError, match=r"\[rule nuwa.params\]"):
        Reference(model, config(params=None))
    with pytest.raises(RoutingError, match=r"feature_layers=\(16, 24\) but the vision tower has 4 layers"):
        Reference(model, config(params=NuwaParams())).prefill(**batch)


# --- on a real tiny tower --------------------------------------------------------------------------


@pytest.mark.spec("nuwa.probe", "nuwa.salience")
def test_cls_row_equals_the_towers_own_attention(model, batch):
    """The recomputed [CLS] row equals the select layer's attention map from an eager, output_attentions run."""
    tower = model.model.vision_tower
    pixels = batch["pixel_values"]
    with torch.no_grad():
        tower.set_attn_implementation("eager")
        try:
            full = tower(pixels, output_attentions=True, output_hidden_states=True)
        finally:
            tower.set_attn_implementation("sdpa")
    select = model.config.vision_feature_layer % (len(vision_encoder_layers(tower)) + 1)
    with torch.no_grad():
        row = cls_attention(vision_encoder_layers(tower)[select - 1], full.hidden_states[select - 1][0])
    torch.testing.assert_close(row, full.attentions[select - 1][0, :, 0])


@pytest.mark.spec("nuwa.anchors", "nuwa.pillars", "nuwa.projection", "nuwa.images")
def test_anchors_pillars_and_projection_on_several_images(model, batch):
    host = host_for(model)
    layouts = host.layouts(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        outputs = encode_images(host, batch["pixel_values"])
        reductions = image_reductions(host, outputs, layouts, PARAMS)
        _, reduced = Reference(model, config()).reducer(
            host.embed(batch["input_ids"], batch["pixel_values"]),
            layouts,
            VisionInputs(host, outputs, PARAMS),
        )
    assert [len(r) for r in reductions] == [1, 2, 0]
    assert [len(r.anchors) for r in reductions[0]] == [6] and [len(r.anchors) for r in reductions[1]] == [
        3,
        3,
    ]
    select = model.config.vision_feature_layer % 5
    image = 0
    for per_sample in reductions:
        for r in per_sample:
            assert list(r.anchors) == sorted(set(r.anchors))
            x = outputs.hidden_states[select][image, 1:]
            assert any(r.pillars) and not all(r.pillars)
            for a, pillar in zip(r.anchors, r.pillars):
                assert torch.equal(r.features[a], x[a]) == pillar  # pillars bit for bit, collectors moved
            image += 1
    assert reduced[0].entering == reductions[0][0].anchors
    assert reduced[1].entering == (*reductions[1][0].anchors, *(36 + a for a in reductions[1][1].anchors))
    assert reduced[2].entering is None


@pytest.mark.spec("nuwa.projection", "nuwa.entering")
def test_pillar_embeddings_equal_the_hosts_and_dropped_tokens_never_enter(model, batch):
    routed = Reference(model, config())
    with torch.no_grad():
        host = routed.host
        plain = host.embed(batch["input_ids"], batch["pixel_values"])
        outputs = encode_images(host, batch["pixel_values"])
        layouts = host.layouts(batch["input_ids"], batch["attention_mask"])
        embeds, reduced = routed.reducer(plain, layouts, VisionInputs(host, outputs, PARAMS))
        reductions = image_reductions(host, outputs, layouts, PARAMS)
    layout, r = reduced[0], reductions[0][0]
    for a, pillar in zip(r.anchors, r.pillars):
        row = layout.valid[layout.visual[a]]
        assert torch.equal(embeds[0, row], plain[0, row]) == pillar
    result = routed.prefill(**batch)
    sample = result.trace.samples[0]
    assert sample.entering == r.anchors and sample.active_visual[0] == r.anchors
    assert sample.layer_visual_counts == (6,) * 4 + (3,) * 4
    assert sample.decisions[0].pool == r.anchors
    assert all(sample.decisions[0].scores[i] == 0 for i in range(36) if i not in r.anchors)
    kv = [int(result.caches[0].layer_kv(layer)[0].shape[1]) for layer in range(8)]
    assert kv == list(sample.kv_lengths) and kv[0] == sample.num_text + 6
    assert result.trace.samples[2].entering is None and not result.trace.samples[2].routed


@pytest.mark.spec("nuwa.equiv.keep-all", "layout.vision-reducer")
def test_keep_everything_stage1_equals_the_unreduced_model(model, batch):
    keep_all = NuwaParams(tokens=72, top_n=4, distance=0.0, feature_layers=(1, 3))
    schedule = Schedule((4,), (3,), unit="count")
    plain = Reference(model, RoutingConfig(schedule, policy="remove")).prefill(**batch)
    nuwa = Reference(
        model, RoutingConfig(schedule, policy="remove", reducer="nuwa", reducer_params=keep_all)
    ).prefill(**batch)
    assert torch.equal(plain.logits, nuwa.logits)
    assert nuwa.trace.samples[1].entering == tuple(range(72))
    for a, b in zip(plain.trace.samples, nuwa.trace.samples):
        assert a.active_visual == b.active_visual and [d.selected for d in a.decisions] == [
            d.selected for d in b.decisions
        ]


@pytest.mark.spec("nuwa.equiv.one-decision", "nuwa.reroute")
def test_reroute_with_one_decision_equals_nuwa(model, batch):
    schedule = Schedule((4,), (3,), unit="count")
    remove = Reference(model, config(schedule, "remove")).prefill(**batch)
    reroute = Reference(model, config(schedule, "reroute")).prefill(**batch)
    assert torch.equal(remove.logits, reroute.logits)
    for a, b in zip(remove.trace.samples, reroute.trace.samples):
        assert a.active_visual == b.active_visual
        for x, y in zip(a.decisions, b.decisions):
            assert (x.pool, x.selected, x.probe_keys) == (y.pool, y.selected, y.probe_keys)
            assert torch.equal(x.scores, y.scores)
    for ca, cb in zip(remove.caches, reroute.caches):
        for layer in range(8):
            assert all(torch.equal(u, v) for u, v in zip(ca.layer_kv(layer), cb.layer_kv(layer)))
    # more decisions: every pool is the entering set, never a dropped token
    more = Reference(model, config(Schedule((4, 6), (3, 3), unit="count"), "reroute")).prefill(**batch)
    for sample in more.trace.samples[:2]:
        assert all(d.pool == sample.entering for d in sample.decisions)
        assert all(d.probe_keys == sample.num_text + len(sample.entering) for d in sample.decisions)


@pytest.mark.spec("nuwa.images", "layout.batch-independence")
def test_a_sample_in_a_batch_equals_itself_alone(model, batch):
    together = Reference(model, config()).prefill(**batch)
    images = [1, 2, 0]
    start = 0
    for b in range(3):
        valid = batch["attention_mask"][b].bool()
        alone = {"input_ids": batch["input_ids"][b : b + 1, valid]}
        if images[b]:
            alone["pixel_values"] = batch["pixel_values"][start : start + images[b]]
        start += images[b]
        result = Reference(model, config()).prefill(**alone)
        assert result.trace.samples[0].entering == together.trace.samples[b].entering
        torch.testing.assert_close(result.logits[0], together.logits[b, valid])


@pytest.mark.spec("nuwa.stage2", "nuwa.reroute", "schedule.presets")
def test_presets_count_as_published():
    for tier, n_v, k in ((64, 112, 16), (128, 224, 32), (192, 336, 48)):
        nuwa, ours = preset(f"nuwa_avg{tier}"), preset(f"ours_vs_nuwa_avg{tier}")
        assert nuwa.reducer == ours.reducer == "nuwa" and nuwa.reducer_params == ours.reducer_params
        assert nuwa.reducer_params.tokens == n_v and nuwa.reducer_params.top_n == tier // 64
        assert (nuwa.policy, nuwa.schedule.layers, nuwa.schedule.keep) == ("remove", (16,), (k,))
        assert (ours.policy, ours.schedule.layers, ours.schedule.keep) == (
            "reroute",
            (16, 20, 24, 28),
            (k,) * 4,
        )
        assert nuwa.scorer.probe_layer == ours.scorer.probe_layer == "previous"
        assert (16 * n_v + 16 * k) / 32 == tier
        assert anchor_count(nuwa.reducer_params, (24, 24), 1) == n_v
        assert math.ceil(n_v / 2) == anchor_count(nuwa.reducer_params, (24, 24), 2)


@pytest.mark.spec("nuwa.budget", "budget.flops.nuwa", "budget.avg-tokens")
def test_published_budgets_from_the_meta_device_trace():
    """Nüwa-64 0.6476 T (App. C, 2·MAC, visual tokens only): n_V = 112 in layers 0-15, 16 after; avg 64/128/192."""
    from rerouting.reference.archs import load_arch
    from rerouting.reference.budget import budget_from_trace, schedule_trace
    from rerouting.reference.nuwa import stage1_flops

    _, arch = load_arch("llava-1.5-7b")
    for tier, tflops in ((64, 0.6476), (128, None), (192, None)):
        for name in (f"nuwa_avg{tier}", f"ours_vs_nuwa_avg{tier}"):
            config = preset(name)
            trace = schedule_trace(config, num_text=36, num_visual=576, num_layers=32, visual_start=35)
            sample = budget_from_trace(trace, arch, config=config).samples[0]
            assert sample.avg_visual_tokens == tier == sample.avg_visual_tokens_nominal
            assert trace.samples[0].layer_visual_counts[0] == 112 * tier // 64
            if tflops is not None:
                assert round(sample.flops_nuwa / 1e12, 4) == tflops
    parts = stage1_flops(NuwaParams(), (24, 24), 1024, 61)
    assert parts["similarity"] == 2 * 576 * 576 * 1024 and parts["total"] == sum(
        v for k, v in parts.items() if k != "total"
    )


@pytest.mark.spec("nuwa.budget", "budget.flops.nuwa", "schedule.presets")
def test_audit_cli_reports_both_presets_and_stage1_apart(tmp_path):
    """``rerouting audit --schedule nuwa_avg64 --schedule ours_vs_nuwa_avg64``: 64 tokens, 0.6476 T, vision side apart."""
    out = tmp_path / "out"
    argv = ["--schedule", "nuwa_avg64", "--schedule", "ours_vs_nuwa_avg64", "-q", "--no-trace", "--no-plots"]
    assert audit.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    runs = {(s["name"], r["policy"]): r for s in report["schedules"] for r in s["runs"]}
    for name in ("nuwa_avg64", "ours_vs_nuwa_avg64"):
        for policy in ("remove", "reroute"):
            run = runs[name, policy]
            assert run["avg_visual_tokens"] == {"realized": 64.0, "nominal": 64.0}
            assert round(run["flops"]["nuwa"] / 1e12, 4) == 0.6476
            side = run["vision_side"]
            assert (side["anchors"], side["collectors"], side["vision_width"]) == (112, 62, 1024)
            assert side["flops"]["similarity"] == 2 * 576**2 * 1024
    assert sum("Nüwa stage 1 runs on the vision side" in note for note in report["notes"]) == 2
    assert {"nuwa_avg64", "ours_vs_nuwa_avg192"} <= set(SCHEDULE_GROUPS["all"])  # `--schedule all`


@pytest.mark.spec("nuwa.salience", "nuwa.pillars")
def test_the_papers_key_norm_options(model, batch):
    """salience="cls-key-norm" is the [CLS] row times ‖k‖ (Eq. 3); pillar_score="key-norm" splits by ‖k‖ (Eq. 4)."""
    from rerouting.reference.nuwa import key_norms, reduce_image, salience

    tower = model.model.vision_tower
    select = model.config.vision_feature_layer % (len(vision_encoder_layers(tower)) + 1)
    layer = vision_encoder_layers(tower)[select - 1]
    with torch.no_grad():
        hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        states = hidden[select - 1][0]
        keys = layer.self_attn.k_proj(layer.layer_norm1(states))[1:]
        norms = key_norms(layer, states)
        torch.testing.assert_close(norms, keys.norm(dim=-1))
        torch.testing.assert_close(salience(layer, states, "cls-key-norm"), salience(layer, states) * norms)
        paper = NuwaParams(
            tokens=6,
            feature_layers=(1, 3),
            salience="cls-key-norm",
            pillar_score="key-norm",
            pillar_quantile=0.75,
        )
        r = reduce_image([h[0] for h in hidden], layer, select, (6, 6), 6, paper)
    anchor_norms = norms[list(r.anchors)]
    threshold = torch.quantile(anchor_norms, 0.75)
    assert list(r.pillars) == (anchor_norms >= threshold).tolist() and sum(r.pillars) == 2
