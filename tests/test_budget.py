"""Budget accounting (spec/budget.md): token averages, FLOP conventions, probe overhead, KV bytes, solver.

Published numbers are pinned at the precision the papers print them (research/pruning-methods.md
§1.6, §2.6, §3.6; research/reroute.md §5.2, §5.4).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2Model,
)

from rerouting.reference.archs import ARCH_DIR, ArchSpec, arch_names, load_arch
from rerouting.reference.budget import budget_from_trace, nominal_visual_counts, schedule_trace
from rerouting.reference.flops import (
    avg_visual_tokens,
    kv_decode_growth,
    kv_entry_bytes,
    layer_flops_fastv,
    layer_flops_nuwa,
    layer_flops_pdrop,
    layer_flops_true,
    probe_flops,
)
from rerouting.reference.presets import PRESETS
from rerouting.reference.routing import Reference
from rerouting.reference.schedule import RoutingConfig, RoutingError, Schedule, Scorer
from rerouting.reference.solver import solve_keep_ratios, solve_scale

N = 576  # LLaVA-1.5 visual tokens
T = 1e12
KiB = 1024


@pytest.fixture(scope="module")
def llava7b():
    return load_arch("llava-1.5-7b")


def budget(config, arch, *, num_visual=N, num_text=36):
    trace = schedule_trace(config, num_text=num_text, num_visual=num_visual, num_layers=arch.num_layers)
    return budget_from_trace(trace, arch, config=config).samples[0]


def pdrop_like(lam, layers=(8, 16, 24)):
    return RoutingConfig(Schedule(layers, tuple(lam ** (s + 1) for s in range(len(layers)))), policy="remove")


# ---------------------------------------------------------------------------------------------
# Paper conventions
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.flops.pdrop", "budget.active-counts")
def test_pdrop_paper_tflops(llava7b):
    """PDrop §4.1 / Table 1, LLaVA-1.5-7B, image tokens only, MACs, integer counts from the trace."""
    _, arch = llava7b
    tflops = {
        "vanilla": budget(None, arch).macs_pdrop / T,
        "pdrop λ=0.5": budget(PRESETS["pdrop_default"], arch).macs_pdrop / T,
        "pdrop λ=0.4": budget(pdrop_like(0.4), arch).macs_pdrop / T,
        "pdrop λ=0.6": budget(pdrop_like(0.6), arch).macs_pdrop / T,
        "fastv K2 R50": budget(PRESETS["fastv_K2_R50"], arch).macs_pdrop / T,
    }
    published = {
        "vanilla": 3.82,
        "pdrop λ=0.5": 1.78,
        "pdrop λ=0.4": 1.54,
        "pdrop λ=0.6": 2.06,
        "fastv K2 R50": 2.01,
    }
    assert {k: round(v, 2) for k, v in tflops.items()} == published
    assert budget(None, arch).macs_pdrop == 3_817_152_184_320  # exact: 32·F_pdrop(576)
    # keep ratio 1.0 at a decision counts the same as the unrouted forward
    keep_all = RoutingConfig(Schedule((0,), (1.0,)))
    assert budget(keep_all, arch).macs_pdrop == budget(None, arch).macs_pdrop
    # LLaVA-NeXT-7B (same Vicuna-7B decoder), 2880 visual tokens
    assert round(budget(None, arch, num_visual=2880).macs_pdrop / T, 1) == 20.8


@pytest.mark.spec("budget.flops.nuwa")
def test_nuwa_paper_tflops(llava7b):
    """Nüwa App. C / Table 4: 2·MAC, image tokens only, 2 FFN matrices."""
    _, arch = llava7b
    vanilla = budget(None, arch).flops_nuwa / T
    assert round(vanilla, 3) == 5.972  # published 5.9730: the formula gives 5.97215
    assert vanilla == pytest.approx(5.9730, abs=1e-3)
    # Nüwa-64: stage 1 leaves 112 tokens for layers 0-15, stage 2 keeps 16 from layer 16 on
    nuwa64 = RoutingConfig(Schedule((16,), (16,), unit="count"), policy="remove")
    b = budget(nuwa64, arch, num_visual=112)
    assert b.visual_counts == (112,) * 16 + (16,) * 16
    assert b.avg_visual_tokens == 64.0
    assert round(b.flops_nuwa / T, 4) == 0.6476


@pytest.mark.spec("budget.flops.fastv")
def test_fastv_paper_table1_per_layer_average():
    """FastV Table 1, LLaVA-1.5-13B: FLOPs(B) = Σ_l F_fastv(n_l)/L, n = 36 system + 576 image tokens."""
    _, arch = load_arch("llava-1.5-13b")

    def per_layer(config):
        return budget(config, arch).macs_fastv / arch.num_layers / 1e9

    def fastv(K, keep):  # n̂ = 36 + round(576·(1−R)) from layer K on
        return RoutingConfig(Schedule((K,), (keep,), unit="count"), policy="remove")

    assert round(per_layer(None), 1) == 154.6
    assert round(per_layer(fastv(2, 288)), 1) == 84.6
    assert round(per_layer(fastv(3, 144)), 1) == 52.9
    assert round(per_layer(fastv(5, 58)), 2) == 39.68
    # the convention counts the whole sequence: text tokens are not free
    assert layer_flops_fastv(arch, 612) > layer_flops_fastv(arch, 576)


@pytest.mark.spec("budget.flops.fastv", "budget.flops.pdrop", "budget.flops.nuwa")
def test_paper_formulas_literal(llava7b):
    _, arch = llava7b
    d, m = 4096, 11008
    for n in (0, 1, 17, 576):
        assert layer_flops_fastv(arch, n) == 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
        assert layer_flops_pdrop(arch, n) == 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
        assert layer_flops_nuwa(arch, n) == 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
    # the conventions ignore text in the visual-only rules and count it in FastV's
    b = budget(PRESETS["fastv_K3_avg64"], arch)
    assert b.macs_pdrop == sum(layer_flops_pdrop(arch, v) for v in b.visual_counts)
    assert b.macs_fastv == sum(layer_flops_fastv(arch, 36 + v) for v in b.visual_counts)


# ---------------------------------------------------------------------------------------------
# True count
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.flops.true")
def test_true_count_llava7b(llava7b):
    _, arch = llava7b
    dense = budget(None, arch, num_visual=576, num_text=64)  # T = 640
    Tn, d, m = 640, 4096, 11008
    assert dense.flops_true == 2 * 32 * (4 * Tn * d * d + 2 * Tn * Tn * d + 3 * Tn * d * m)
    assert round(dense.flops_true / T, 3) == 8.504  # research/ecosystem.md §1.3 (FlopCounterMode on meta)
    assert dense.flops_true_by_component["bias"] == 0
    assert dense.lm_head_flops == 2 * 640 * d * 32064  # reported apart, not in flops_true
    # spec example: M = 20, N = 576 -> 7.906 T
    assert round(budget(None, arch, num_text=20).flops_true / T, 3) == 7.906


@pytest.mark.spec("budget.flops.true")
@pytest.mark.parametrize("family", ["llama-biased", "qwen2"])
def test_true_count_matches_torch_flop_counter(family):
    """Each decoder layer's FlopCounterMode count (mm/bmm, eager attention) == true count minus bias adds."""
    shape = dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
    )
    if family == "qwen2":
        cfg, model_cls, prefix = Qwen2Config(**shape), Qwen2Model, "Qwen2Model"
    else:
        cfg, model_cls = LlamaConfig(**shape, attention_bias=True, mlp_bias=True), LlamaModel
        prefix = "LlamaModel"
    cfg._attn_implementation = "eager"
    arch = ArchSpec.from_text_config(cfg, name=family)
    n = 13
    model = model_cls(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 64, (1, n)))
    counts = counter.get_flop_counts()
    flops = layer_flops_true(arch, n)
    for layer in range(2):
        measured = sum(counts[f"{prefix}.layers.{layer}"].values())
        assert measured == sum(flops.values()) - flops["bias"]
    hd, out = 8, 48
    if family == "qwen2":  # q/k/v biased, o and MLP not
        assert flops["bias"] == n * (6 * hd + 2 * 2 * hd)
    else:  # q/k/v/o and gate/up/down biased
        assert flops["bias"] == n * (6 * hd + 2 * 2 * hd) + n * out + n * (2 * 80 + out)


