"""The optimized path against the reference on tiny random LLaVA models (spec/routing.md, spec/cache.md).

Truth is the reference in float64 on the same model, the yardstick the reference in float32; errors are held
to the derived tolerance of conformance/oracle/tolerance.py. Decisions are compared exactly (the tiny models' widened
q/k weights keep the probe far from ties).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rerouting.optimized.routing as optimized_routing
from rerouting.conformance.oracle.tolerance import assert_close
from rerouting.optimized import decode_step, greedy_generate, routed_prefill
from rerouting.optimized.packing import block_mask, pack, stage_mask
from rerouting.optimized.routing import check_host
from rerouting.optimized.scoring import probe_scores
from rerouting.optimized.selection import select_topk
from rerouting.reference import Reference, RoutingConfig, Schedule, Scorer
from rerouting.reference import greedy_generate as reference_greedy
from rerouting.reference import select_topk as reference_select_topk
from rerouting.reference.host_qwen import mrope_release_ok
from rerouting.reference.scoring import attention_scores
from rerouting.reference.tiny import SampleSpec, make_batch

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))
SPECS = [SampleSpec((5, 3)), SampleSpec((2, 4, 6)), SampleSpec((9,)), SampleSpec((1, 1))]  # 1, 2, 0, 1 images


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def repad(batch: dict, right: list[bool]) -> dict:
    """Move the padding of the samples flagged in ``right`` to the right (mixed left/right padding)."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for b, flag in enumerate(right):
        if flag:
            shift = int((mask[b] == 0).sum())
            ids[b], mask[b] = ids[b].roll(-shift), mask[b].roll(-shift)
    return {**batch, "input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def mixed(llava_config):
    """Four samples, mixed left/right padding: one image, two images, text only, one image."""
    return repad(make_batch(llava_config, SPECS, padding="left", seed=2), [False, True, False, True])


@pytest.fixture(scope="module")
def two_images(llava_config):
    return make_batch(llava_config, [SampleSpec((3, 2, 4))], seed=5)


def references(model, config, batch, **kwargs):
    """(truth, yardstick): the reference in float64 and in float32."""
    truth = Reference(model, RoutingConfig(config.schedule, config.policy, config.scorer, torch.float64))
    return truth.prefill(**batch, **kwargs), Reference(model, config).prefill(**batch, **kwargs)


def discrete(trace):
    """Every discrete field of a trace (decisions, pools, counts), scores left out."""
    return [
        (
            s.num_text,
            s.visual_positions,
            s.active_visual,
            [(d.layer, d.stage, d.pool, d.k, d.selected, d.probe_keys, d.probe_queries) for d in s.decisions],
        )
        for s in trace.samples
    ]


def assert_matches_reference(out, truth, yardstick, batch, rule="layout.batch-independence"):
    """Decisions identical; scores, logits, hidden and per-layer KV within the derived tolerance.

    Each output is compared as a whole (every score of the trace, every valid row, every sample's entries of a
    layer): the tolerance bounds the error of an output, not of each element.
    """
    assert discrete(out.trace) == discrete(truth.trace) == discrete(yardstick.trace)

    def scores(result):
        found = [d.scores for s in result.trace.samples for d in s.decisions]
        return torch.cat(found) if found else torch.zeros(0)

    assert all(d.scores.dtype == torch.float32 for s in out.trace.samples for d in s.decisions)
    assert_close(
        "scores", scores(out), scores(truth), scores(yardstick), torch.float32, rule="scoring.probe.softmax"
    )
    valid = batch["attention_mask"].bool()
    assert_close(
        "logits", out.logits[valid], truth.logits[valid], yardstick.logits[valid], torch.float32, rule=rule
    )
    assert_close(
        "hidden", out.hidden[valid], truth.hidden[valid], yardstick.hidden[valid], torch.float32, rule=rule
    )
    assert not out.logits[~valid].any() and not out.hidden[~valid].any()  # padding rows are zero
    caches = out.caches, truth.caches, yardstick.caches
    for b, sample in enumerate(out.trace.samples):
        assert [int(e[b]) for e in out.cache.entries] == list(sample.kv_lengths)
    for layer in range(out.trace.num_layers):
        for b, sample in enumerate(out.trace.samples):
            assert caches[0][b].positions[layer].tolist() == caches[1][b].positions[layer].tolist()
            assert caches[0][b].layer_kv(layer)[0].shape[1] == sample.kv_lengths[layer]
        for i, name in enumerate(("keys", "values")):
            mine, t, y = (torch.cat([c.layer_kv(layer)[i] for c in cs], dim=1) for cs in caches)
            assert_close(f"layer {layer} {name}", mine, t, y, torch.float32, rule="cache.contents")


@pytest.mark.spec(
    "routing.active-set",
    "routing.active.causal",
    "routing.active.positions",
    "routing.bypass",
    "routing.readmit",
    "routing.output",
    "cache.contents",
    "budget.active-counts",
)
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_single_sample_matches_reference(llava, single, policy):
    config = RoutingConfig(MULTI, policy=policy)
    out = routed_prefill(llava, config, **single)
    assert_matches_reference(out, *references(llava, config, single), single)


@pytest.mark.spec(
    "layout.batch-independence", "layout.sequence", "layout.text-only", "layout.text-set", "layout.visual-set"
)
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_mixed_padding_batch_matches_reference(llava, mixed, policy):
    config = RoutingConfig(MULTI, policy=policy)
    out = routed_prefill(llava, config, **mixed)
    assert_matches_reference(out, *references(llava, config, mixed), mixed)
    text_only = out.trace.samples[2]
    assert not text_only.routed and text_only.layer_visual_counts == (0,) * 6
    assert out.trace.samples[1].num_visual == 32  # two images in one sample


@pytest.mark.spec("layout.visual-set", "schedule.dense-prefix", "schedule.stages")
def test_two_images_in_one_sample_match_reference(llava, two_images):
    config = RoutingConfig(Schedule((0, 2), (0.25, 0.5)))
    out = routed_prefill(llava, config, **two_images)
    assert_matches_reference(out, *references(llava, config, two_images), two_images)


@pytest.mark.spec(
    "scoring.probe.variant-layer", "scoring.probe.variant-query", "scoring.scorer.random", "selection.pool"
)
@pytest.mark.parametrize(
    "scorer",
    [Scorer(probe_layer="previous"), Scorer(query="text-after-image"), Scorer(kind="random", seed=3)],
)
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_scorer_variants_match_reference(llava, mixed, scorer, policy):
    config = RoutingConfig(MULTI, policy=policy, scorer=scorer)
    out = routed_prefill(llava, config, **mixed)
    assert_matches_reference(out, *references(llava, config, mixed), mixed)


@pytest.mark.spec("scoring.probe.variant-query", "selection.pool")
def test_query_padding_may_point_at_a_removed_position(llava, llava_config):
    """Regression (found by the conformance oracle): under remove, a sample with fewer query rows than the
    batch's widest pads its query list with position 0; when position 0 is a removed image token the
    compact-row lookup gave -1 and the gather failed."""
    batch = make_batch(llava_config, [SampleSpec((0, 2)), SampleSpec((0, 0, 1))], seed=9)
    schedule = Schedule((1, 3), (4, 2), unit="count")
    config = RoutingConfig(schedule, policy="remove", scorer=Scorer(query="text-after-image"))
    forced = [[(0, 1, 2, 3), (0, 1)], [(5, 6, 7, 8), (5, 6)]]  # sample 1's position 0 is removed at layer 1
    out = routed_prefill(llava, config, **batch, forced_selection=forced)
    assert_matches_reference(out, *references(llava, config, batch, forced_selection=forced), batch)


@pytest.mark.spec("routing.equiv.remove", "selection.pool")
def test_forced_selection_matches_reference(llava, mixed):
    forced_from = routed_prefill(llava, RoutingConfig(MULTI, policy="remove"), **mixed).trace
    forced = [[d.selected for d in s.decisions] for s in forced_from.samples]
    config = RoutingConfig(MULTI, policy="reroute")
    out = routed_prefill(llava, config, **mixed, forced_selection=forced)
    assert_matches_reference(out, *references(llava, config, mixed, forced_selection=forced), mixed)
    # Reroute forced onto remove's selections computes exactly what remove computes.
    remove = routed_prefill(llava, RoutingConfig(MULTI, policy="remove"), **mixed)
    assert torch.equal(out.logits, remove.logits)
    for layer in range(6):
        assert torch.equal(out.cache.layers[layer].keys, remove.cache.layers[layer].keys)


@pytest.mark.spec("routing.equiv.one-decision")
def test_one_decision_reroute_equals_remove_exactly(llava, mixed):
    schedule = Schedule((2,), (0.25,))
    a = routed_prefill(llava, RoutingConfig(schedule, policy="reroute"), **mixed)
    b = routed_prefill(llava, RoutingConfig(schedule, policy="remove"), **mixed)
    assert discrete(a.trace) == discrete(b.trace)
    assert torch.equal(a.logits, b.logits)
    for layer in range(6):
        assert torch.equal(a.cache.layers[layer].keys, b.cache.layers[layer].keys)
        assert torch.equal(a.cache.layers[layer].values, b.cache.layers[layer].values)


@pytest.mark.spec("routing.equiv.keep-all")
def test_keep_all_equals_the_unrouted_model(llava, mixed):
    keep_all = RoutingConfig(Schedule((1, 3), (1.0, 1.0)))
    out = routed_prefill(llava, keep_all, **mixed)
    with torch.no_grad():
        truth = (
            copy.deepcopy(llava).double()(**{**mixed, "pixel_values": mixed["pixel_values"].double()}).logits
        )
        yardstick = llava(**mixed).logits
    valid = mixed["attention_mask"].bool()
    assert_close(
        "keep-all logits",
        out.logits[valid],
        truth[valid],
        yardstick[valid],
        torch.float32,
        rule="routing.equiv.keep-all",
    )


@pytest.mark.spec("layout.batch-independence")
def test_batch_equals_each_sample_alone(llava, llava_config, mixed):
    config = RoutingConfig(MULTI)
    batched = routed_prefill(llava, config, **mixed)
    images = 0
    for b, spec in enumerate(SPECS):
        valid = mixed["attention_mask"][b].bool()
        alone = {"input_ids": mixed["input_ids"][b, valid][None]}
        if spec.num_images:
            alone["pixel_values"] = mixed["pixel_values"][images : images + spec.num_images]
        images += spec.num_images
        one = routed_prefill(llava, config, **alone)
        assert discrete(one.trace) == discrete(batched.trace)[b : b + 1]
        torch.testing.assert_close(one.logits[0], batched.logits[b, valid], rtol=0, atol=1e-5)


@pytest.mark.spec("routing.active.causal", "routing.errors")
def test_eager_attention_matches_sdpa(llava, mixed):
    config = RoutingConfig(MULTI)
    sdpa = routed_prefill(llava, config, **mixed)
    eager_model = copy.deepcopy(llava)
    eager_model.set_attn_implementation({"text_config": "eager"})
    eager = routed_prefill(eager_model, config, **mixed)
    assert discrete(eager.trace) == discrete(sdpa.trace)
    valid = mixed["attention_mask"].bool()
    torch.testing.assert_close(eager.logits[valid], sdpa.logits[valid], rtol=0, atol=1e-5)


@pytest.mark.spec("routing.active.causal")
def test_stage_mask_is_causal_over_original_positions():
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    packing = pack(keep)  # sample 0: positions 0, 2, 3, 5; sample 1: 0, 1 then padding
    assert packing.index.tolist() == [[0, 2, 3, 5], [0, 1, 6, 6]] and not packing.exact
    mask = stage_mask(packing, "sdpa", torch.float32)[:, 0]  # [B, n, n]
    expected = torch.tensor(
        [
            [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
            [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],  # padding rows: only their own column
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    eager = stage_mask(packing, "eager", torch.float32)[:, 0]
    assert torch.equal(eager == 0, expected)
    # is_causal only where exactly right: no padding in the compact batch, SDPA; eager always explicit.
    exact = pack(torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool))
    assert exact.exact and stage_mask(exact, "sdpa", torch.float32) is None
    assert stage_mask(exact, "eager", torch.float32) is not None
    gaps = block_mask(torch.tensor([[0, 5, 9]]), torch.ones(1, 3, dtype=torch.bool), "sdpa", torch.float32)
    assert torch.equal(gaps[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())  # gaps keep the causal order


@pytest.mark.spec("routing.bypass", "routing.active-set", "schedule.stages")
def test_stage_stays_compact_without_per_layer_gathers(llava, mixed, monkeypatch):
    calls = {"gather": 0, "scatter": 0}
    for name, key in (("gather_rows", "gather"), ("scatter_rows_", "scatter")):
        original = getattr(optimized_routing, name)

        def counting(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(optimized_routing, name, counting)
    widths = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: widths.append(a[0].shape))
        for layer in llava.model.language_model.layers
    ]
    try:
        out = routed_prefill(llava, RoutingConfig(MULTI), **mixed)
    finally:
        for hook in hooks:
            hook.remove()
    decisions = len(MULTI.layers)
    # Gathers: the embeddings into the buffer, then one per decision (the next stage's rows). Scatters: one
    # per decision (the probe input / rebuild), one at the end, and the hidden and logit rows to their columns.
    # Nothing per layer: 6 layers, 3 decisions.
    assert calls["gather"] == 1 + decisions
    assert calls["scatter"] == decisions + 1 + 2
    for layer, shape in enumerate(
        widths
    ):  # every layer sees the compact batch: max over samples of M_b + k_b
        assert shape[1] == max(s.kv_lengths[layer] for s in out.trace.samples)


@pytest.mark.spec("scoring.probe.query-row", "scoring.probe.head-mean", "scoring.probe.projection")
def test_query_row_probe_equals_full_matrix_probe_without_n_by_n(llava, single):
    host, _ = check_host(llava, RoutingConfig(MULTI))
    host64 = Reference(llava, RoutingConfig(MULTI, compute_dtype=torch.float64)).host  # a float64 copy
    layout = host.layouts(single["input_ids"], single["attention_mask"])[0]
    with torch.no_grad():
        hidden = host.embed(single["input_ids"], single["pixel_values"])[0]  # [T, D]
        hidden64 = host64.embed(single["input_ids"], single["pixel_values"].double())[0]  # [T, D]
        T = hidden.shape[0]
        keys, queries = list(range(T)), [layout.text[-1], layout.text[-2]]
        truth = attention_scores(
            host64, host64.layers[2], hidden64, keys, queries, layout.visual, torch.float64
        )
        yardstick = attention_scores(
            host, host.layers[2], hidden, keys, queries, layout.visual, torch.float32
        )
        args = (
            hidden[None],  # [1, T, D]
            torch.arange(T)[None],  # positions [1, T]
            torch.tensor([T]),
            torch.tensor([queries]),  # [1, 2] query rows
            torch.ones(1, 2, dtype=torch.bool),
            torch.tensor([layout.visual]),  # [1, N]
        )
        with torch.profiler.profile(record_shapes=True) as prof:
            scores = probe_scores(host, host.layers[2], *args)[0]
    assert scores.dtype == torch.float32
    assert_close("probe scores", scores, truth, yardstick, torch.float32, rule="scoring.probe.query-row")
    shapes = [s for e in prof.events() for s in e.input_shapes if isinstance(s, list) and len(s) >= 2]
    assert shapes and not [s for s in shapes if s[-1] == T and s[-2] == T], "the probe built a T x T matrix"


@pytest.mark.spec("selection.topk", "selection.tiebreak", "selection.order", "selection.pool-cap")
def test_selection_equals_reference_with_ties():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        N = int(torch.randint(1, 40, (1,), generator=gen))
        scores = torch.randint(0, 4, (N,), generator=gen).float() / 4  # many ties
        scores[scores == 0] = -0.0 if trial % 2 else 0.0
        pool = sorted(
            torch.randperm(N, generator=gen)[: int(torch.randint(1, N + 1, (1,), generator=gen))].tolist()
        )
        k = int(torch.randint(0, len(pool) + 1, (1,), generator=gen))
        assert select_topk(scores, pool, k) == reference_select_topk(scores, pool, k)


@pytest.mark.spec("cache.decode.unrouted", "cache.decode.positions", "budget.kv.decode-growth")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_greedy_tokens_equal_reference(llava, mixed, policy):
    config = RoutingConfig(MULTI, policy=policy)
    tokens, result = greedy_generate(llava, config, **mixed, max_new_tokens=5)
    expected, _ = reference_greedy(Reference(llava, config), **mixed, max_new_tokens=5)
    assert torch.equal(tokens, expected)
    for b, sample in enumerate(
        result.trace.samples
    ):  # one entry per layer per fed token, on top of kv_lengths
        assert [int(n[b]) for n in map(result.cache.layer_lengths, range(6))] == [
            n + 4 for n in sample.kv_lengths
        ]


@pytest.mark.spec("cache.decode.equiv")
def test_cached_decode_equals_recomputed_routed_forward(llava, mixed):
    config = RoutingConfig(MULTI)
    result = routed_prefill(llava, config, **mixed)
    new = torch.tensor([[11, 12], [13, 14], [15, 16], [17, 18]])
    logits = decode_step(llava, result.cache, new)  # [B, 2, V]: two tokens at once
    images = 0
    for b, (spec, sample) in enumerate(zip(SPECS, result.trace.samples)):
        valid = mixed["attention_mask"][b].bool()
        inputs = {"input_ids": torch.cat([mixed["input_ids"][b, valid], new[b]])[None]}
        if spec.num_images:
            inputs["pixel_values"] = mixed["pixel_values"][images : images + spec.num_images]
        images += spec.num_images
        forced = [[d.selected for d in sample.decisions]]
        recomputed = routed_prefill(llava, config, **inputs, forced_selection=forced)
        torch.testing.assert_close(logits[b], recomputed.logits[0, -2:], rtol=0, atol=1e-5)


@pytest.mark.spec("routing.output", "scoring.probe.softmax")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_with_float32_scores(llava, mixed, dtype):
    """Decisions forced to the reference's; error bounded by the host's own low-precision error (dense, same dtype)."""
    config = RoutingConfig(MULTI)
    truth = Reference(llava, RoutingConfig(MULTI, compute_dtype=torch.float64)).prefill(**mixed)
    forced = [[d.selected for d in s.decisions] for s in truth.trace.samples]
    low = copy.deepcopy(llava).to(dtype)
    out = routed_prefill(low, config, **mixed, forced_selection=forced)
    assert out.logits.dtype == dtype
    assert all(d.scores.dtype == torch.float32 for s in out.trace.samples for d in s.decisions)
    with torch.no_grad():
        dense_truth = (
            copy.deepcopy(llava).double()(**{**mixed, "pixel_values": mixed["pixel_values"].double()}).logits
        )
        dense_low = low(**{**mixed, "pixel_values": mixed["pixel_values"].to(dtype)}).logits
    valid = mixed["attention_mask"].bool()
    own_error = (dense_low[valid].double() - dense_truth[valid]).abs().max()
    error = (out.logits[valid].double() - truth.logits[valid]).abs().max()
    assert torch.isfinite(out.logits).all() and error <= 2 * own_error + 1e-2, (error, own_error)


@pytest.mark.gpu
@pytest.mark.spec("layout.batch-independence")
def test_cuda_matches_cpu(llava, mixed):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    config = RoutingConfig(MULTI)
    cpu = routed_prefill(llava, config, **mixed)
    gpu = routed_prefill(copy.deepcopy(llava).cuda(), config, **{k: v.cuda() for k, v in mixed.items()})
    assert discrete(gpu.trace) == discrete(cpu.trace)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=0, atol=1e-4)


@pytest.mark.spec("budget.active-counts", "budget.flops.true", "budget.flops.probe")
def test_quick_bench_writes_its_record(tmp_path):
    from rerouting.optimized import bench

    out = tmp_path / "bench.json"
    argv = ["--quick", "--repeats", "1", "--warmup", "0", "--batches", "1,2", "--decode-batches", "1,3"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0  # --out is a folder, like elsewhere
    assert (tmp_path / "bench.txt").read_text().startswith("device: cpu")
    record = json.loads(out.read_text())
    assert record["host"] == "llava"
    assert record["threads"] == 1 and record["clock"] == "cpu"  # CPU defaults: one thread, CPU clock
    assert record["verdict"]["judged"] is False
    assert [(row["batch"], row["k"]) for row in record["decode"]] == [
        (b, k) for b in (1, 3) for k in bench.QUICK.tiers
    ]
    for row in record["decode"]:
        assert row["tokens_per_s"]["dense"] > 0 and row["tokens_per_s"]["reroute"] > 0
        assert row["kv_entries"]["dense"] == row["batch"] * bench.QUICK.prompt_length * bench.QUICK.num_layers
        assert row["ratios"]["kv_bound"] > 1
    assert {"device", "dtype", "shape", "schedules", "targets", "rows", "verdict", "memory_method"} <= set(
        record
    )
    assert {row["batch"] for row in record["rows"]} == {1, 2}
    assert [row["k"] for row in record["rows"] if row["batch"] == 1] == list(bench.QUICK.tiers)
    for row in record["rows"]:
        assert {"dense", "remove", "reroute"} <= set(row["times"])
        assert {"reroute_over_remove", "dense_over_reroute", "flops_bound", "speedup_over_bound"} <= set(
            row["ratios"]
        )
        assert {"dense", "routed", "probe"} == set(row["flops"])
        assert row["flops"]["dense"] > row["flops"]["routed"] > 0
        if row["batch"] == 1:
            assert {"reference", "reroute_full"} <= set(row["times"])
            assert "reference_over_optimized" in row["ratios"]


@pytest.mark.spec("budget.active-counts", "budget.flops.true", "layout.image-grid", "cache.decode.positions")
@pytest.mark.skipif(
    not mrope_release_ok(), reason="this transformers has the Qwen mRoPE bug: the host refuses it"
)
def test_quick_qwen_bench_writes_its_record(tmp_path):
    """``--host qwen2.5-vl --quick``: the same record, on a Qwen2.5-VL with two images of different grids."""
    from rerouting.optimized import bench, bench_hosts

    shape = bench_hosts.QWEN_QUICK
    argv = ["--host", "qwen2.5-vl", "--quick", "--repeats", "1", "--warmup", "0", "--decode-batches", "2"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["host"] == "qwen2.5-vl" and record["verdict"]["judged"] is False
    assert (
        record["arch"]["num_kv_heads"] == 2 and record["arch"]["attention_bias"] is True
    )  # GQA, q/k/v biases
    assert record["shape"]["grids"] == [list(g) for g in shape.grids] and record["shape"]["num_visual"] == 64
    assert [row["k"] for row in record["rows"]] == list(shape.tiers)
    for row in record["rows"]:
        assert {"dense", "remove", "reroute", "reference", "reroute_full"} <= set(row["times"])
        assert row["layer_visual_counts"] == [64] + [row["k"]] * (shape.num_layers - 1)
        assert row["flops"]["dense"] > row["flops"]["routed"] > 0 and row["ratios"]["flops_bound"] > 1
    assert [(row["batch"], row["k"]) for row in record["decode"]] == [(2, k) for k in shape.tiers]
    for row in record["decode"]:
        assert row["kv_entries"]["dense"] == 2 * shape.prompt_length * shape.num_layers
        assert row["tokens_per_s"]["dense"] > 0 and row["tokens_per_s"]["reroute"] > 0
    assert bench.parse_args([]).host == "llava"  # the default host


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "qwen3"], "invalid choice: 'qwen3'"),
        (["--repeats", "0"], "--repeats 0 is not a positive integer"),
        (["--threads", "2"], "--threads 2 on CPU needs an explicit --clock"),
        (["--batches", "1,x"], "--batches '1,x' is not a comma-separated list of integers"),
        (["--decode-batches", "0"], "--decode-batches '0': batch sizes must be at least 1"),
    ],
)
def test_bench_refuses_what_it_cannot_measure(argv, message, capsys):
    from rerouting.optimized import bench

    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
