"""Scorers: the attention probe and the random baseline (spec/scoring.md).

A scorer is a ``ScoringMethod`` registered under its config kind (``Scorer.kind``) in ``SCORERS``: it reads
one ``DecisionContext`` and returns the scores ``[N]``. Selection never depends on which scorer ran.

The reference probe builds the full attention-probability matrix over the probe sequence and then
reads the query row(s); the optimized path computes only those rows. Both give the same scores.

Notation: n probe-sequence length, H query heads, H_kv key/value heads, hd head dim, N visual tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .host import Host, ImageSpan, causal_mask
from .schedule import RoutingError, Scorer


def probe_probabilities(
    host: Host, layer: nn.Module, states: torch.Tensor, positions: torch.Tensor, score_dtype: torch.dtype
) -> torch.Tensor:
    """[scoring.probe.projection] [scoring.probe.softmax] Attention probabilities ``[H, n, n]`` of ``layer``'s probe.

    Args:
        states: ``[n, D]`` the hidden states entering ``layer`` for the probe sequence
            ([scoring.probe.input]).
        positions: ``[n]`` their ORIGINAL position ids, ascending.
        score_dtype: float32, or float64 in a float64 reference.
    """
    attn = host.attention_parts(layer)
    n, head_dim = states.shape[0], attn.head_dim
    x = attn.input_norm(states[None])  # [1, n, D]
    q = attn.q_proj(x).view(1, n, -1, 2 * head_dim if attn.query_gate else head_dim)
    q = q[..., :head_dim]  # [1, n, H, hd]: [hosts.gated-query] the query half; the gate only scales outputs
    k = attn.k_proj(x).view(1, n, -1, head_dim)  # [1, n, H_kv, hd]
    if attn.q_norm is not None:  # [hosts.qk-norm]: per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1, H, n, hd], [1, H_kv, n, hd]
    cos, sin = host.rotary_embeddings(x, positions[None])
    q, k = rotary(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [1, H, n, hd]: each kv head serves its group
    logits = (q.to(score_dtype) @ k.to(score_dtype).transpose(-1, -2)) * attn.scaling  # [1, H, n, n]
    logits = logits + causal_mask(positions, positions, score_dtype)
    return torch.softmax(logits, dim=-1)[0]  # [H, n, n]


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[scoring.probe.projection] [hosts.partial-rotary] RoPE of ``q``/``k`` ``[1, heads, n, hd]`` by cos/sin ``[1, n, r]``.

    The first ``r`` dims are rotated (HF's ``apply_rotary_pos_emb``), the other ``hd - r`` pass unchanged;
    ``r = hd`` for every host but Qwen3.5 (``partial_rotary_factor``).
    """
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return apply_rotary_pos_emb(q, k, cos, sin)
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
    return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)


def query_rows(text: Sequence[int], visual: Sequence[int], variant: str) -> tuple[int, ...]:
    """[scoring.probe.query-row] [scoring.probe.variant-query] Positions of the query rows the scorer reads."""
    if not text:
        raise RoutingError(
            "scoring.probe.query-row", "the sample has no text token to use as the probe's query row"
        )
    if variant == "last":
        return (text[-1],)
    after = tuple(p for p in text if p > visual[-1])
    if not after:
        raise RoutingError(
            "scoring.probe.variant-query",
            f"query='text-after-image' but no text token follows the last visual position {visual[-1]}",
        )
    return after


def probe_size(policy: str, num_text: int, pool_size: int, length: int, num_queries: int) -> tuple[int, int]:
    """[scoring.probe.input] The probe's (keys, query rows) at one decision; ``(0, 0)`` when no probe runs.

    Keys: every valid token (``length``) under ``reroute``, text plus pool under ``remove`` (removed tokens no
    longer exist). ``num_queries == 0`` means the scorer runs no probe (the random baseline). The trace's
    ``probe_keys``/``probe_queries`` ([budget.flops.probe]); the reference, the optimized path and the
    conformance oracle all count with this function.
    """
    if not num_queries:
        return 0, 0
    return (num_text + pool_size if policy == "remove" else length), num_queries


def attention_scores(
    host: Host,
    layer: nn.Module,
    hidden: torch.Tensor,
    keys: Sequence[int],
    queries: Sequence[int],
    visual: Sequence[int],
    score_dtype: torch.dtype,
) -> torch.Tensor:
    """[scoring.probe.head-mean] Score ``[N]`` of every visual token: the head-mean probability at its column.

    Args:
        hidden: ``[T_b, D]`` the states entering ``layer`` (deferred rows stale).
        keys: positions of the probe sequence, ascending ([scoring.probe.input]).
        queries: positions of the query rows, each in ``keys``.
        visual: positions of V; a visual token outside ``keys`` scores 0.
    """
    key_pos = torch.tensor(keys)
    probs = probe_probabilities(host, layer, hidden[key_pos], key_pos, score_dtype)  # [H, n, n]
    column = {p: j for j, p in enumerate(keys)}
    rows = probs[:, [column[p] for p in queries], :]  # [H, q, n]
    per_key = rows.mean(dim=0).mean(dim=0)  # [n]: mean over heads, then over query rows
    scores = torch.zeros(len(visual), dtype=score_dtype)
    for i, p in enumerate(visual):
        if p in column:
            scores[i] = per_key[column[p]]
    return scores