# ---------------------------------------------------------------------------------------------
# Average tokens
# ---------------------------------------------------------------------------------------------

# research/reroute.md §5.2 (N = 576, L = 32): nominal / realized avg_T; PDrop Table 5 for the last two.
RELEASE_AVG = {
    "fastv_K3_avg192": (192.02, 191.75),
    "ours_vs_fastv_avg192": (192.02, 191.75),
    "pdrop_earlyL2_avg192": (192.00, 191.34),
    "ours_vs_pdrop_avg192": (192.00, 191.47),
    "fastv_K3_avg128": (128.02, 127.41),
    "ours_vs_fastv_avg128": (128.02, 127.41),
    "pdrop_earlyL2_avg128": (128.00, 127.62),
    "ours_vs_pdrop_avg128": (128.01, 127.44),
    "fastv_K3_avg64": (64.00, 63.97),
    "ours_vs_fastv_avg64": (64.00, 63.97),
    "pdrop_earlyL2_avg64": (80.85, 80.44),
    "ours_vs_pdrop_avg64": (84.23, 84.12),
    "pdrop_default": (270.0, 270.0),
    "fastv_K2_R50": (306.0, 306.0),
}


@pytest.mark.spec("budget.avg-tokens", "budget.active-counts", "schedule.presets")
@pytest.mark.parametrize("name", sorted(RELEASE_AVG))
def test_release_preset_realized_avg(name):
    trace = schedule_trace(PRESETS[name], num_text=36, num_visual=N, num_layers=32)
    realized = avg_visual_tokens(trace.samples[0].layer_visual_counts)
    assert realized == pytest.approx(RELEASE_AVG[name][1], abs=0.0051)


