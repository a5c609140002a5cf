"""GPU memory of a routed prefill, sampled through NVML: reroute costs remove plus its deferred state, no more.

Reroute must hold what remove may drop: the stale hidden states of the deferred tokens
(``routing.bypass``), and during a probe the normed states and keys of every token instead of text +
pool. Everything else (weights, activations of the active tokens, the KV cache, which is equal at equal
per-layer counts: ``budget.kv.bytes``) is the same. So, with non-increasing keeps (equal per-layer
counts under both policies):

    peak(reroute) <= peak(remove) + deferred_bytes + SLACK

``deferred_bytes = B · [ max_s (N - k_s) · d + max_s (T_b - M - |C_s|) · (d + H_kv·hd) ] · element size``
(``C_s`` remove's pool), and ``SLACK`` = 2 x 20 MiB: PyTorch's caching allocator serves requests between
1 and 10 MiB from 20 MiB segments (2 MiB ones below 1 MiB), so two runs that allocate the same live
bytes can differ in reserved (NVML-visible) memory by about a segment each way. A reroute that builds
the probe's full T x T matrix (``scoring.probe.query-row``: only the query rows are needed) or keeps a
second copy of the hidden states exceeds it by far at the size used here.
"""

from __future__ import annotations

import pytest
import torch

from rerouting.conformance.oracle import run_check
from rerouting.conformance.oracle.memory import NvmlSampler, nvml_unavailable_reason
from rerouting.conformance.oracle.strategies import Case, HostSpec, Layout
from rerouting.conformance.protocol import check
from rerouting.reference import RoutingConfig, Schedule

SLACK = 2 * 20 * 2**20
HOST = HostSpec(
    num_layers=4,
    hidden_size=2048,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=5632,
    grid=64,
)
LAYOUT = Layout(((24, 16),), "left", 0)  # 24 text tokens, 4096 visual tokens, 16 text tokens
SCHEDULE = Schedule((1, 2, 3), (0.5, 0.25, 0.125))


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with NvmlSampler(torch.cuda.current_device()) as sampler:
        fn()
    return sampler.result


def check_memory(impl, case):
    """peak(reroute) <= peak(remove) + deferred state + slack, on the device, sampled by NVML."""
    model, inputs = case.model(), case.inputs("cuda")
    run = {
        policy: (lambda p=policy: impl.prefill(model, case.config.with_policy(p), **inputs))
        for policy in ("remove", "reroute")
    }
    run["remove"]()  # warm-up: kernels, cuBLAS workspaces
    peaks = {policy: _peak(fn) for policy, fn in run.items()}
    out = impl.prefill(model, case.config.with_policy("remove"), **inputs)
    sample = out.trace.samples[0]
    M, N, T = sample.num_text, sample.num_visual, sample.seq_len
    deferred = max(N - d.k for d in sample.decisions) * HOST.hidden_size
    probe = max(T - M - len(d.pool) for d in sample.decisions) * (
        HOST.hidden_size + HOST.num_kv_heads * HOST.head_dim
    )
    allowed_extra = (deferred + probe) * case.torch_dtype.itemsize + SLACK
    rr, rm = peaks["reroute"], peaks["remove"]
    check(
        rr.delta <= rm.delta + allowed_extra,
        "routing.bypass",
        f"NVML peak above baseline: reroute {rr.delta / 2**20:.1f} MiB > remove {rm.delta / 2**20:.1f} MiB + deferred state "
        f"{(allowed_extra - SLACK) / 2**20:.1f} MiB + slack {SLACK / 2**20:.0f} MiB (sampled every {rr.interval_s * 1e3:.1f} ms; "
        f"torch max_memory_allocated: reroute {rr.torch_peak_allocated / 2**20:.1f} MiB, remove {rm.torch_peak_allocated / 2**20:.1f} MiB)",
        observed=rr.delta,
        allowed=rm.delta + allowed_extra,
    )


@pytest.mark.gpu
@pytest.mark.spec("routing.bypass", "budget.kv.bytes")
def test_reroute_memory(impl):
    reason = nvml_unavailable_reason()
    if reason is not None:
        pytest.skip(f"GPU memory check needs CUDA and an NVIDIA driver: {reason}")
    case = Case(HOST, LAYOUT, RoutingConfig(SCHEDULE, policy="reroute"), dtype="bfloat16", device="cuda")
    run_check(check_memory, impl, case)
