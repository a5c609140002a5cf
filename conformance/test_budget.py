"""Conformance of spec/budget.md: budgets from what actually ran, checked against two FLOP counters and the real cache.

The analytic budget (``rerouting.reference.budget``) is computed from the implementation's trace.
"What actually ran" is measured three ways: the implementation's real KV tensors (entries and bytes),
FlopCounterMode around the live prefill, and fvcore on each recorded decoder-layer call replayed
alone (see :mod:`rerouting.conformance.oracle.flops`). All comparisons are exact, as integers. FLOP
counts are per sample, so the FLOP properties run batches of one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rerouting.conformance.oracle import check_structure, observe, run_check, run_decode
from rerouting.conformance.oracle.flops import (
    flop_counter,
    fvcore_count,
    fvcore_layer_call,
    record_layer_calls,
)
from rerouting.conformance.oracle.strategies import draw_case, layouts
from rerouting.conformance.protocol import check, fail
from rerouting.reference import preset
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace, schedule_trace
from rerouting.reference.flops import kv_decode_growth, layer_flops_true, probe_flops

BATCH_OF_ONE = layouts(max_batch=1)


def _arch(case) -> ArchSpec:
    return ArchSpec.from_model(case.model())


def _observed_entries(obs, b: int) -> list[int]:
    return [len(kv.positions) for kv in obs.out.kv[b]]


def _observed_bytes(kv_layers) -> list[int]:
    return [
        kv.keys.numel() * kv.keys.element_size() + kv.values.numel() * kv.values.element_size()
        for kv in kv_layers
    ]


def _budget(obs, arch):
    kv_dtype = obs.out.kv[0][0].keys.dtype
    return budget_from_trace(obs.out.trace, arch, kv_dtype=kv_dtype, config=obs.case.config)


def _decoder_flops(arch: ArchSpec, n: int) -> int:
    """The true count of one layer over n tokens without bias adds (what a counter of matmuls sees)."""
    parts = layer_flops_true(arch, n)
    return sum(parts.values()) - parts["bias"]


# ---------------------------------------------------------------------------------------------
# Token counts
# ---------------------------------------------------------------------------------------------


def check_active_counts(impl, case):
    """Per-layer visual counts of the budget are those that ran: the real cache's entries minus the text."""
    obs = observe(impl, case)
    check_structure(obs)
    budget = _budget(obs, _arch(case))
    for b, sample in enumerate(budget.samples):
        ran = [n - sample.num_text for n in _observed_entries(obs, b)]
        check(
            list(sample.visual_counts) == ran,
            "budget.active-counts",
            f"sample {b}: budget visual counts {list(sample.visual_counts)}, the cache shows {ran} ran",
            observed=str(ran),
            allowed=str(list(sample.visual_counts)),
        )


@pytest.mark.spec("budget.active-counts")
@given(data=st.data())
def test_active_counts(impl, data):
    run_check(check_active_counts, impl, draw_case(data))


def _nominal(case, n: int) -> list[float]:
    """Nominal visual count per layer, from the spec's words: N before d_0, N·r_s (or k_s) in stage s, remove capped."""
    schedule, L = case.config.schedule, case.host.num_layers
    per_stage: list[float] = []
    for value in schedule.keep:
        nominal = float(value) if schedule.unit == "count" else n * float(value)
        if case.config.policy == "remove" and per_stage:
            nominal = min(nominal, per_stage[-1])
        per_stage.append(nominal)
    out = []
    for layer in range(L):
        stage = max((s for s, d in enumerate(schedule.layers) if d <= layer), default=None)
        out.append(float(n) if stage is None or n == 0 else per_stage[stage])
    return out


