"""FLOP formulas and KV bytes, per layer, in four conventions (spec/budget.md).

Counts are exact Python integers. Four FLOP conventions are reported side by side, so any published
table can be reproduced (research/pruning-methods.md §1.6, §2.6, §3.6, §4):

========  =====================  ==============================  ==========================
rule      unit                   tokens counted                  per-layer formula
========  =====================  ==============================  ==========================
true      FLOPs (2 per MAC)      text + active visual (n)        GQA projections, full n×n
                                                                 attention, SwiGLU (3
                                                                 matrices), bias adds apart
fastv     MACs                   text + active visual (n)        4nd² + 2n²d + 2ndm
pdrop     MACs                   active visual only              4nd² + 2n²d + 3ndm
nuwa      2·MAC                  active visual only              8nd² + 4n²d + 4ndm
========  =====================  ==============================  ==========================

(d hidden size, m FFN intermediate size.) The routing probe is counted apart from the decoder
([budget.flops.probe]) and so is the LM head. Elementwise work (norms, RoPE, softmax, SiLU, residual
adds) is not counted in any convention.

The formulas are pure functions of an :class:`~rerouting.reference.archs.ArchSpec` and a token
count; :mod:`rerouting.reference.budget` applies them to what a trace says ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .archs import ArchSpec
from .schedule import RoutingError

TRUE_COMPONENTS: tuple[str, ...] = (
    "proj_q",
    "proj_k",
    "proj_v",
    "proj_o",
    "attn_scores",
    "attn_values",
    "mlp",
    "bias",
)
PROBE_COMPONENTS: tuple[str, ...] = ("proj_k", "proj_q", "scores", "bias")


def _count(n: int, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RoutingError("budget.flops.true", f"{what}={n!r} is not an integer >= 0")
    return n


def layer_flops_true(arch: ArchSpec, n: int) -> dict[str, int]:
    """[budget.flops.true] True FLOPs of one decoder layer over n tokens (text + active visual), by component.

    2 FLOPs per multiply-add, d = hidden, m = intermediate, H/H_kv query/KV heads, hd head dim:

    - ``proj_q`` 2·n·d·H·hd; ``proj_k`` and ``proj_v`` 2·n·d·H_kv·hd each (GQA sizes);
      ``proj_o`` 2·n·H·hd·d;
    - ``attn_scores`` 2·n·n·H·hd and ``attn_values`` 2·n·n·H·hd: the full n×n per query head, not
      halved for causality (what dense kernels execute; torch's SDPA FLOP formula does the same);
    - ``mlp`` 3·2·n·d·m (SwiGLU gate, up, down);
    - ``bias`` the bias adds, n·out per biased linear (q/k/v, o and gate/up/down as the arch has them).

    Not counted: norms, RoPE, softmax, SiLU·gate product, residual adds. Source: spec/budget.md;
    research/ecosystem.md §1.3 (matches torch's FlopCounterMode on a meta LLaVA-1.5-7B).
    """
    n = _count(n)
    d, m, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.num_heads * hd, arch.num_kv_heads * hd
    bias = 0
    if arch.attention_bias:
        bias += n * (q_out + 2 * kv_out)
    if arch.o_proj_bias:
        bias += n * d
    if arch.mlp_bias:
        bias += n * (2 * m + d)
    q_proj_out = 2 * q_out if arch.query_gate else q_out  # [hosts.gated-query]: query and gate (Qwen3.5)
    return {
        "proj_q": 2 * n * d * q_proj_out,
        "proj_k": 2 * n * d * kv_out,
        "proj_v": 2 * n * d * kv_out,
        "proj_o": 2 * n * q_out * d,
        "attn_scores": 2 * n * n * q_out,
        "attn_values": 2 * n * n * q_out,
        "mlp": 3 * 2 * n * d * m,
        "bias": bias,
    }


def layer_flops_fastv(arch: ArchSpec, n: int) -> int:
    """[budget.flops.fastv] FastV's per-layer cost (paper Eq. 5): 4nd² + 2n²d + 2ndm multiply-accumulates.

    n is the whole sequence of the layer (text + active visual); d = hidden, m = intermediate; 2 FFN
    matrices; MHA-sized projections whatever the arch's GQA. Source: FastV §4.2 Eq. 5
    (research/pruning-methods.md §1.6). FastV's Table 1 "FLOPs(B)" is this total divided by L.
    """
    n = _count(n)
    d, m = arch.hidden_size, arch.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def layer_flops_pdrop(arch: ArchSpec, n_visual: int) -> int:
    """[budget.flops.pdrop] PDrop's per-layer cost (paper §4.1, Eq. 5): 4nd² + 2n²d + 3ndm multiply-accumulates.

    n = the layer's active VISUAL tokens only (text ignored); 3 FFN matrices; MHA-sized projections.
    Source: PyramidDrop §4.1 (research/pruning-methods.md §2.6: reproduces 3.82 / 1.78 TFLOPs).
    """
    n = _count(n_visual, "n_visual")
    d, m = arch.hidden_size, arch.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def layer_flops_nuwa(arch: ArchSpec, n_visual: int) -> int:
    """[budget.flops.nuwa] Nüwa's per-layer cost (paper App. C): 8nd² + 4n²d + 4ndm FLOPs (2 per MAC).

    n = the layer's active VISUAL tokens only; 2 FFN matrices; MHA-sized projections. The paper says
    "one FLOP = one MAC" but its coefficients are 2·MAC. Source: Nüwa App. C, Eq. 14
    (research/pruning-methods.md §3.6: reproduces 0.6476 T for Nüwa-64).
    """
    n = _count(n_visual, "n_visual")
    d, m = arch.hidden_size, arch.intermediate_size
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * m


def probe_flops(arch: ArchSpec, keys: int, queries: int) -> dict[str, int]:
    """[budget.flops.probe] FLOPs of one attention probe, reported apart from the decoder, by component.

    - ``proj_k`` 2·keys·d·H_kv·hd: the k projection over every probe key;
    - ``proj_q`` 2·queries·d·H·hd: the q projection over the query rows only;
    - ``scores`` 2·queries·keys·H·hd: q·kᵀ per query head;
    - ``bias`` the q/k bias adds (queries·H·hd + keys·H_kv·hd) when the arch biases them.

    keys = the probe sequence: every valid token for reroute, text + pool for remove
    ([scoring.probe.input]); the trace's ``probe_keys``. Not counted: the input norm, RoPE, softmax,
    the head mean. Source: spec/budget.md; research/reroute.md §5.4.
    """
    keys, queries = _count(keys, "keys"), _count(queries, "queries")
    d, hd = arch.hidden_size, arch.head_dim
    q_out, kv_out = arch.num_heads * hd, arch.num_kv_heads * hd
    q_proj_out = 2 * q_out if arch.query_gate else q_out  # the probe runs the layer's whole q_proj
    return {
        "proj_k": 2 * keys * d * kv_out,
        "proj_q": 2 * queries * d * q_proj_out,
        "scores": 2 * queries * keys * q_out,
        "bias": (queries * q_out + keys * kv_out) if arch.attention_bias else 0,
    }


def spectral_flops(arch: ArchSpec, image_sizes: Sequence[int]) -> int:
    """[clse.flops] FLOPs of CLSE's spectral term at one decision: ``C·(20·n·log2 n + 10·n)`` per image of n tokens.

    Two states (reference and decision), each a forward and an inverse 2-D FFT (``5·n·log2 n`` each), a
    real-by-complex mask (``2n``) and a magnitude (``3n``), per channel; rounded to an integer.
    """
    total = 0.0
    for n in image_sizes:
        n = _count(n)
        total += arch.hidden_size * (20 * n * math.log2(n) + 10 * n) if n else 0.0
    return round(total)


def lm_head_flops(arch: ArchSpec, n: int) -> int:
    """[budget.flops.true] LM head FLOPs, 2·n·d·vocab over all n valid positions ([routing.output]); not in the decoder total."""
    return 2 * _count(n) * arch.hidden_size * arch.vocab_size


def kv_entry_bytes(arch: ArchSpec, dtype: torch.dtype = torch.float16) -> int:
    """[budget.kv.bytes] Bytes of one cache entry (one token at one layer): 2 (K and V) · H_kv · hd · bytes/element.

    LLaVA-1.5-7B in fp16: 2·32·128·2 = 16 KiB. Source: research/pruning-methods.md §1.7 (derived;
    the release's measure_metrics.py sums K+V tensor bytes the same way).
    """
    return 2 * arch.num_kv_heads * arch.head_dim * dtype.itemsize


def kv_layer_bytes(arch: ArchSpec, entries: int, dtype: torch.dtype = torch.float16) -> int:
    """[budget.kv.bytes] Bytes of one layer's cache: entries · 2 · H_kv · hd · bytes/element."""
    return _count(entries, "entries") * kv_entry_bytes(arch, dtype)


def kv_decode_growth(arch: ArchSpec, dtype: torch.dtype = torch.float16) -> int:
    """[budget.kv.decode-growth] Cache bytes each generated token adds: 2 · L · H_kv · hd · bytes/element.

    Decode is never routed ([cache.decode.unrouted]): one entry per layer. LLaVA-1.5-7B fp16: 512 KiB.
    On a hybrid decoder only the softmax layers grow ([budget.kv.state-bytes]).
    """
    softmax = sum(arch.kind(layer) == "softmax" for layer in range(arch.num_layers))
    return softmax * kv_entry_bytes(arch, dtype)


def avg_visual_tokens(counts: Sequence[float]) -> float:
    """[budget.avg-tokens] avg_T = (1/L) · Σ_l n_vis(l): visual tokens entering each layer, averaged over all L layers.

    Text tokens are excluded. Integer counts give the realized avg_T, real-valued N·r the nominal one.
    Source: PDrop Table 5, Nüwa App. B.2, the Reroute release's config comments (research/reroute.md §5.1).
    """
    if not counts:
        raise RoutingError("budget.avg-tokens", "avg_T needs at least one layer")
    return math.fsum(counts) / len(counts)
