"""Budgets on the Qwen3 family (spec/budget.md ``budget.flops.linear``, ``budget.kv.state-bytes``).

The embedded Qwen3-VL-8B and Qwen3.5-9B architectures (reference/archs/, values of the published
``config.json``), the linear-attention layer's true FLOPs checked against the real module shapes on the
meta device, its state bytes against a real routed cache, and the presets each architecture can run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rerouting.reference import RoutingConfig, Schedule
from rerouting.reference.archs import ArchSpec, arch_names, load_arch
from rerouting.reference.budget import budget_from_trace, nominal_visual_counts, schedule_trace
from rerouting.reference.flops import kv_decode_growth, layer_flops_true, probe_flops
from rerouting.reference.flops_linear import linear_layer_flops_true, linear_state_bytes
from rerouting.reference.host_qwen3 import qwen3_release_refusal
from rerouting.reference.hybrid import presets_for

pytestmark = pytest.mark.skipif(
    qwen3_release_refusal("qwen3.5") is not None,
    reason="this transformers has no Qwen3.5 / linear-attention cache",
)


@pytest.mark.spec("budget.flops.linear", "hosts.deepstack")
def test_embedded_architectures():
    assert {"qwen3-vl-8b", "qwen3.5-9b"} <= set(arch_names())
    _, vl = load_arch("qwen3-vl-8b")
    assert (vl.num_layers, vl.hidden_size, vl.num_heads, vl.num_kv_heads, vl.head_dim) == (
        36,
        4096,
        32,
        8,
        128,
    )
    assert (vl.deepstack_levels, vl.attention_bias, vl.layer_kinds, vl.query_gate) == (3, False, (), False)
    _, q = load_arch("qwen3.5-9b")
    assert (q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim, q.vocab_size) == (32, 16, 4, 256, 248320)
    assert [i for i, kind in enumerate(q.layer_kinds) if kind == "softmax"] == list(range(3, 32, 4))
    assert (q.linear_key_heads, q.linear_value_heads, q.linear_key_dim, q.linear_conv_kernel) == (
        16,
        32,
        128,
        4,
    )
    assert q.query_gate and q.to_dict()["layer_kinds"][3] == "softmax"


def _linear_flops(module: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.spec("budget.flops.linear", "budget.flops.true")
def test_linear_and_gated_layer_flops_match_the_real_module_shapes():
    """One token through a meta-device Qwen3.5-9B layer: every nn.Linear and the conv as the formulas count them."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer

    config, arch = load_arch("qwen3.5-9b")
    with torch.device("meta"):
        linear, softmax = (
            Qwen3_5DecoderLayer(config.text_config, 0),
            Qwen3_5DecoderLayer(config.text_config, 3),
        )
    flops = linear_layer_flops_true(arch, 1)
    assert flops["proj_in"] + flops["proj_out"] + flops["mlp"] == _linear_flops(linear)
    conv = linear.linear_attn.conv1d
    assert flops["conv"] == 2 * conv.weight.shape[0] * conv.weight.shape[-1]
    assert flops["recurrence"] == 6 * 32 * 128 * 128
    dense = layer_flops_true(arch, 1)
    projections = dense["proj_q"] + dense["proj_k"] + dense["proj_v"] + dense["proj_o"] + dense["mlp"]
    assert projections == _linear_flops(softmax)  # the gated q_proj's 2·H·hd outputs included
    assert probe_flops(arch, 0, 1)["proj_q"] == 2 * softmax.self_attn.q_proj.out_features * 4096
    for n in (1, 7, 100):  # linear in n
        assert linear_layer_flops_true(arch, n)["recurrence"] == n * flops["recurrence"]
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3VLForConditionalGeneration

    with torch.device("meta"):  # the real modules' shapes agree with the configs' numbers
        assert ArchSpec.from_model(Qwen3_5ForConditionalGeneration(config)) == arch
        vl_config, vl = load_arch("qwen3-vl-8b")
        assert ArchSpec.from_model(Qwen3VLForConditionalGeneration(vl_config)) == vl