def check_avg_tokens(impl, case):
    """avg_T over all L layers: realized from what ran, nominal from N·r; both per sample."""
    obs = observe(impl, case)
    check_structure(obs)
    budget = _budget(obs, _arch(case))
    L = case.host.num_layers
    for b, sample in enumerate(budget.samples):
        ran = [n - sample.num_text for n in _observed_entries(obs, b)]
        realized = math.fsum(ran) / L
        nominal = math.fsum(_nominal(case, sample.num_visual)) / L
        check(
            math.isclose(sample.avg_visual_tokens, realized, rel_tol=1e-12, abs_tol=1e-12),
            "budget.avg-tokens",
            f"sample {b}: realized avg_T {sample.avg_visual_tokens!r}, mean of the counts that ran {realized!r}",
        )
        check(
            sample.avg_visual_tokens_nominal is not None
            and math.isclose(sample.avg_visual_tokens_nominal, nominal, rel_tol=1e-12, abs_tol=1e-12),
            "budget.avg-tokens",
            f"sample {b}: nominal avg_T {sample.avg_visual_tokens_nominal!r}, spec {nominal!r}",
        )
    # The spec's worked example: fastv_K3_avg192 at N = 576 is 192.02 nominal and 191.75 realized.
    config = preset("fastv_K3_avg192")
    example = budget_from_trace(
        schedule_trace(config, num_text=20, num_visual=576, num_layers=32), _example_arch(), config=config
    ).samples[0]
    check(
        (round(example.avg_visual_tokens_nominal, 2), round(example.avg_visual_tokens, 2))
        == (192.02, 191.75),
        "budget.avg-tokens",
        f"fastv_K3_avg192 at N=576: nominal {example.avg_visual_tokens_nominal}, realized {example.avg_visual_tokens}",
    )


def _example_arch() -> ArchSpec:
    return ArchSpec("llava-1.5-7b", 32, 4096, 11008, 32, 32, 128, 32064, False, False)


@pytest.mark.spec("budget.avg-tokens")
@given(data=st.data())
def test_avg_tokens(impl, data):
    run_check(check_avg_tokens, impl, draw_case(data))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def measure(impl, case):
    """The implementation's prefill under FlopCounterMode, its decoder-layer calls recorded."""
    model = case.model()
    counter = flop_counter()
    with record_layer_calls(model, counter) as recording, counter, torch.no_grad():
        out = impl.prefill(model, case.config, **case.inputs(case.device))
    return observe(impl, case, out=out), recording


def check_flops_true(impl, case):
    """Per layer: FlopCounterMode (live) and fvcore (each recorded call replayed) == the analytic true count."""
    obs, recording = measure(impl, case)
    check_structure(obs)
    arch = _arch(case)
    budget = _budget(obs, arch).samples[0]
    live = recording.per_layer_live(case.host.num_layers)
    for layer, lb in enumerate(budget.layers):
        expected = lb.flops_true_total - lb.flops_true["bias"]
        calls = recording.calls_of(layer)
        check(
            calls,
            "budget.flops.true",
            f"layer {layer}: the implementation never called the host's decoder layer {layer}",
        )
        check(
            live[layer] == expected,
            "budget.flops.true",
            f"layer {layer} ({lb.tokens} tokens): FlopCounterMode counted {live[layer]} FLOPs in {len(calls)} call(s), "
            f"the true count is {expected}",
            observed=live[layer],
            allowed=expected,
        )
        counted = 0
        for call in calls:
            flops, unsupported = fvcore_layer_call(call)
            check(
                not unsupported,
                "budget.flops.true",
                f"layer {layer}: fvcore met ops with no handle {unsupported}: count them or declare them zero-cost",
            )
            counted += flops
        check(
            counted == expected,
            "budget.flops.true",
            f"layer {layer} ({lb.tokens} tokens): fvcore counted {counted} FLOPs (2 per multiply-add), the true count is {expected}",
            observed=counted,
            allowed=expected,
        )
    # The LM head over every valid position, reported apart.
    head = case.model().lm_head
    rows = torch.zeros(
        1,
        budget.num_text + budget.num_visual,
        head.in_features,
        dtype=head.weight.dtype,
        device=head.weight.device,
    )
    macs, unsupported = fvcore_count(head, (rows,))
    check(
        2 * macs == budget.lm_head_flops and not unsupported,
        "budget.flops.true",
        f"LM head: fvcore {2 * macs} FLOPs, budget {budget.lm_head_flops}",
        observed=2 * macs,
        allowed=budget.lm_head_flops,
    )


