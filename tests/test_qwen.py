"""Qwen2.5-VL as a second host (reference/host_qwen.py): mRoPE ids, per-image N, routed prefill and generate.

Tiny random Qwen2.5-VL models from a real config (reference/tiny_qwen.py): GQA 4/2, q/k biases, chunked
mRoPE, two images of different grids per sample, left padding.
"""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch

from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.optimized import greedy_generate, route, routed_prefill
from rerouting.reference import Qwen2_5_VLHost, Reference, RotaryIds, RoutingConfig, RoutingError, Schedule
from rerouting.reference import greedy_generate as reference_greedy
from rerouting.reference.host_qwen import check_mrope_release, mrope_release_ok
from rerouting.reference.tiny_qwen import (
    IMAGE_TOKEN_ID,
    TWO_SAMPLES,
    VIDEO_TOKEN_ID,
    QwenSample,
    make_qwen_batch,
    tiny_qwen,
    tiny_qwen_config,
)

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))
KEEP_ALL = Schedule((1, 3, 5), (1.0, 1.0, 1.0))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

INSTALLED = importlib.metadata.version("transformers")
# On a release with the mRoPE bug (the CI floor leg, 5.4) the host refuses every Qwen model, so the tests
# that route one skip, and test_the_installed_buggy_release_is_refused checks the refusal for real.
needs_fixed_mrope = pytest.mark.skipif(
    not mrope_release_ok(),
    reason=f"transformers {INSTALLED} has the Qwen mRoPE bug; the Qwen host refuses it",
)


@pytest.fixture(scope="module")
def qwen():
    if not mrope_release_ok():
        pytest.skip(f"transformers {INSTALLED} has the Qwen mRoPE bug; the Qwen host refuses it")
    return tiny_qwen(seed=0)


@pytest.fixture(scope="module")
def batch():
    """Sample 0: images 4x4 and 4x6 patches (N = 4 + 6, T = 22); sample 1: 2x2 and 4x4 (N = 1 + 4, T = 13)."""
    return make_qwen_batch(TWO_SAMPLES, padding="left", seed=0)


def unrouted(model, batch, dtype):
    model = copy.deepcopy(model).to(dtype)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    types = (batch["input_ids"] == IMAGE_TOKEN_ID).int()
    with torch.no_grad():
        return model(**inputs, mm_token_type_ids=types).logits


def valid_rows(logits, batch):
    return logits[batch["attention_mask"].bool()]


def decisions(trace):
    return [[d.selected for d in sample.decisions] for sample in trace.samples]


def alone(batch, b):
    """Sample b of the batch on its own, no padding (pixels and grids of its own images)."""
    grids = batch["image_grid_thw"]
    per_sample = [2, 2]  # TWO_SAMPLES: two images each
    first = sum(per_sample[:b])
    rows = [int(t * h * w) for t, h, w in grids.tolist()]
    start = sum(rows[:first])
    stop = start + sum(rows[first : first + per_sample[b]])
    keep = batch["attention_mask"][b].bool()
    return {
        "input_ids": batch["input_ids"][b, keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "pixel_values": batch["pixel_values"][start:stop],
        "image_grid_thw": grids[first : first + per_sample[b]],
    }


@pytest.mark.spec("layout.rotary-ids", "layout.image-grid", "layout.visual-set")
def test_layouts_carry_ranks_ids_and_per_image_grids(qwen, batch):
    host = Qwen2_5_VLHost(qwen)
    first, second = host.layouts(
        batch["input_ids"], batch["attention_mask"], image_grid_thw=batch["image_grid_thw"]
    )
    assert (first.length, len(first.visual), first.delta) == (22, 10, -5)
    assert (second.length, len(second.visual), second.delta) == (13, 5, -2)
    assert [(s.start, s.stop, s.grid) for s in first.images] == [(0, 4, (2, 2)), (4, 10, (2, 3))]
    assert [(s.start, s.stop, s.grid) for s in second.images] == [(0, 1, (1, 1)), (1, 5, (2, 2))]
    # research/qwen-host.md §2.1: the digest's ids for sample 0
    assert first.rotary[0].tolist() == [
        0,
        1,
        2,
        3,
        4,
        4,
        4,
        4,
        6,
        7,
        8,
        9,
        10,
        10,
        10,
        10,
        10,
        10,
        13,
        14,
        15,
        16,
    ]
    assert first.rotary[2].tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
    ]
    # positions stay ranks: the vision markers are text, visual positions are the placeholders
    assert first.visual == (4, 5, 6, 7, 12, 13, 14, 15, 16, 17)
    # per-sample keep counts from each sample's own N ([schedule.keep-ratio])
    assert [MULTI.keep_count(0, len(lay.visual)) for lay in (first, second)] == [5, 2]
    # decoded positions continue at T_b + δ_b on every axis
    table = RotaryIds.from_layouts([first, second])
    ids = table.lookup(torch.tensor([[22, 23], [13, 14]]))
    assert ids[:, 0].tolist() == [[17, 18]] * 3 and ids[:, 1].tolist() == [[11, 12]] * 3