@pytest.mark.spec("budget.avg-tokens", "schedule.presets")
@pytest.mark.parametrize("name", sorted(RELEASE_AVG))
def test_release_preset_nominal_avg(name):
    nominal = avg_visual_tokens(nominal_visual_counts(PRESETS[name], N, 32))
    assert nominal == pytest.approx(RELEASE_AVG[name][0], abs=0.0051)


@pytest.mark.spec("budget.avg-tokens")
def test_avg_tokens_spec_example_and_release_ratios(llava7b):
    _, arch = llava7b
    b = budget(PRESETS["fastv_K3_avg192"], arch)
    assert b.visual_counts == (576,) * 3 + (152,) * 29
    assert b.avg_visual_tokens == 191.75
    assert round(b.avg_visual_tokens_nominal, 2) == 192.02
    # ours_vs_pdrop_avg192 = (0.4502, 0.4502, 0.2251, 0.1126): 192.00 nominal (0.1125 would give 191.99)
    assert PRESETS["ours_vs_pdrop_avg192"].schedule.keep == (0.4502, 0.4502, 0.2251, 0.1126)
    assert round(budget(PRESETS["ours_vs_pdrop_avg192"], arch).avg_visual_tokens_nominal, 2) == 192.00


# research/reroute.md §5.2, Qwen2.5-VL-7B (L = 28), release ratios with Qwen's decision layers.
QWEN_AVG = {
    ("fastv_K3", (3,)): {192: (197.69, 197.43), 128: (134.64, 134.04), 64: (71.57, 71.54)},
    ("pdrop_earlyL2", (2, 6, 13, 20)): {192: (192.87, 192.21), 128: (129.73, 129.36), 64: (83.87, 83.46)},
    ("ours_vs_pdrop", (2, 6, 13, 20)): {192: (193.96, 193.43), 128: (131.27, 130.71), 64: (88.39, 88.29)},
}
RELEASE_OURS_PDROP_RATIOS = {
    192: (0.4502, 0.4502, 0.2251, 0.1126),
    128: (0.2655, 0.2655, 0.1328, 0.0664),
    64: (0.1392, 0.1392, 0.0696, 0.0348),
}