@pytest.mark.spec("budget.flops.true")
@given(data=st.data())
def test_flops_true(impl, data):
    run_check(check_flops_true, impl, draw_case(data, layout=BATCH_OF_ONE))


def _paper_check(impl, case, rule, attr, formula, over):
    obs = observe(impl, case)
    check_structure(obs)
    arch = _arch(case)
    d, m = arch.hidden_size, arch.intermediate_size
    budget = _budget(obs, arch)
    for b, sample in enumerate(budget.samples):
        for layer, (lb, entries) in enumerate(zip(sample.layers, _observed_entries(obs, b))):
            n = entries if over == "all" else entries - sample.num_text
            expected = formula(n, d, m)
            check(
                getattr(lb, attr) == expected,
                rule,
                f"sample {b}, layer {layer} (n={n}): budget {getattr(lb, attr)}, the paper's formula gives {expected}",
                observed=getattr(lb, attr),
                allowed=expected,
            )


def check_fastv(impl, case):
    """FastV: MACs over the whole sequence of each layer, 4nd² + 2n²d + 2ndm."""
    _paper_check(
        impl,
        case,
        "budget.flops.fastv",
        "macs_fastv",
        lambda n, d, m: 4 * n * d * d + 2 * n * n * d + 2 * n * d * m,
        "all",
    )


@pytest.mark.spec("budget.flops.fastv")
@given(data=st.data())
def test_fastv(impl, data):
    run_check(check_fastv, impl, draw_case(data))


def check_pdrop(impl, case):
    """PDrop: MACs over the visual tokens only, 4nd² + 2n²d + 3ndm."""
    _paper_check(
        impl,
        case,
        "budget.flops.pdrop",
        "macs_pdrop",
        lambda n, d, m: 4 * n * d * d + 2 * n * n * d + 3 * n * d * m,
        "visual",
    )


@pytest.mark.spec("budget.flops.pdrop")
@given(data=st.data())
def test_pdrop(impl, data):
    run_check(check_pdrop, impl, draw_case(data))


def check_nuwa(impl, case):
    """Nüwa: 2 FLOPs per MAC over the visual tokens only, 8nd² + 4n²d + 4ndm."""
    _paper_check(
        impl,
        case,
        "budget.flops.nuwa",
        "flops_nuwa",
        lambda n, d, m: 8 * n * d * d + 4 * n * n * d + 4 * n * d * m,
        "visual",
    )


@pytest.mark.spec("budget.flops.nuwa")
@given(data=st.data())
def test_nuwa(impl, data):
    run_check(check_nuwa, impl, draw_case(data))