@pytest.mark.spec("routing.active.positions", "layout.rotary-ids")
def test_mrope_of_a_gappy_subset_equals_gathered_full_cos_sin(qwen, batch):
    host = Qwen2_5_VLHost(qwen)
    layouts = host.layouts(
        batch["input_ids"], batch["attention_mask"], image_grid_thw=batch["image_grid_thw"]
    )
    table = RotaryIds.from_layouts(layouts)
    x = torch.zeros(2, 1, 64)
    full = host.rotary_embeddings(x, torch.arange(22).expand(2, 22), table)
    subset = torch.tensor([[0, 3, 5, 6, 11, 17, 21], [0, 2, 4, 8, 10, 12, 12]])
    gappy = host.rotary_embeddings(x, subset, table)
    for f, g in zip(full, gappy):
        assert torch.equal(g, f.gather(1, subset[..., None].expand(-1, -1, f.shape[-1])))
    # the ids are the host's own: the model's rotary at get_rope_index's triples
    ids, _ = qwen.model.get_rope_index(
        batch["input_ids"],
        host.mm_token_type_ids(batch["input_ids"]),
        batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    cols = batch["attention_mask"][0].nonzero().flatten()
    own = qwen.model.language_model.rotary_emb(x, ids[:, :1, cols])
    assert torch.equal(own[0], full[0][:1])
    with pytest.raises(RoutingError, match=r"1-D RoPE.*\[rule layout\.rotary-ids\]"):
        host.rotary_embeddings(x, subset)  # never silently 1-D


@pytest.mark.spec("routing.equiv.keep-all", "layout.rotary-ids")
@pytest.mark.parametrize("impl", ["reference", "optimized"])
def test_keep_all_routed_prefill_equals_unrouted_model(qwen, batch, impl):
    config = RoutingConfig(KEEP_ALL)
    if impl == "reference":
        out = Reference(qwen, config).prefill(**batch).logits
    else:
        out = routed_prefill(qwen, config, **batch).logits
    truth = valid_rows(unrouted(qwen, batch, torch.float64), batch)
    yardstick = valid_rows(unrouted(qwen, batch, torch.float32), batch)
    assert_close(
        f"{impl} keep-all logits",
        valid_rows(out, batch),
        truth,
        yardstick,
        torch.float32,
        rule="routing.equiv.keep-all",
    )


@pytest.mark.spec("routing.equiv.one-decision")
def test_one_decision_reroute_equals_remove_exactly(qwen, batch):
    schedule = Schedule((2,), (0.25,))
    a = Reference(qwen, RoutingConfig(schedule, policy="reroute")).prefill(**batch)
    b = Reference(qwen, RoutingConfig(schedule, policy="remove")).prefill(**batch)
    assert decisions(a.trace) == decisions(b.trace)
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.caches, b.caches):
        for layer in range(6):
            assert all(torch.equal(p, q) for p, q in zip(x.layer_kv(layer), y.layer_kv(layer)))