@pytest.mark.spec("budget.avg-tokens")
@pytest.mark.parametrize("family,layers", list(QWEN_AVG))
def test_qwen_release_schedules_avg(family, layers):
    for tier, (nominal, realized) in QWEN_AVG[(family, layers)].items():
        preset = PRESETS[f"{family}_avg{tier}"]
        keep = RELEASE_OURS_PDROP_RATIOS[tier] if family == "ours_vs_pdrop" else preset.schedule.keep
        config = RoutingConfig(Schedule(layers, keep), policy=preset.policy)
        trace = schedule_trace(config, num_text=20, num_visual=N, num_layers=28)
        assert avg_visual_tokens(trace.samples[0].layer_visual_counts) == pytest.approx(realized, abs=0.0051)
        assert avg_visual_tokens(nominal_visual_counts(config, N, 28)) == pytest.approx(nominal, abs=0.0051)


@pytest.mark.spec("budget.avg-tokens")
def test_nominal_counts_rules():
    # remove: capped by the previous stage's nominal; reroute: not
    rising = Schedule((1, 2), (0.25, 0.5))
    assert nominal_visual_counts(RoutingConfig(rising, policy="remove"), 10, 4) == (10.0, 2.5, 2.5, 2.5)
    assert nominal_visual_counts(RoutingConfig(rising, policy="reroute"), 10, 4) == (10.0, 2.5, 5.0, 5.0)
    # no floor, no max(1, ·): N·r stays real-valued where the trace keeps 1
    tiny = RoutingConfig(Schedule((1,), (0.01,)))
    assert nominal_visual_counts(tiny, 10, 3) == (10.0, 0.1, 0.1)
    assert schedule_trace(tiny, num_text=2, num_visual=10, num_layers=3).samples[0].layer_visual_counts == (
        10,
        1,
        1,
    )
    assert nominal_visual_counts(tiny, 0, 3) == (0.0, 0.0, 0.0)
    with pytest.raises(RoutingError, match="budget.avg-tokens"):
        avg_visual_tokens([])


# ---------------------------------------------------------------------------------------------
# Traces without a model
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.active-counts", "budget.flops.probe", "budget.kv.entries")
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_schedule_trace_matches_reference_router(llava, single, policy):
    """The model-free trace has the same counts as a real routed prefill, hence the same budgets."""
    config = RoutingConfig(Schedule((1, 3, 4), (0.5, 0.5, 0.25)), policy=policy)
    real = Reference(llava, config).prefill(**single).trace
    sample = real.samples[0]
    start = sample.visual_positions[0]
    model_free = schedule_trace(
        config,
        num_text=sample.num_text,
        num_visual=sample.num_visual,
        num_layers=real.num_layers,
        visual_start=start,
    )
    other = model_free.samples[0]
    assert other.visual_positions == sample.visual_positions
    assert other.layer_visual_counts == sample.layer_visual_counts
    assert other.kv_lengths == sample.kv_lengths
    for a, b in zip(other.decisions, sample.decisions):
        assert (a.layer, a.stage, a.k, len(a.pool), a.probe_keys, a.probe_queries) == (
            b.layer,
            b.stage,
            b.k,
            len(b.pool),
            b.probe_keys,
            b.probe_queries,
        )
    arch = ArchSpec.from_model(llava)
    assert budget_from_trace(model_free, arch).to_dict() == budget_from_trace(real, arch).to_dict()