class MinimalProbe(nn.Module):
    """The spec's probe and nothing more: k over the P probe keys, q over the Q query rows, scores per query head.

    Built from the decision layer's own norm and projections. RoPE, softmax and the head mean are
    zero-cost in every convention and left out.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        attn = layer.self_attn
        self.norm, self.q, self.k = layer.input_layernorm, attn.q_proj, attn.k_proj
        self.head_dim = attn.head_dim

    def forward(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        hd = self.head_dim
        k = self.k(self.norm(keys)).view(keys.shape[0], -1, hd).transpose(0, 1)  # [H_kv, P, hd]
        q = self.q(self.norm(queries)).view(queries.shape[0], -1, hd).transpose(0, 1)  # [H, Q, hd]
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # [H, P, hd]
        return torch.matmul(q, k.transpose(-1, -2))  # [H, Q, P]


def check_probe(impl, case):
    """Probe cost per decision, apart from the decoder: the spec's formula, and fvcore on the minimal probe."""
    obs = observe(impl, case)
    check_structure(obs)
    arch = _arch(case)
    budget = _budget(obs, arch)
    d, hd, H, Hkv = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    layers = case.model().model.language_model.layers
    for b, sample in enumerate(budget.samples):
        for probe in sample.probes:
            if case.config.scorer.kind == "random":
                check(
                    probe.total == 0,
                    "budget.flops.probe",
                    f"sample {b}: the random scorer runs no probe, budget {probe.total}",
                )
                continue
            P, Q = probe.keys, probe.queries
            bias = (P * Hkv * hd + Q * H * hd) if arch.attention_bias else 0  # Qwen's q/k bias adds
            expected = 2 * P * d * Hkv * hd + 2 * Q * d * H * hd + 2 * Q * P * H * hd + bias
            check(
                probe.total == expected,
                "budget.flops.probe",
                f"sample {b}, decision at layer {probe.layer}: budget {probe.total}, spec formula {expected} (P={P}, Q={Q}, bias adds {bias})",
                observed=probe.total,
                allowed=expected,
            )
            index = probe.layer - 1 if case.config.scorer.probe_layer == "previous" else probe.layer
            weight = layers[index].self_attn.q_proj.weight
            macs, unsupported = fvcore_count(
                MinimalProbe(layers[index]),
                (
                    torch.zeros(P, d, dtype=weight.dtype, device=weight.device),
                    torch.zeros(Q, d, dtype=weight.dtype, device=weight.device),
                ),
            )
            analytic = probe_flops(arch, P, Q)
            check(
                2 * macs == probe.total - analytic["bias"] and not unsupported,
                "budget.flops.probe",
                f"sample {b}, decision at layer {probe.layer}: fvcore counts the minimal probe at {2 * macs}, budget {probe.total}",
                observed=2 * macs,
                allowed=probe.total,
            )


@pytest.mark.spec("budget.flops.probe")
@given(data=st.data())
def test_probe(impl, data):
    run_check(check_probe, impl, draw_case(data))


def check_reroute_vs_remove(impl, case):
    """At identical per-layer counts, reroute and remove cost the same decoder FLOPs and KV bytes; only the probe differs."""
    runs = {}
    for policy in ("reroute", "remove"):
        obs, recording = measure(impl, case.with_config(policy=policy))
        check_structure(obs)
        runs[policy] = (obs, recording, _budget(obs, _arch(case)).samples[0])
    (rr, rec_rr, b_rr), (rm, rec_rm, b_rm) = runs["reroute"], runs["remove"]
    check(
        b_rr.visual_counts == b_rm.visual_counts,
        "budget.flops.true",
        f"non-increasing keeps must give equal per-layer counts: reroute {b_rr.visual_counts}, remove {b_rm.visual_counts}",
    )
    L = case.host.num_layers
    live_rr, live_rm = rec_rr.per_layer_live(L), rec_rm.per_layer_live(L)
    check(
        live_rr == live_rm,
        "budget.flops.true",
        f"decoder FLOPs per layer (FlopCounterMode) differ: reroute {live_rr}, remove {live_rm}",
    )
    bytes_rr, bytes_rm = sum(_observed_bytes(rr.out.kv[0])), sum(_observed_bytes(rm.out.kv[0]))
    check(
        bytes_rr == bytes_rm == b_rr.kv_bytes == b_rm.kv_bytes,
        "budget.kv.bytes",
        f"KV bytes: reroute {bytes_rr} (budget {b_rr.kv_bytes}), remove {bytes_rm} (budget {b_rm.kv_bytes})",
    )
    arch = _arch(case)
    d, hd, H, Hkv = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    extra = 0
    for p_rr, p_rm in zip(b_rr.probes, b_rm.probes):
        check(
            p_rr.queries == p_rm.queries,
            "budget.flops.probe",
            "the policies' probes use different query rows",
        )
        delta = p_rr.keys - p_rm.keys  # reroute probes every token, remove text + pool
        extra += 2 * delta * d * Hkv * hd + 2 * p_rr.queries * delta * H * hd
        extra += delta * Hkv * hd if arch.attention_bias else 0  # Qwen's k bias adds on the extra keys
    if case.config.scorer.kind == "random":
        extra = 0
    total_rr, total_rm = b_rr.flops_true + b_rr.probe_flops, b_rm.flops_true + b_rm.probe_flops
    check(
        b_rr.flops_true == b_rm.flops_true
        and total_rr - total_rm == b_rr.probe_flops - b_rm.probe_flops == extra,
        "budget.flops.probe",
        f"reroute - remove: decoder {b_rr.flops_true - b_rm.flops_true}, probes {b_rr.probe_flops - b_rm.probe_flops}, "
        f"expected decoder 0 and probes {extra} (the keys reroute adds: every deferred token)",
        observed=total_rr - total_rm,
        allowed=extra,
    )