@pytest.mark.spec("routing.readmit")
@needs_fixed_mrope
def test_reroute_readmits_on_qwen():
    readmitted = 0
    for seed in range(3):
        model = tiny_qwen(seed=seed)
        sample = make_qwen_batch(TWO_SAMPLES[:1], seed=seed)
        trace = Reference(model, RoutingConfig(MULTI)).prefill(**sample).trace.samples[0]
        readmitted += sum(len(trace.readmitted(s)) for s in range(1, 3))
    assert readmitted > 0


@pytest.mark.spec("layout.batch-independence", "layout.image-grid")
def test_routed_batch_equals_each_sample_alone(qwen, batch):
    config = RoutingConfig(MULTI)
    together = routed_prefill(qwen, config, **batch)
    assert [len(s.visual_positions) for s in together.trace.samples] == [10, 5]  # different N per sample
    assert [[d.k for d in s.decisions] for s in together.trace.samples] == [[5, 5, 2], [2, 2, 1]]
    for b in range(2):
        single = alone(batch, b)
        own = routed_prefill(qwen, config, **single)
        assert decisions(own.trace) == [decisions(together.trace)[b]]
        rows = batch["attention_mask"][b].bool()
        assert torch.allclose(together.logits[b, rows], own.logits[0], atol=1e-5)


@pytest.mark.spec("layout.text-only", "layout.rotary-ids")
def test_text_only_prompt_equals_base_model(qwen):
    text = make_qwen_batch([QwenSample((9,)), QwenSample((5,))], padding="left", seed=3)
    out = routed_prefill(qwen, RoutingConfig(MULTI), **text)
    assert not any(s.routed for s in out.trace.samples)
    truth = valid_rows(unrouted(qwen, text, torch.float64), text)
    yardstick = valid_rows(unrouted(qwen, text, torch.float32), text)
    assert_close(
        "text-only logits",
        valid_rows(out.logits, text),
        truth,
        yardstick,
        torch.float32,
        rule="layout.text-only",
    )


@pytest.mark.spec("routing.active.positions", "cache.contents", "scoring.probe.projection")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_reference_equals_optimized(qwen, batch, policy):
    config = RoutingConfig(MULTI, policy=policy)
    ref = Reference(qwen, config).prefill(**batch)
    opt = routed_prefill(qwen, config, **batch)
    assert decisions(ref.trace) == decisions(opt.trace)
    for r, o in zip(ref.trace.samples, opt.trace.samples):
        for x, y in zip(r.decisions, o.decisions):
            assert torch.allclose(x.scores, y.scores, atol=1e-6)
    assert torch.allclose(valid_rows(ref.logits, batch), valid_rows(opt.logits, batch), atol=1e-5)
    for rc, oc in zip(ref.caches, opt.caches):
        for layer in range(6):
            assert rc.positions[layer].tolist() == oc.positions[layer].tolist()
            for p, q in zip(rc.layer_kv(layer), oc.layer_kv(layer)):
                assert torch.allclose(p, q, atol=1e-5)
    assert [int(n) for n in (opt.cache.layer_lengths(layer)[0] for layer in range(6))] == [
        22,
        17,
        17,
        17,
        14,
        14,
    ]