@pytest.mark.spec("budget.active-counts", "budget.flops.probe")
def test_schedule_trace_probe_sizes_and_unrouted():
    config = RoutingConfig(Schedule((1, 2, 3), (0.5, 0.25, 0.5)), policy="remove")
    sample = schedule_trace(config, num_text=7, num_visual=40, num_layers=5).samples[0]
    assert [len(d.pool) for d in sample.decisions] == [40, 20, 10]
    assert [d.k for d in sample.decisions] == [20, 10, 10]  # k capped by the pool
    assert [d.probe_keys for d in sample.decisions] == [47, 27, 17]  # text + pool
    assert all(d.probe_queries == 1 for d in sample.decisions)
    reroute = schedule_trace(config.with_policy("reroute"), num_text=7, num_visual=40, num_layers=5).samples[
        0
    ]
    assert [d.probe_keys for d in reroute.decisions] == [47, 47, 47]  # every token
    assert reroute.layer_visual_counts == (40, 20, 10, 20, 20)
    # N = 0: unrouted, no decision, empty active sets
    text_only = schedule_trace(config, num_text=9, num_visual=0, num_layers=5).samples[0]
    assert not text_only.routed and text_only.active_visual == ((),) * 5
    # multi-row query variant: one query row per text token after the image
    after = RoutingConfig(config.schedule, scorer=Scorer(query="text-after-image"))
    assert (
        schedule_trace(after, num_text=9, num_visual=4, num_layers=5, visual_start=3)
        .samples[0]
        .decisions[0]
        .probe_queries
        == 6
    )
    # the random scorer runs no probe
    rand = RoutingConfig(config.schedule, scorer=Scorer(kind="random"))
    trace = schedule_trace(rand, num_text=9, num_visual=4, num_layers=5)
    assert {(d.probe_keys, d.probe_queries) for d in trace.samples[0].decisions} == {(0, 0)}
    arch5 = ArchSpec("five", 5, 64, 128, 4, 2, 16, 100, False, False)
    assert budget_from_trace(trace, arch5, config=rand).samples[0].probe_flops == 0


@pytest.mark.spec("budget.active-counts")
def test_schedule_trace_errors():
    config = RoutingConfig(Schedule((40,), (0.5,)))
    with pytest.raises(RoutingError, match="schedule.decision-layers"):
        schedule_trace(config, num_text=3, num_visual=8, num_layers=32)
    with pytest.raises(RoutingError, match="schedule.keep-count"):
        schedule_trace(
            RoutingConfig(Schedule((1,), (9,), unit="count")), num_text=3, num_visual=8, num_layers=4
        )
    with pytest.raises(RoutingError, match="scoring.probe.query-row"):
        schedule_trace(RoutingConfig(Schedule((1,), (0.5,))), num_text=0, num_visual=8, num_layers=4)
    with pytest.raises(RoutingError, match="budget.active-counts"):
        schedule_trace(None, num_text=-1, num_visual=8, num_layers=4)
    trace = schedule_trace(None, num_text=3, num_visual=8, num_layers=4)
    _, arch = load_arch("llava-1.5-7b")
    with pytest.raises(RoutingError, match="budget.active-counts"):
        budget_from_trace(trace, arch)


# ---------------------------------------------------------------------------------------------
# Reroute vs remove, probe overhead
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.flops.probe", "budget.flops.true", "budget.kv.bytes")
@pytest.mark.parametrize("tier", [192, 128, 64])
def test_reroute_vs_remove_same_counts(llava7b, tier):
    """ours_vs_fastv ≡ fastv_K3 layer by layer: same decoder FLOPs and KV; 3 extra full probes."""
    _, arch = llava7b
    remove = budget(PRESETS[f"fastv_K3_avg{tier}"], arch, num_text=20)
    reroute = budget(PRESETS[f"ours_vs_fastv_avg{tier}"], arch, num_text=20)
    assert reroute.visual_counts == remove.visual_counts
    for attr in (
        "flops_true",
        "macs_fastv",
        "macs_pdrop",
        "flops_nuwa",
        "kv_entries",
        "kv_bytes",
        "lm_head_flops",
    ):
        assert getattr(reroute, attr) == getattr(remove, attr), attr
    full_probe = probe_flops(arch, 20 + N, 1)
    assert [p.keys for p in reroute.probes] == [596] * 4
    assert remove.probe_flops == sum(full_probe.values())
    assert reroute.probe_flops - remove.probe_flops == 3 * sum(full_probe.values())