def random_scores(generator: torch.Generator, num_visual: int) -> torch.Tensor:
    """[scoring.scorer.random] One draw of the seeded random baseline: ``[N]`` float32."""
    return torch.rand(num_visual, generator=generator, dtype=torch.float64).to(torch.float32)


@dataclass(frozen=True)
class DecisionContext:
    """[scoring.scorer] Everything a scorer may read at one decision of one sample.

    Attributes:
        layer: the decision layer ``d``.
        states: ``[T_b, D]`` the hidden states entering layer ``d`` (deferred rows stale).
        previous_states: ``[T_b, D]`` those entering layer ``d-1`` ([scoring.probe.variant-layer]).
        keys: positions of the probe sequence, ascending ([scoring.probe.input]).
        queries: positions of the query rows; empty for a scorer that runs no probe.
        visual: the sample's visual positions ``V``.
        generator: the sample's seeded CPU generator ([scoring.scorer.random]).
        score_dtype: float32, or float64 in a float64 reference ([scoring.probe.softmax]).
        scorer: the scorer's configuration.
        twig: the twig routed with, for ``kind="twig"`` ([twig.ttp.score]); None otherwise.
        stage: the decision's index ``s`` ([clse.stages]).
        reference_states: ``[T_b, D]`` the states entering the scorer's reference layer, for a scorer that
            has one (CLSE, [clse.reference-layer]); None otherwise.
        images: the sample's image spans with their grids ([layout.image-grid]).
    """

    host: Host
    layer: int
    states: torch.Tensor
    previous_states: torch.Tensor
    keys: tuple[int, ...]
    queries: tuple[int, ...]
    visual: tuple[int, ...]
    generator: torch.Generator
    score_dtype: torch.dtype
    scorer: Scorer
    twig: Any = None
    stage: int = 0
    reference_states: torch.Tensor | None = None
    images: tuple[ImageSpan, ...] = ()


class ScoringMethod(Protocol):
    """How a decision ranks the pool: ``[N]`` scores from a ``DecisionContext`` (float32 or the score dtype).

    ``probes`` says whether it runs the attention probe: then the context carries query rows and the
    decision records the probe's size ([budget.flops.probe]).
    """

    probes: bool

    def __call__(self, context: DecisionContext) -> torch.Tensor: ...


SCORERS: dict[str, ScoringMethod] = {}  # Scorer.kind -> the scorer


def runs_probe(method: ScoringMethod, scorer: Scorer) -> bool:
    """[scoring.scorer] [clse.variants] Whether the configured scorer runs the attention probe (query rows)."""
    return method.probes and not (scorer.clse is not None and scorer.clse.variant == "clse")


def reference_layer(scorer: Scorer) -> int | None:
    """[clse.reference-layer] The layer whose input a scorer reads besides the decision's, or None."""
    return None if scorer.clse is None else scorer.clse.reference_layer


def register_scorer(kind: str) -> Callable[[type], type]:
    """Class decorator: an instance of the class becomes the scorer of ``Scorer.kind == kind``."""

    def register(cls: type) -> type:
        SCORERS[kind] = cls()
        return cls

    return register


def scoring_method(kind: str) -> ScoringMethod:
    """[scoring.scorer] The registered scorer of ``kind``; an unknown kind is an error naming it."""
    if kind not in SCORERS:
        raise RoutingError(
            "scoring.scorer", f"scorer kind {kind!r} is not registered; registered: {', '.join(SCORERS)}"
        )
    return SCORERS[kind]


@register_scorer("attention")
class AttentionProbe:
    """[scoring.probe.head-mean] [scoring.probe.variant-layer] The attention probe of layer d (or d-1)."""

    probes = True

    def __call__(self, context: DecisionContext) -> torch.Tensor:
        host = context.host
        if context.scorer.probe_layer == "previous":
            layer, states = host.layers[context.layer - 1], context.previous_states
        else:
            layer, states = host.layers[context.layer], context.states
        return attention_scores(
            host, layer, states, context.keys, context.queries, context.visual, context.score_dtype
        )


@register_scorer("random")
class RandomBaseline:
    """[scoring.scorer.random] The seeded random baseline: one draw of the sample's generator, no probe."""

    probes = False

    def __call__(self, context: DecisionContext) -> torch.Tensor:
        return random_scores(context.generator, len(context.visual))