@pytest.mark.spec("cache.decode.positions", "cache.decode.unrouted", "routing.errors")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_generate_under_route_equals_functional_greedy(qwen, batch, policy):
    config = RoutingConfig(MULTI, policy=policy)
    model = copy.deepcopy(qwen)
    model.generation_config.eos_token_id = None  # compare every step, no early stop
    functional, _ = greedy_generate(
        model,
        config,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        max_new_tokens=6,
        image_grid_thw=batch["image_grid_thw"],
    )
    reference, _ = reference_greedy(
        Reference(model, config),
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        max_new_tokens=6,
        image_grid_thw=batch["image_grid_thw"],
    )
    assert torch.equal(functional, reference)
    calls = []
    with route(model, config) as router:
        original = router._forward

        def recording(arguments):
            calls.append(arguments.get("position_ids").shape)
            return original(arguments)

        router._forward = recording
        generated = model.generate(
            **batch, max_new_tokens=6, do_sample=False
        )  # mm_token_type_ids built by route
    assert torch.equal(generated[:, -6:], functional)
    assert calls[0] == (4, 2, 22) and calls[1] == (4, 2, 1)  # generate's 4-row ids: rank, then (t, h, w)
    assert len(router.last_trace.samples) == 2 and all(s.routed for s in router.last_trace.samples)


@pytest.mark.spec("layout.rotary-ids", "cache.decode.positions")
def test_forward_under_route_checks_position_ids_and_sets_rope_deltas(qwen, batch):
    model = copy.deepcopy(qwen)
    with route(model, RoutingConfig(MULTI)):
        out = model(**batch)
        assert model.model.rope_deltas.flatten().tolist() == [-5, -2]
        assert out.logits.shape == (2, 22, 256)
        with pytest.raises(RoutingError, match=r"2-D ids would run 1-D RoPE.*\[rule layout\.rotary-ids\]"):
            model(**batch, position_ids=torch.arange(22).expand(2, 22))
        with pytest.raises(RoutingError, match=r"mm_token_type_ids.*\[rule layout\.rotary-ids\]"):
            model(**batch, mm_token_type_ids=torch.zeros_like(batch["input_ids"]))
        one_d = torch.arange(22).expand(3, 2, 22)
        with pytest.raises(
            RoutingError, match=r"differ from the host's own mRoPE ids.*\[rule layout\.rotary-ids\]"
        ):
            model(**batch, position_ids=one_d)


@pytest.mark.spec("layout.image-grid", "layout.visual-set", "routing.errors")
def test_bad_inputs_are_clear_errors(qwen, batch):
    config = RoutingConfig(MULTI)
    no_grid = {k: v for k, v in batch.items() if k != "image_grid_thw"}
    with pytest.raises(RoutingError, match=r"without image_grid_thw.*\[rule layout\.image-grid\]"):
        routed_prefill(qwen, config, **no_grid)
    features = qwen.model.get_image_features(
        batch["pixel_values"], batch["image_grid_thw"], return_dict=True
    ).pooler_output
    with pytest.raises(
        RoutingError, match=r"15 image placeholder tokens but no image_grid_thw.*\[rule layout\.image-grid\]"
    ):
        routed_prefill(qwen, config, batch["input_ids"], batch["attention_mask"], image_features=features)
    wrong = dict(batch, image_grid_thw=batch["image_grid_thw"].flip(0))
    with pytest.raises(
        RoutingError,
        match=r"image run of 6 placeholder tokens but grid \[1, 2, 2\].*\[rule layout\.image-grid\]",
    ):
        routed_prefill(qwen, config, **wrong)
    few = dict(batch, pixel_values=None)
    host = Qwen2_5_VLHost(qwen)
    with pytest.raises(
        RoutingError,
        match=r"15 image placeholder tokens \(id 250\) but 14 image features.*\[rule layout\.visual-set\]",
    ):
        routed_prefill(
            qwen, config, **few, image_features=[f[:-1] if i == 0 else f for i, f in enumerate(features)]
        )
    video = batch["input_ids"].clone()
    video[0, -1] = VIDEO_TOKEN_ID
    with pytest.raises(
        RoutingError, match=r"1 video placeholder tokens \(id 253\).*\[rule layout\.image-grid\]"
    ):
        host.layouts(video, batch["attention_mask"], image_grid_thw=batch["image_grid_thw"])
    with (
        route(qwen, config),
        pytest.raises(RoutingError, match=r"video inputs \['video_grid_thw'\].*\[rule layout\.image-grid\]"),
    ):
        qwen(**batch, video_grid_thw=torch.tensor([[2, 4, 4]]))