@pytest.mark.spec("budget.flops.probe")
def test_probe_flops_formula(llava7b):
    _, arch = llava7b
    P, Q, d, hd = 596, 1, 4096, 128
    flops = probe_flops(arch, P, Q)
    assert flops == {
        "proj_k": 2 * P * d * 32 * hd,
        "proj_q": 2 * Q * d * 32 * hd,
        "scores": 2 * Q * P * 32 * hd,
        "bias": 0,
    }
    assert round(sum(flops.values()) / T, 4) == 0.0200  # spec example
    # the release's full T×T probe (q for every token) is about 0.043 T at T = 596
    assert round(sum(probe_flops(arch, P, P).values()) / T, 3) == 0.043
    _, qwen = load_arch("qwen2.5-vl-7b")
    assert probe_flops(qwen, 10, 2)["bias"] == 2 * 28 * 128 + 10 * 4 * 128


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.kv.bytes", "budget.kv.decode-growth", "budget.kv.entries")
def test_kv_bytes(llava7b):
    _, arch = llava7b
    assert kv_entry_bytes(arch, torch.float16) == 16 * KiB
    assert kv_decode_growth(arch, torch.float16) == 512 * KiB
    assert kv_entry_bytes(arch, torch.float32) == 32 * KiB
    _, qwen = load_arch("qwen2.5-vl-7b")
    assert kv_entry_bytes(qwen, torch.bfloat16) == 2 * KiB
    assert kv_decode_growth(qwen, torch.bfloat16) == 56 * KiB
    dense = budget(None, arch, num_text=20)
    assert dense.kv_bytes / 2**20 == 298.0  # spec example: 596 tokens × 32 layers × 16 KiB
    config = PRESETS["pdrop_earlyL2_avg64"]
    trace = schedule_trace(config, num_text=20, num_visual=N, num_layers=32)
    routed = budget_from_trace(trace, arch)
    per_layer = [layer.kv_entries for layer in routed.samples[0].layers]
    assert tuple(per_layer) == trace.samples[0].kv_lengths
    assert routed.kv_bytes == sum(per_layer) * 16 * KiB
    assert routed.kv_decode_growth == 512 * KiB
    # research/reroute.md §5.4: 50.2 MiB, 83.1 % below the dense 298.0 MiB
    assert round(routed.kv_bytes / 2**20, 1) == 50.2


@pytest.mark.spec("budget.flops.true", "budget.kv.bytes", "budget.avg-tokens")
def test_batch_budget_to_dict_is_json(llava7b):
    _, arch = llava7b
    config = PRESETS["ours_vs_pdrop_avg64"]
    trace = schedule_trace(config, num_text=20, num_visual=N, num_layers=32)
    b = budget_from_trace(trace, arch, config=config)
    d = json.loads(json.dumps(b.to_dict()))
    s = d["samples"][0]
    assert d["totals"]["flops_true"] == b.flops_true == s["flops_true"]
    assert sum(s["flops_true_by_component"].values()) == s["flops_true"]
    assert s["visual_counts"] == list(trace.samples[0].layer_visual_counts)
    assert s["token_counts"] == [20 + v for v in s["visual_counts"]]
    assert round(s["avg_visual_tokens"], 2) == 84.12 and round(s["avg_visual_tokens_nominal"], 2) == 84.23
    assert d["kv_dtype"] == "float16" and d["kv_entry_bytes"] == 16 * KiB
    assert len(s["layers"]) == 32 and len(s["probes"]) == 4
    # research/reroute.md §5.4, M = 20: 1.363 T decoder, 52.1 MiB KV
    assert round(b.flops_true / T, 3) == 1.363 and round(b.kv_bytes / 2**20, 1) == 52.1


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


def config_content(data, nested=False):
    """A config dict without what the installed release stamps on it rather than reads from it.

    That is ``transformers_version`` everywhere and a sub-config's ``model_type``, a class constant that
    releases renamed (Qwen2.5-VL's vision config: ``qwen2_5_vl`` in 5.4, ``qwen2_5_vl_vision`` later).
    """
    if isinstance(data, dict):
        stamped = {"transformers_version", "model_type"} if nested else {"transformers_version"}
        return {k: config_content(v, nested=True) for k, v in data.items() if k not in stamped}
    return data