@pytest.mark.spec("budget.kv.state-bytes", "hosts.linear.cache")
def test_state_bytes_are_the_real_caches():
    from rerouting.optimized import routed_prefill
    from rerouting.reference.tiny_qwen import TWO_SAMPLES, make_qwen_batch
    from rerouting.reference.tiny_qwen3 import PATCH_COLUMNS_16, tiny_qwen35

    model = tiny_qwen35(seed=0)
    batch = make_qwen_batch(TWO_SAMPLES, patch_columns=PATCH_COLUMNS_16)
    out = routed_prefill(model, RoutingConfig(Schedule((1, 3), (0.5, 0.25))), **batch)
    arch = ArchSpec.from_text_config(model.config.text_config)
    conv, state = out.cache.layer_state(0, 1)
    assert state.dtype == torch.float32
    assert conv.numel() * conv.element_size() + state.numel() * 4 == linear_state_bytes(arch, torch.float32)
    _, q = load_arch("qwen3.5-9b")
    assert linear_state_bytes(q, torch.bfloat16) == 8192 * 4 * 2 + 32 * 128 * 128 * 4 == 2_162_688
    assert kv_decode_growth(q, torch.bfloat16) == 8 * 2 * 4 * 256 * 2  # softmax layers only


@pytest.mark.spec("budget.flops.linear", "budget.avg-tokens", "hosts.linear.semantics")
def test_budgets_count_linear_layers_by_their_semantics():
    _, arch = load_arch("qwen3.5-9b")
    totals = {}
    for policy in ("reroute", "remove"):
        for semantics in ("dense", "bypass"):
            config = RoutingConfig(
                Schedule((3, 7, 15, 23), (0.25,) * 4), policy=policy, linear_attention=semantics
            )
            trace = schedule_trace(
                config, num_text=40, num_visual=576, num_layers=32, layer_kinds=arch.layer_kinds
            )
            budget = budget_from_trace(trace, arch, config=config, kv_dtype=torch.bfloat16)
            sample = budget.samples[0]
            linear = [layer for layer in sample.layers if arch.kind(layer.layer) == "linear"]
            assert all(layer.kv_entries == 0 and layer.kv_bytes == 2_162_688 for layer in linear)
            visual = [layer.visual for layer in sample.layers]
            dense = policy == "reroute" and semantics == "dense"
            assert visual[4] == (576 if dense else 144) and visual[3] == 144
            counts = nominal_visual_counts(config, 576, 32, arch.layer_kinds)
            assert sum(counts) / 32 == pytest.approx(sample.avg_visual_tokens_nominal)
            totals[policy, semantics] = sum(layer.flops_true_total for layer in sample.layers)
    assert totals["reroute", "dense"] > totals["reroute", "bypass"] == totals["remove", "dense"]
    assert totals["remove", "dense"] == totals["remove", "bypass"]


@pytest.mark.spec("schedule.presets", "hosts.linear.decisions", "hosts.deepstack")
def test_the_presets_each_qwen3_architecture_runs():
    """Qwen3.5-9B's softmax layers are 3, 7, ..., 31: LLaVA's (3, 7, 15, 23) and K = 3 fit, the release's
    Qwen2.5-VL (3, 6, 13, 20) does not; Qwen3-VL's 3 DeepStack levels refuse the schedules starting at 2."""
    vl, hybrid = presets_for(load_arch("qwen3-vl-8b")[1]), presets_for(load_arch("qwen3.5-9b")[1])
    assert "qwen25vl_ours_vs_fastv_avg192" in vl and "qwen25vl_pdrop_earlyL2_avg192" not in vl
    assert "fastv_K2_R50" not in vl and "pdrop_default" in vl
    assert set(hybrid) == {
        f"{prefix}_avg{tier}"
        for prefix in ("fastv_K3", "ours_vs_fastv", "qwen25vl_fastv_K3")
        for tier in (64, 128, 192)
    }