@pytest.mark.spec("layout.rotary-ids", "routing.errors")
def test_refuses_buggy_transformers():
    for version in ("5.4.0", "5.5.0"):
        with pytest.raises(RoutingError, match=rf"transformers {version} .*#45325"):
            check_mrope_release(version)
    check_mrope_release("5.6.0")
    assert not mrope_release_ok("5.5.0") and mrope_release_ok("5.24.0")


@pytest.mark.spec("routing.errors")
@needs_fixed_mrope
def test_refuses_non_full_attention_layers():
    config = tiny_qwen_config(num_layers=2)
    config.text_config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(RoutingError, match=r"sliding_attention.*\[rule routing\.errors\]"):
        Qwen2_5_VLHost(tiny_qwen(config))


@pytest.mark.spec("layout.rotary-ids", "routing.errors")
@pytest.mark.skipif(mrope_release_ok(), reason="the installed transformers computes mRoPE ids correctly")
def test_the_installed_buggy_release_is_refused():
    """On a release with the bug (the CI floor leg) the host refuses a real model, naming release and issue."""
    with pytest.raises(RoutingError, match=rf"transformers {INSTALLED} computes wrong mRoPE .*#45325"):
        Qwen2_5_VLHost(tiny_qwen(seed=0))


@pytest.mark.spec("routing.errors", "layout.rotary-ids")
def test_saved_tiny_folder_loads_and_routes(qwen, batch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    qwen.save_pretrained(tmp_path)
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = RoutingConfig(MULTI)
    a, b = routed_prefill(qwen, config, **batch), routed_prefill(loaded, config, **batch)
    assert decisions(a.trace) == decisions(b.trace) and torch.equal(a.logits, b.logits)


@pytest.mark.spec("schedule.presets", "layout.image-grid")
def test_qwen_presets_are_the_release_schedules():
    """The release's Qwen2.5-VL-7B schedules (28 layers): LLaVA's ratios, nominal avg_T at N = 576 (spec table)."""
    from rerouting.reference import PRESETS

    N, L = 576, 28
    for tier, fastv_avg, pdrop_avg, ours_avg in (
        (192, 197.69, 192.87, 193.96),
        (128, 134.64, 129.73, 131.27),
    ):
        fastv, ours = PRESETS[f"qwen25vl_fastv_K3_avg{tier}"], PRESETS[f"qwen25vl_ours_vs_fastv_avg{tier}"]
        r = fastv.schedule.keep[0]
        assert (
            fastv.schedule.layers == (3,)
            and fastv.policy == "remove"
            and r == PRESETS[f"fastv_K3_avg{tier}"].schedule.keep[0]
        )
        assert (
            ours.schedule.layers == (3, 6, 13, 20)
            and ours.schedule.keep == (r,) * 4
            and ours.policy == "reroute"
        )
        assert round((3 * N + (L - 3) * N * r) / L, 2) == fastv_avg
        for name, expected in (("pdrop_earlyL2", pdrop_avg), ("ours_vs_pdrop", ours_avg)):
            config = PRESETS[f"qwen25vl_{name}_avg{tier}"]
            assert config.schedule.layers == (2, 6, 13, 20)
            assert config.schedule.keep == PRESETS[f"{name}_avg{tier}"].schedule.keep
            spans = (4, 7, 7, 8)  # stage lengths [d_s, d_{s+1})
            avg = (2 * N + N * sum(s * k for s, k in zip(spans, config.schedule.keep))) / L
            assert round(avg, 2) == expected
    # a sample's own N: the keep count of a 391-token image (640x480) at the 192 tier
    assert PRESETS["qwen25vl_ours_vs_fastv_avg192"].schedule.keep_count(0, 391) == 103
