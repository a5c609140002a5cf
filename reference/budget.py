"""Budget accounting: visual-token counts, FLOPs, probe overhead and KV bytes (spec/budget.md).

Everything is computed from a ``Trace`` (what actually ran, [budget.active-counts]), never from the
configuration alone. A trace comes either from the reference router or, for real-size
architectures without weights, from :func:`schedule_trace`, which runs the same selection code
with placeholder scores.

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

Architectures are described by :class:`ArchSpec`; a few real ones ship as config JSON (no weights)
in ``reference/archs/`` and load with :func:`load_arch`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .schedule import RoutingConfig, RoutingError, Schedule
from .scoring import query_rows
from .selection import candidate_pool, capped_k, select_topk
from .trace import Decision, SampleTrace, Trace

ARCH_DIR = Path(__file__).resolve().parent / "archs"

# Text-decoder families whose layer shapes follow the config (model_type of the *text* config).
_LLAMA_FAMILY = ("llama", "mistral")
# Qwen2 attention: q/k/v projections carry a bias, o_proj does not; no MLP bias.
_QWEN2_FAMILY = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")

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


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """[budget.flops.true] The decoder shapes the FLOP and KV formulas need.

    Attributes:
        name: a label; not part of equality.
        num_layers: L, decoder layers.
        hidden_size: d.
        intermediate_size: m, the SwiGLU FFN width.
        num_heads: H, query heads.
        num_kv_heads: H_kv, key/value heads (GQA when < H).
        head_dim: hd.
        vocab_size: rows of the LM head.
        attention_bias: whether the q, k and v projections carry a bias.
        mlp_bias: whether gate, up and down projections carry a bias.
        o_proj_bias: whether the output projection carries a bias; ``None`` means "same as
            ``attention_bias``" (LLaMA's ``config.attention_bias`` covers all four projections;
            Qwen2 biases q/k/v but not o).
    """

    name: str = field(compare=False)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    attention_bias: bool
    mlp_bias: bool
    o_proj_bias: bool | None = None

    def __post_init__(self) -> None:
        if self.o_proj_bias is None:
            object.__setattr__(self, "o_proj_bias", bool(self.attention_bias))
        for attr in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RoutingError("budget.flops.true", f"ArchSpec.{attr}={value!r} is not an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            raise RoutingError(
                "budget.flops.true",
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
            )

    @classmethod
    def from_text_config(cls, cfg: Any, name: str | None = None) -> ArchSpec:
        """[budget.flops.true] The spec of a transformers text config (LLaMA/Mistral or Qwen2 family).

        A composite VLM config (with a ``text_config``) is accepted and its text part used.
        ``head_dim`` is ``cfg.head_dim`` when the config has one, else ``hidden_size // num_heads``.
        Biases: LLaMA family from ``cfg.attention_bias`` (q, k, v and o) and ``cfg.mlp_bias``;
        Qwen2 family q/k/v biased, o and MLP not (transformers ``Qwen2Attention``/``Qwen2_5_VLAttention``).
        """
        if getattr(cfg, "text_config", None) is not None:
            cfg = cfg.text_config
        model_type = getattr(cfg, "model_type", None)
        if model_type in _LLAMA_FAMILY:
            attention_bias = bool(getattr(cfg, "attention_bias", False))
            o_bias, mlp_bias = attention_bias, bool(getattr(cfg, "mlp_bias", False))
        elif model_type in _QWEN2_FAMILY:
            attention_bias, o_bias, mlp_bias = True, False, False
        else:
            raise RoutingError(
                "budget.flops.true",
                f"text config model_type {model_type!r} is not supported; supported: {', '.join(_LLAMA_FAMILY + _QWEN2_FAMILY)}",
            )
        heads = int(cfg.num_attention_heads)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            name=name or getattr(cfg, "name_or_path", "") or str(model_type),
            num_layers=int(cfg.num_hidden_layers),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg.vocab_size),
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            o_proj_bias=o_bias,
        )

    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None) -> ArchSpec:
        """[budget.flops.true] The spec read from a model's real module shapes (works on the meta device).

        Reads decoder layer 0 of ``model.model.language_model`` (LLaVA / Qwen2.5-VL in transformers 5):
        the in/out features and bias presence of ``self_attn.{q,k,v,o}_proj`` and
        ``mlp.{gate,up,down}_proj``, ``self_attn.head_dim``, the number of layers, and the LM head's
        output features (else the embedding rows) for the vocabulary. Every layer is assumed to have
        layer 0's shapes (true of LLaMA and Qwen2).
        """
        text = getattr(getattr(model, "model", None), "language_model", None)
        layers = getattr(text, "layers", None)
        if not layers:
            raise RoutingError(
                "budget.flops.true",
                f"model class {type(model).__name__} has no model.language_model.layers to read shapes from",
            )
        attn, mlp = layers[0].self_attn, layers[0].mlp
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        head_dim = int(attn.head_dim)
        hidden = q.in_features
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = head.out_features if isinstance(head, nn.Linear) else text.embed_tokens.num_embeddings
        shapes_ok = (
            k.in_features == v.in_features == hidden
            and k.out_features == v.out_features
            and o.in_features == q.out_features
            and o.out_features == hidden
            and mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features
            and mlp.down_proj.out_features == hidden
            and q.out_features % head_dim == 0
            and k.out_features % head_dim == 0
        )
        if not shapes_ok:
            raise RoutingError(
                "budget.flops.true", f"decoder layer 0 of {type(model).__name__} has inconsistent shapes"
            )
        biases = [m.bias is not None for m in (q, k, v)]
        if len(set(biases)) != 1:
            raise RoutingError("budget.flops.true", f"q/k/v projections disagree on bias presence: {biases}")
        mlp_biases = {m.bias is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)}
        if len(mlp_biases) != 1:
            raise RoutingError("budget.flops.true", "gate/up/down projections disagree on bias presence")
        return cls(
            name=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
            num_layers=len(layers),
            hidden_size=hidden,
            intermediate_size=mlp.gate_proj.out_features,
            num_heads=q.out_features // head_dim,
            num_kv_heads=k.out_features // head_dim,
            head_dim=head_dim,
            vocab_size=int(vocab),
            attention_bias=biases[0],
            mlp_bias=mlp_biases.pop(),
            o_proj_bias=o.bias is not None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def arch_names() -> tuple[str, ...]:
    """The embedded architectures (``reference/archs/*.json``), sorted."""
    return tuple(sorted(p.stem for p in ARCH_DIR.glob("*.json")))


def _config_class(model_type: str) -> type:
    import transformers

    classes = {"llava": transformers.LlavaConfig, "qwen2_5_vl": transformers.Qwen2_5_VLConfig}
    if model_type not in classes:
        raise RoutingError(
            "budget.flops.true", f"embedded config model_type {model_type!r} is not one of {sorted(classes)}"
        )
    return classes[model_type]


def load_arch(name: str) -> tuple[Any, ArchSpec]:
    """[budget.flops.true] An embedded architecture: ``(transformers config, ArchSpec)``.

    The JSON is a ``to_dict()`` of the real checkpoint's config (no weights); the config object is
    rebuilt with ``LlavaConfig(**d)`` or ``Qwen2_5_VLConfig(**d)`` per its ``model_type``, so
    ``LlavaForConditionalGeneration(config)`` on the meta device gives the real module shapes. The
    ``ArchSpec`` comes from the text config ([`ArchSpec.from_text_config`]).
    """
    names = arch_names()
    if name not in names:
        raise RoutingError(
            "budget.flops.true", f"unknown architecture {name!r}; valid architectures: {', '.join(names)}"
        )
    data = json.loads((ARCH_DIR / f"{name}.json").read_text())
    config = _config_class(data.get("model_type", ""))(**data)
    return config, ArchSpec.from_text_config(config.text_config, name=name)


# ---------------------------------------------------------------------------------------------
# Per-layer formulas (pure functions of the architecture and a token count)
# ---------------------------------------------------------------------------------------------


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
    return {
        "proj_q": 2 * n * d * q_out,
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
    return {
        "proj_k": 2 * keys * d * kv_out,
        "proj_q": 2 * queries * d * q_out,
        "scores": 2 * queries * keys * q_out,
        "bias": (queries * q_out + keys * kv_out) if arch.attention_bias else 0,
    }


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
    """
    return arch.num_layers * kv_entry_bytes(arch, dtype)


def avg_visual_tokens(counts: Sequence[float]) -> float:
    """[budget.avg-tokens] avg_T = (1/L) · Σ_l n_vis(l): visual tokens entering each layer, averaged over all L layers.

    Text tokens are excluded. Integer counts give the realized avg_T, real-valued N·r the nominal one.
    Source: PDrop Table 5, Nüwa App. B.2, the Reroute release's config comments (research/reroute.md §5.1).
    """
    if not counts:
        raise RoutingError("budget.avg-tokens", "avg_T needs at least one layer")
    return math.fsum(counts) / len(counts)


# ---------------------------------------------------------------------------------------------
# Traces without a model
# ---------------------------------------------------------------------------------------------


def _check_sizes(num_text: int, num_visual: int, num_layers: int) -> None:
    for what, value, low in (
        ("num_text", num_text, 0),
        ("num_visual", num_visual, 0),
        ("num_layers", num_layers, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RoutingError("budget.active-counts", f"{what}={value!r} is not an integer >= {low}")


def schedule_trace(
    config: RoutingConfig | None, *, num_text: int, num_visual: int, num_layers: int, visual_start: int = 0
) -> Trace:
    """[budget.active-counts] The one-sample trace a routed prefill produces, without a model.

    Runs the real selection code (``candidate_pool``, ``capped_k``, ``select_topk``,
    ``Schedule.keep_count``, ``Schedule.stage_of``) with placeholder scores ``N, N-1, ..., 1``
    (descending by visual index, so the lowest indices win; tokens outside a remove probe's key set
    score 0). Which tokens are selected depends on the scores; how MANY does not: k, the pool sizes,
    the per-layer active counts, the cache lengths and the probe sizes are the same for any scores,
    so budgets computed from this trace equal those of a real run with the same M and N.

    Layout: the N visual tokens sit at positions ``visual_start .. visual_start+N-1`` among
    ``num_text + num_visual`` valid tokens. Probe sizes follow the router: keys = M + N for
    reroute, M + |pool| for remove (equal at the first decision); query rows per
    ``config.scorer.query`` (1 for the default last-token row). The random scorer runs no probe:
    keys = queries = 0.

    ``num_visual = 0`` gives an unrouted trace ([layout.text-only]): no decision, every layer's
    active visual set empty. ``config=None`` gives the unrouted host forward over N visual tokens
    (every layer runs all of them, no decision; policy recorded as "none").
    """
    _check_sizes(num_text, num_visual, num_layers)
    if (
        isinstance(visual_start, bool)
        or not isinstance(visual_start, int)
        or not 0 <= visual_start <= num_text
    ):
        raise RoutingError("layout.visual-set", f"visual_start={visual_start!r} is outside 0..{num_text}")
    visual = tuple(range(visual_start, visual_start + num_visual))
    text = tuple(range(visual_start)) + tuple(range(visual_start + num_visual, num_text + num_visual))
    everything = tuple(range(num_visual))
    if config is None:
        sample = SampleTrace(num_text, visual, (), (everything,) * num_layers)
        return Trace(policy="none", num_layers=num_layers, samples=(sample,))

    schedule = config.schedule
    schedule.check_layers(num_layers)
    placeholder = torch.arange(num_visual, 0, -1, dtype=config.compute_dtype)
    decisions: list[Decision] = []
    active: list[tuple[int, ...]] = []
    selected: tuple[int, ...] | None = None
    for layer in range(num_layers):
        stage = schedule.stage_of(layer)
        if num_visual and stage is not None and schedule.layers[stage] == layer:
            pool = candidate_pool(config.policy, num_visual, selected)
            k = capped_k(schedule.keep_count(stage, num_visual), pool)
            scores = torch.zeros(num_visual, dtype=config.compute_dtype)
            scores[list(pool)] = placeholder[list(pool)]
            selected = select_topk(scores, pool, k)
            keys = num_text + (len(pool) if config.policy == "remove" else num_visual)
            queries = len(query_rows(text, visual, config.scorer.query))
            if config.scorer.kind == "random":  # no probe runs: [budget.flops.probe] costs zero
                keys = queries = 0
            decisions.append(Decision(layer, stage, pool, scores, k, selected, keys, queries))
        active.append(everything if selected is None else selected)
    sample = SampleTrace(num_text, visual, tuple(decisions), tuple(active))
    return Trace(policy=config.policy, num_layers=num_layers, samples=(sample,))


def nominal_visual_counts(
    config: RoutingConfig | None, num_visual: int, num_layers: int
) -> tuple[float, ...]:
    """[budget.avg-tokens] Real-valued visual counts per layer: N in the dense prefix, N·r in a stage.

    No floor and no max(1, ·) ([schedule.keep-ratio]); an absolute keep count is taken as is. For the
    remove policy the count is also capped by the previous stage's nominal count (the pool cap,
    [selection.pool-cap]). ``num_visual = 0`` (or ``config=None``, unrouted) gives N at every layer.
    """
    _check_sizes(0, num_visual, num_layers)
    if config is None or num_visual == 0:
        return (float(num_visual),) * num_layers
    schedule = config.schedule
    schedule.check_layers(num_layers)
    per_stage: list[float] = []
    for stage in range(schedule.num_decisions):
        schedule.keep_count(stage, num_visual)  # validates an absolute count against N
        value = schedule.nominal_keep(stage, num_visual)
        if config.policy == "remove" and per_stage:
            value = min(value, per_stage[-1])
        per_stage.append(value)
    counts = []
    for layer in range(num_layers):
        stage = schedule.stage_of(layer)
        counts.append(float(num_visual) if stage is None else per_stage[stage])
    return tuple(counts)


# ---------------------------------------------------------------------------------------------
# Budgets from a trace
# ---------------------------------------------------------------------------------------------


def _sum_components(parts: Sequence[Mapping[str, int]], names: Sequence[str]) -> dict[str, int]:
    return {name: sum(p[name] for p in parts) for name in names}


@dataclass(frozen=True)
class LayerBudget:
    """One decoder layer of one sample.

    Attributes:
        layer: layer index.
        visual: active visual tokens entering the layer ([budget.active-counts]).
        tokens: n_l = M + visual, every token the layer runs.
        flops_true: true FLOPs by component ([budget.flops.true]).
        macs_fastv: FastV convention over n_l ([budget.flops.fastv]).
        macs_pdrop: PDrop convention over ``visual`` ([budget.flops.pdrop]).
        flops_nuwa: Nüwa convention over ``visual`` ([budget.flops.nuwa]).
        kv_entries: cache entries after prefill, = tokens ([budget.kv.entries]).
        kv_bytes: their bytes ([budget.kv.bytes]).
    """

    layer: int
    visual: int
    tokens: int
    flops_true: dict[str, int]
    macs_fastv: int
    macs_pdrop: int
    flops_nuwa: int
    kv_entries: int
    kv_bytes: int

    @property
    def flops_true_total(self) -> int:
        return sum(self.flops_true.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_true_total": self.flops_true_total}


@dataclass(frozen=True)
class ProbeBudget:
    """[budget.flops.probe] One decision's probe: its sizes and FLOPs by component."""

    layer: int
    stage: int
    keys: int
    queries: int
    flops: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class SampleBudget:
    """The budget of one sample. Totals are properties over ``layers`` and ``probes``.

    Attributes:
        num_text: M.
        num_visual: N.
        routed: False for a trace without decisions.
        layers: one ``LayerBudget`` per decoder layer.
        probes: one ``ProbeBudget`` per decision.
        lm_head_flops: 2·(M+N)·d·vocab, apart from the decoder.
        avg_visual_tokens_nominal: nominal avg_T when the config was given, else None.
    """

    num_text: int
    num_visual: int
    routed: bool
    layers: tuple[LayerBudget, ...]
    probes: tuple[ProbeBudget, ...]
    lm_head_flops: int
    avg_visual_tokens_nominal: float | None = None

    @property
    def visual_counts(self) -> tuple[int, ...]:
        return tuple(layer.visual for layer in self.layers)

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(layer.tokens for layer in self.layers)

    @property
    def avg_visual_tokens(self) -> float:
        """[budget.avg-tokens] Realized avg_T (the trace's integer counts)."""
        return avg_visual_tokens(self.visual_counts)

    @property
    def flops_true_by_component(self) -> dict[str, int]:
        return _sum_components([layer.flops_true for layer in self.layers], TRUE_COMPONENTS)

    @property
    def flops_true(self) -> int:
        """[budget.flops.true] Decoder total (no probe, no LM head)."""
        return sum(layer.flops_true_total for layer in self.layers)

    @property
    def macs_fastv(self) -> int:
        return sum(layer.macs_fastv for layer in self.layers)

    @property
    def macs_pdrop(self) -> int:
        return sum(layer.macs_pdrop for layer in self.layers)

    @property
    def flops_nuwa(self) -> int:
        return sum(layer.flops_nuwa for layer in self.layers)

    @property
    def probe_flops(self) -> int:
        """[budget.flops.probe] All decisions' probes together."""
        return sum(p.total for p in self.probes)

    @property
    def kv_entries(self) -> int:
        return sum(layer.kv_entries for layer in self.layers)

    @property
    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "num_text": self.num_text,
            "num_visual": self.num_visual,
            "routed": self.routed,
            "visual_counts": list(self.visual_counts),
            "token_counts": list(self.token_counts),
            "avg_visual_tokens": self.avg_visual_tokens,
            "avg_visual_tokens_nominal": self.avg_visual_tokens_nominal,
            "flops_true": self.flops_true,
            "flops_true_by_component": self.flops_true_by_component,
            "macs_fastv": self.macs_fastv,
            "macs_pdrop": self.macs_pdrop,
            "flops_nuwa": self.flops_nuwa,
            "probe_flops": self.probe_flops,
            "lm_head_flops": self.lm_head_flops,
            "kv_entries": self.kv_entries,
            "kv_bytes": self.kv_bytes,
            "layers": [layer.to_dict() for layer in self.layers],
            "probes": [p.to_dict() for p in self.probes],
        }


@dataclass(frozen=True)
class BatchBudget:
    """The budget of a batch: one ``SampleBudget`` per sample, plus batch totals (sums over samples).

    Attributes:
        arch: the architecture the counts are for.
        policy: the trace's policy ("none" for an unrouted :func:`schedule_trace`).
        kv_dtype: the cache dtype the byte counts assume.
        kv_decode_growth: [budget.kv.decode-growth] bytes each generated token adds, per sample.
        samples: per-sample budgets, in batch order.
    """

    arch: ArchSpec
    policy: str
    kv_dtype: torch.dtype
    kv_decode_growth: int
    samples: tuple[SampleBudget, ...]

    def _total(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.samples)

    @property
    def flops_true(self) -> int:
        return self._total("flops_true")

    @property
    def macs_fastv(self) -> int:
        return self._total("macs_fastv")

    @property
    def macs_pdrop(self) -> int:
        return self._total("macs_pdrop")

    @property
    def flops_nuwa(self) -> int:
        return self._total("flops_nuwa")

    @property
    def probe_flops(self) -> int:
        return self._total("probe_flops")

    @property
    def lm_head_flops(self) -> int:
        return self._total("lm_head_flops")

    @property
    def kv_entries(self) -> int:
        return self._total("kv_entries")

    @property
    def kv_bytes(self) -> int:
        return self._total("kv_bytes")

    def to_dict(self) -> dict:
        """A JSON-ready view (ints stay exact)."""
        return {
            "arch": self.arch.to_dict(),
            "policy": self.policy,
            "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
            "kv_entry_bytes": kv_entry_bytes(self.arch, self.kv_dtype),
            "kv_decode_growth": self.kv_decode_growth,
            "totals": {
                "flops_true": self.flops_true,
                "macs_fastv": self.macs_fastv,
                "macs_pdrop": self.macs_pdrop,
                "flops_nuwa": self.flops_nuwa,
                "probe_flops": self.probe_flops,
                "lm_head_flops": self.lm_head_flops,
                "kv_entries": self.kv_entries,
                "kv_bytes": self.kv_bytes,
            },
            "samples": [s.to_dict() for s in self.samples],
        }


def budget_from_trace(
    trace: Trace,
    arch: ArchSpec,
    *,
    kv_dtype: torch.dtype = torch.float16,
    config: RoutingConfig | None = None,
) -> BatchBudget:
    """[budget.active-counts] Every budget of a batch, from what the trace says ran.

    Per sample and layer l: visual_l from ``active_visual`` and n_l = M + visual_l; the four FLOP
    conventions ([budget.flops.true] over n_l, [budget.flops.fastv] over n_l, [budget.flops.pdrop]
    and [budget.flops.nuwa] over visual_l); cache entries = the trace's ``kv_lengths``
    ([budget.kv.entries]) and their bytes ([budget.kv.bytes]). Per decision the probe
    ([budget.flops.probe]) from the recorded ``probe_keys``/``probe_queries``. The LM head over all
    M + N positions is reported apart. ``config`` (optional) adds the nominal avg_T
    ([budget.avg-tokens]; the realized one always comes from the trace) and, for the random
    scorer, sets every probe's cost to zero (no probe runs, whatever sizes the trace recorded).
    """
    if trace.num_layers != arch.num_layers:
        raise RoutingError(
            "budget.active-counts",
            f"trace has {trace.num_layers} layers but architecture {arch.name!r} has {arch.num_layers}",
        )
    no_probe = config is not None and config.scorer.kind == "random"
    samples = []
    for sample in trace.samples:
        if len(sample.active_visual) != trace.num_layers:
            raise RoutingError(
                "budget.active-counts",
                f"sample records {len(sample.active_visual)} layers, trace says {trace.num_layers}",
            )
        layers = []
        for index, (visual, entries) in enumerate(zip(sample.layer_visual_counts, sample.kv_lengths)):
            tokens = sample.num_text + visual
            layers.append(
                LayerBudget(
                    layer=index,
                    visual=visual,
                    tokens=tokens,
                    flops_true=layer_flops_true(arch, tokens),
                    macs_fastv=layer_flops_fastv(arch, tokens),
                    macs_pdrop=layer_flops_pdrop(arch, visual),
                    flops_nuwa=layer_flops_nuwa(arch, visual),
                    kv_entries=entries,
                    kv_bytes=kv_layer_bytes(arch, entries, kv_dtype),
                )
            )
        probes = tuple(
            ProbeBudget(
                d.layer,
                d.stage,
                d.probe_keys,
                d.probe_queries,
                probe_flops(arch, 0, 0) if no_probe else probe_flops(arch, d.probe_keys, d.probe_queries),
            )
            for d in sample.decisions
        )
        nominal = None
        if config is not None:
            nominal = avg_visual_tokens(nominal_visual_counts(config, sample.num_visual, trace.num_layers))
        samples.append(
            SampleBudget(
                num_text=sample.num_text,
                num_visual=sample.num_visual,
                routed=sample.routed,
                layers=tuple(layers),
                probes=probes,
                lm_head_flops=lm_head_flops(arch, sample.seq_len),
                avg_visual_tokens_nominal=nominal,
            )
        )
    return BatchBudget(
        arch=arch,
        policy=trace.policy,
        kv_dtype=kv_dtype,
        kv_decode_growth=kv_decode_growth(arch, kv_dtype),
        samples=tuple(samples),
    )


# ---------------------------------------------------------------------------------------------
# Matched budgets
# ---------------------------------------------------------------------------------------------


class MatchedBudget(NamedTuple):
    """A solved schedule: keep ratios (rounded), and the avg_T they give (integer k and real N·r)."""

    ratios: tuple[float, ...]
    realized_avg: float
    nominal_avg: float


def _stage_lengths(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    schedule = Schedule(tuple(layers), (1.0,) * len(layers))
    schedule.check_layers(num_layers)
    bounds = (*schedule.layers, num_layers)
    return tuple(b - a for a, b in pairwise(bounds))


def solve_scale(
    layers: Sequence[int],
    shape: Sequence[float] | str,
    target_avg: float,
    *,
    num_visual: int,
    num_layers: int,
) -> float:
    """[budget.avg-tokens] The unrounded scale whose NOMINAL avg_T equals ``target_avg``.

    With decision layers d_0 < ... and stage lengths K_s, nominal avg_T = (d_0·N + N·Σ_s K_s·c_s)/L.

    - ``shape`` a sequence: c_s = α·shape_s, linear in α, closed form
      α = (L·target − d_0·N) / (N·Σ_s K_s·shape_s) (release: α = (32·avg − 1152)/11088 for
      layers (2,7,15,23), shape (1,1,½,¼), N = 576).
    - ``shape="geometric"``: c_s = λ^(s+1) (PDrop's λ, λ², ...), λ by bisection on (0, 1].

    Errors (rule budget.avg-tokens) when the target is not above the dense prefix's share d_0·N/L,
    or needs a keep ratio above 1.
    """
    lengths = _stage_lengths(layers, num_layers)
    _check_sizes(0, num_visual, num_layers)
    if num_visual < 1:
        raise RoutingError("budget.avg-tokens", "a matched budget needs N >= 1 visual tokens")
    floor_avg = layers[0] * num_visual / num_layers
    if not floor_avg < target_avg <= num_visual:
        raise RoutingError(
            "budget.avg-tokens",
            f"target avg_T={target_avg} is outside ({floor_avg:g}, {num_visual}] for a dense prefix of {layers[0]} layers",
        )
    need = (num_layers * target_avg - layers[0] * num_visual) / num_visual  # = Σ_s K_s·c_s
    if isinstance(shape, str):
        if shape != "geometric":
            raise RoutingError(
                "budget.avg-tokens", f"shape {shape!r} is not a sequence of floats or 'geometric'"
            )
        if need > sum(lengths):
            raise RoutingError("budget.avg-tokens", f"target avg_T={target_avg} needs a keep ratio above 1")
        low, high = 0.0, 1.0
        for _ in range(200):
            mid = (low + high) / 2
            value = sum(k * mid ** (s + 1) for s, k in enumerate(lengths))
            low, high = (mid, high) if value < need else (low, mid)
        return (low + high) / 2
    shape = tuple(float(c) for c in shape)
    if len(shape) != len(lengths) or any(not c > 0 for c in shape):
        raise RoutingError(
            "budget.avg-tokens",
            f"shape {list(shape)} must hold one positive value per decision layer {list(layers)}",
        )
    alpha = need / math.fsum(k * c for k, c in zip(lengths, shape))
    if alpha * max(shape) > 1:
        raise RoutingError(
            "budget.avg-tokens", f"target avg_T={target_avg} needs keep ratio {alpha * max(shape):.4f} > 1"
        )
    return alpha


def solve_keep_ratios(
    layers: Sequence[int],
    shape: Sequence[float] | str,
    target_avg: float,
    *,
    num_visual: int,
    num_layers: int,
    decimals: int = 4,
    policy: str = "reroute",
) -> MatchedBudget:
    """[budget.avg-tokens] Keep ratios whose nominal avg_T matches ``target_avg``, rounded like the release.

    Solves the scale with :func:`solve_scale` (α for a linear ``shape``, λ for ``"geometric"``), then
    rounds each ratio c_s = α·shape_s (or λ^(s+1)) to ``decimals`` places (the release's configs use 4,
    except FastV's 64 tier, 0.01916). Returns the ratios, the realized avg_T (integer
    k = max(1, ⌊N·r⌋) through the real selection, :func:`schedule_trace`) and the nominal avg_T of the
    ROUNDED ratios (so it may differ from the target in the second decimal). A rising ``shape`` is an
    error under ``policy="remove"`` (the pool cap would bind).
    """
    if policy == "remove" and not isinstance(shape, str) and any(b > a for a, b in pairwise(shape)):
        raise RoutingError(
            "budget.avg-tokens",
            f"shape {list(shape)} rises: under remove the pool cap makes avg_T nonlinear in α (use reroute)",
        )
    scale = solve_scale(layers, shape, target_avg, num_visual=num_visual, num_layers=num_layers)
    if isinstance(shape, str):
        raw = [scale ** (s + 1) for s in range(len(layers))]
    else:
        raw = [scale * float(c) for c in shape]
    ratios = tuple(round(r, decimals) for r in raw)
    config = RoutingConfig(Schedule(tuple(layers), ratios), policy=policy)  # type: ignore[arg-type]
    trace = schedule_trace(config, num_text=1, num_visual=num_visual, num_layers=num_layers)
    realized = avg_visual_tokens(trace.samples[0].layer_visual_counts)
    nominal = avg_visual_tokens(nominal_visual_counts(config, num_visual, num_layers))
    return MatchedBudget(ratios, realized, nominal)