def assert_same_content(rebuilt, embedded):
    """Every key the embedded JSON sets comes back with its value (a release may add keys with defaults)."""
    rebuilt, embedded = config_content(json.loads(json.dumps(rebuilt))), config_content(embedded)

    def check(got, want, path):
        if isinstance(want, dict):
            assert isinstance(got, dict), f"{path}: {got!r} is not a dict"
            for key, value in want.items():
                assert key in got, f"{path}.{key} missing after the round trip"
                check(got[key], value, f"{path}.{key}")
        else:
            assert got == want, f"{path}: {got!r} != {want!r}"

    check(rebuilt, embedded, "config")


@pytest.mark.spec("budget.flops.true")
def test_embedded_llava_configs_round_trip_and_build_on_meta():
    for name, (layers, hidden, inter, heads) in {
        "llava-1.5-7b": (32, 4096, 11008, 32),
        "llava-1.5-13b": (40, 5120, 13824, 40),
    }.items():
        config, arch = load_arch(name)
        data = json.loads((ARCH_DIR / f"{name}.json").read_text())
        assert isinstance(config, LlavaConfig)
        assert_same_content(LlavaConfig(**data).to_dict(), data)
        text, vision = config.text_config, config.vision_config
        assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (layers, hidden, inter)
        assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (heads, heads, 32064)
        assert (text.rms_norm_eps, text.max_position_embeddings) == (1e-5, 4096)
        assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
        assert (vision.intermediate_size, vision.image_size, vision.patch_size, vision.projection_dim) == (
            4096,
            336,
            14,
            768,
        )
        assert (config.image_token_id, config.image_seq_length, config.projector_hidden_act) == (
            32000,
            576,
            "gelu",
        )
        assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        assert ArchSpec.from_model(model, name=name) == arch
        assert arch == ArchSpec(name, layers, hidden, inter, heads, heads, 128, 32064, False, False)


@pytest.mark.spec("budget.flops.true", "budget.kv.bytes")
def test_embedded_qwen_config():
    config, arch = load_arch("qwen2.5-vl-7b")
    data = json.loads((ARCH_DIR / "qwen2.5-vl-7b.json").read_text())
    assert isinstance(config, Qwen2_5_VLConfig)
    assert_same_content(Qwen2_5_VLConfig(**data).to_dict(), data)
    assert arch == ArchSpec(
        "qwen2.5-vl-7b", 28, 3584, 18944, 28, 4, 128, 152064, True, False, o_proj_bias=False
    )
    assert config.vision_config.hidden_size == 1280 and config.vision_config.out_hidden_size == 3584
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert ArchSpec.from_model(model) == arch
    flops = layer_flops_true(arch, 100)
    assert flops["proj_k"] == flops["proj_v"] == 2 * 100 * 3584 * 4 * 128  # GQA-sized
    assert flops["bias"] == 100 * (28 * 128 + 2 * 4 * 128)  # q/k/v only, no o_proj bias


@pytest.mark.spec("budget.flops.true")
def test_arch_errors():
    with pytest.raises(RoutingError, match="budget.flops.true") as info:
        load_arch("llava-1.5-70b")
    for name in ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b"):
        assert name in str(info.value)
    assert set(arch_names()) >= {"llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b"}
    with pytest.raises(RoutingError, match="budget.flops.true"):
        ArchSpec("bad", 32, 4096, 11008, 32, 5, 128, 32000, False, False)
    with pytest.raises(RoutingError, match="budget.flops.true"):
        ArchSpec.from_text_config(LlavaConfig().vision_config)
    with pytest.raises(RoutingError, match="budget.flops.true"):
        layer_flops_true(load_arch("llava-1.5-7b")[1], -1)


# ---------------------------------------------------------------------------------------------
# Matched-budget solver
# ---------------------------------------------------------------------------------------------

PDROP_LAYERS = (2, 7, 15, 23)