@pytest.mark.spec("budget.flops.probe", "budget.flops.true", "budget.kv.bytes")
@given(data=st.data())
def test_reroute_vs_remove(impl, data):
    case = draw_case(data, layout=BATCH_OF_ONE, monotone=True, exact_decisions=None)
    run_check(check_reroute_vs_remove, impl, case)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


def check_kv_entries(impl, case):
    """Cache entries per layer = text + active visual = the trace's kv_lengths = what the real cache holds."""
    obs = observe(impl, case)
    check_structure(obs)
    budget = _budget(obs, _arch(case))
    for b, sample in enumerate(budget.samples):
        entries = [layer.kv_entries for layer in sample.layers]
        check(
            entries == _observed_entries(obs, b) == list(obs.out.trace.samples[b].kv_lengths),
            "budget.kv.entries",
            f"sample {b}: budget entries {entries}, real cache {_observed_entries(obs, b)}, "
            f"trace kv_lengths {list(obs.out.trace.samples[b].kv_lengths)}",
        )


@pytest.mark.spec("budget.kv.entries")
@given(data=st.data())
def test_kv_entries(impl, data):
    run_check(check_kv_entries, impl, draw_case(data))


def check_kv_bytes(impl, case):
    """Bytes per layer = entries x 2 x H_kv x hd x element size = numel x element_size of the real K and V."""
    obs = observe(impl, case)
    check_structure(obs)
    budget = _budget(obs, _arch(case))
    for b, sample in enumerate(budget.samples):
        real = _observed_bytes(obs.out.kv[b])
        analytic = [layer.kv_bytes for layer in sample.layers]
        if real != analytic:
            layer = next(i for i, (x, y) in enumerate(zip(real, analytic)) if x != y)
            fail(
                "budget.kv.bytes",
                f"sample {b}, layer {layer}: the real K+V tensors take {real[layer]} bytes, the budget says {analytic[layer]}",
                observed=real[layer],
                allowed=analytic[layer],
            )


@pytest.mark.spec("budget.kv.bytes")
@given(data=st.data())
def test_kv_bytes(impl, data):
    run_check(check_kv_bytes, impl, draw_case(data))


def check_decode_growth(impl, case, steps, token_seed):
    """Each decoded token adds 2·L·H_kv·hd·bytes to a sample's cache, whatever the routing."""
    run = run_decode(impl, case, steps, token_seed)
    kv = impl.decode_kv(run.outputs[-1])
    arch = _arch(case)
    for b in range(len(case.layout.samples)):
        before = sum(_observed_bytes(run.obs.out.kv[b]))
        after = sum(_observed_bytes(kv[b]))
        growth = steps * kv_decode_growth(arch, run.obs.out.kv[b][0].keys.dtype)
        check(
            after - before == growth,
            "budget.kv.decode-growth",
            f"sample {b}: the cache grew by {after - before} bytes over {steps} steps, expected {growth}",
            observed=after - before,
            allowed=growth,
        )


@pytest.mark.spec("budget.kv.decode-growth")
@given(data=st.data())
def test_decode_growth(impl, data):
    case = draw_case(data)
    steps = data.draw(st.integers(1, 3), label="steps")
    run_check(
        check_decode_growth,
        impl,
        case,
        steps=steps,
        token_seed=data.draw(st.integers(0, 2**16), label="token_seed"),
    )
