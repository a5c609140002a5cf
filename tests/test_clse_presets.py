"""CLSE's released schedules, their published arithmetic and their budgets (spec/clse.md)."""

from __future__ import annotations

import json

import pytest

from rerouting.conformance import audit
from rerouting.reference.archs import ArchSpec, load_arch
from rerouting.reference.budget import budget_from_trace, nominal_visual_counts, schedule_trace
from rerouting.reference.flops import avg_visual_tokens, spectral_flops
from rerouting.reference.presets import PRESETS, clse_llava_counts, clse_qwen2vl_ratios
from rerouting.reference.schedule import Schedule

TIERS = (192, 128, 64)


@pytest.mark.spec("clse.presets")
def test_llava_presets_are_the_code_s_counts():
    assert [clse_llava_counts(t) for t in TIERS] == [(330, 210, 62), (220, 140, 41), (110, 70, 20)]
    assert clse_llava_counts(100) == (172, 109, 32)  # int(1.72R), int(1.09R), int(0.32R)
    for tier in TIERS:
        remove, reroute = PRESETS[f"clse_avg{tier}"], PRESETS[f"ours_vs_clse_avg{tier}"]
        assert remove.schedule == Schedule((1, 11, 21), clse_llava_counts(tier), unit="count")
        assert (remove.policy, reroute.policy) == ("remove", "reroute")
        assert remove.scorer == reroute.scorer and remove.schedule == reroute.schedule
        assert (remove.scorer.kind, remove.scorer.probe_layer, remove.scorer.clse.variant) == (
            "clse",
            "previous",  # attention from layer K-1
            "clse_attn",
        )


@pytest.mark.spec("clse.presets", "budget.avg-tokens")
def test_llava_published_arithmetic_and_realized_budget():
    # the code's own comment counts 10 + 10 + 12 layers, as if layer 0 were already pruned
    nominal = {
        t: (a * 10 + b * 10 + c * 12) / 32 for t, (a, b, c) in zip(TIERS, map(clse_llava_counts, TIERS))
    }
    assert nominal == {192: 192.0, 128: 127.875, 64: 63.75}
    realized = {}
    for tier in TIERS:
        trace = schedule_trace(PRESETS[f"clse_avg{tier}"], num_text=36, num_visual=576, num_layers=32)
        counts = trace.samples[0].layer_visual_counts
        assert counts[0] == 576 and counts[1:11] == (clse_llava_counts(tier)[0],) * 10
        assert counts[21:] == (clse_llava_counts(tier)[2],) * 11  # the last stage covers layers 21..31
        realized[tier] = round(avg_visual_tokens(counts), 1)
    assert realized == {192: 208.1, 128: 144.6, 64: 81.1}


@pytest.mark.spec("clse.presets")
def test_qwen2vl_presets_and_arithmetic():
    assert clse_qwen2vl_ratios(0.334) == (0.57, 0.36, 0.098)
    assert clse_qwen2vl_ratios(0.5) == pytest.approx((0.855, 0.54, 0.147))
    code = {
        r: (a * 9 + b * 9 + c * 10) / 28
        for r, (a, b, c) in ((r, clse_qwen2vl_ratios(r)) for r in (0.334, 0.223, 0.112))
    }
    assert {r: round(v, 3) for r, v in code.items()} == {0.334: 0.334, 0.223: 0.223, 0.112: 0.112}
    realized = []
    for tier in TIERS:
        config = PRESETS[f"qwen2vl_clse_avg{tier}"]
        assert (
            config.schedule.layers == (1, 10, 19)
            and PRESETS[f"qwen2vl_ours_vs_clse_avg{tier}"].policy == "reroute"
        )
        realized.append(round(avg_visual_tokens(nominal_visual_counts(config, 576, 28)) / 576, 3))
    assert realized == [0.366, 0.256, 0.146]


@pytest.mark.spec("clse.flops", "budget.flops.probe")
def test_spectral_flops_are_probe_overhead():
    _, arch = load_arch("llava-1.5-7b")
    assert spectral_flops(arch, [576]) == round(4096 * (20 * 576 * 9.169925001442312 + 10 * 576))
    assert 0.4e9 < spectral_flops(arch, [576]) < 0.5e9  # research/twig-clse.md §2.6: about 0.5 GFLOP
    for name in ("clse_avg64", "ours_vs_clse_avg64"):
        config = PRESETS[name]
        trace = schedule_trace(config, num_text=64, num_visual=576, num_layers=32)
        probes = budget_from_trace(trace, arch, config=config).samples[0].probes
        assert probes[0].flops["spectral"] == spectral_flops(arch, [576])
        assert all("spectral" not in p.flops for p in probes[1:])  # attention-only decisions
        assert all(p.flops["proj_q"] > 0 for p in probes)


@pytest.mark.spec("clse.presets", "budget.avg-tokens")
def test_audit_flags_clse_avg64_off_label(tmp_path):
    out = tmp_path / "out"
    assert (
        audit.main(["--schedule", "clse_avg64", "--policy", "both", "--no-plots", "-q", "--out", str(out)])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["schedules"]
    assert entry["scorer"]["kind"] == "clse"
    for run in entry["runs"]:
        assert round(run["avg_visual_tokens"]["realized"], 2) == 81.12
        assert run["label_check"]["flagged"]
        assert run["decisions"][0]["probe_flops_by_component"]["spectral"] > 0


@pytest.mark.spec("clse.presets", "budget.flops.true")
def test_qwen2vl_7b_arch_and_audit(tmp_path):
    config, arch = load_arch("qwen2-vl-7b")
    assert type(config).__name__ == "Qwen2VLConfig" and config.vision_config.embed_dim == 1280
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.attention_bias) == (
        28,
        3584,
        28,
        4,
        True,
    )
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    assert ArchSpec.from_model(model, name="qwen2-vl-7b") == arch  # the real module shapes
    out = tmp_path / "q"
    argv = ["--model", "qwen2-vl-7b", "--schedule", "qwen2vl_clse_avg64", "--policy", "both"]
    assert audit.main([*argv, "-q", "--no-trace", "--no-plots", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "report.json").read_text())["schedules"]
    for run in entry["runs"]:
        assert run["avg_visual_tokens"]["nominal"] == pytest.approx(
            576 * (1 + 9 * (0.19 + 0.12 + 0.034)) / 28
        )
        assert run["label_check"]["flagged"]