@pytest.mark.spec("budget.avg-tokens")
def test_solver_ours_vs_pdrop_alpha():
    """α = (32·avg − 1152)/11088 for shape (1, 1, ½, ¼): the release's 0.4502 and 0.2655; 64 needs 0.0808."""
    for tier, alpha in ((192, 0.4502), (128, 0.2655), (64, 0.0808)):
        exact = solve_scale(PDROP_LAYERS, (1, 1, 0.5, 0.25), tier, num_visual=N, num_layers=32)
        assert exact == pytest.approx((32 * tier - 1152) / 11088, rel=1e-12)
        ratios, _, nominal = solve_keep_ratios(
            PDROP_LAYERS, (1, 1, 0.5, 0.25), tier, num_visual=N, num_layers=32
        )
        assert ratios[0] == alpha
        assert nominal == pytest.approx(tier, abs=0.01)
    for tier in (192, 128):
        solved = solve_keep_ratios(PDROP_LAYERS, (1, 1, 0.5, 0.25), tier, num_visual=N, num_layers=32)
        assert solved.ratios == RELEASE_OURS_PDROP_RATIOS[tier]
        assert solved.realized_avg == pytest.approx(RELEASE_AVG[f"ours_vs_pdrop_avg{tier}"][1], abs=0.0051)
    solved64 = solve_keep_ratios(PDROP_LAYERS, (1, 1, 0.5, 0.25), 64, num_visual=N, num_layers=32)
    assert solved64.ratios == (0.0808, 0.0808, 0.0404, 0.0202)
    assert solved64.realized_avg == 63.53125


@pytest.mark.spec("budget.avg-tokens")
def test_solver_geometric_reproduces_release_pdrop():
    """The release's pdrop_earlyL2 ratios are λ^(s+1) rounded, λ solved for the nominal avg (192, 128)."""
    for tier, lam in ((192, 0.5965), (128, 0.4570)):
        solved = solve_keep_ratios(PDROP_LAYERS, "geometric", tier, num_visual=N, num_layers=32)
        assert solved.ratios[0] == lam
        assert solved.ratios == PRESETS[f"pdrop_earlyL2_avg{tier}"].schedule.keep
        assert solved.realized_avg == pytest.approx(RELEASE_AVG[f"pdrop_earlyL2_avg{tier}"][1], abs=0.0051)
    # the release's 64-tier PDrop ratios are not geometric and sit at 80.85; a true 64 needs λ ≈ 0.2162
    solved = solve_keep_ratios(PDROP_LAYERS, "geometric", 64, num_visual=N, num_layers=32)
    assert solved.ratios[0] == 0.2162 and solved.nominal_avg == pytest.approx(64, abs=0.01)


@pytest.mark.spec("budget.avg-tokens")
def test_solver_fastv_and_errors():
    assert solve_keep_ratios((3,), (1,), 192, num_visual=N, num_layers=32) == (
        (0.2644,),
        191.75,
        pytest.approx(192.0168),
    )
    assert solve_keep_ratios((3,), (1,), 128, num_visual=N, num_layers=32).ratios == (0.1418,)
    # the release's 64-tier FastV ratio carries a fifth decimal
    assert solve_keep_ratios((3,), (1,), 64, num_visual=N, num_layers=32, decimals=5).ratios == (0.01916,)
    with pytest.raises(RoutingError, match="budget.avg-tokens"):  # below the dense prefix's 54
        solve_keep_ratios((3,), (1,), 50, num_visual=N, num_layers=32)
    with pytest.raises(RoutingError, match="budget.avg-tokens"):  # needs a ratio > 1
        solve_keep_ratios((3, 30), (1, 4), 500, num_visual=N, num_layers=32)
    with pytest.raises(RoutingError, match="budget.avg-tokens"):
        solve_keep_ratios(PDROP_LAYERS, (1, 1), 192, num_visual=N, num_layers=32)
    with pytest.raises(RoutingError, match="budget.avg-tokens"):
        solve_keep_ratios(PDROP_LAYERS, "linear", 192, num_visual=N, num_layers=32)
    with pytest.raises(RoutingError, match="budget.avg-tokens"):  # remove + rising shape: pool cap binds
        solve_keep_ratios((3, 7), (1, 2), 100, num_visual=N, num_layers=32, policy="remove")
