"""The query-row attention probe, batched (spec/scoring.md).

Only the query row(s) the scorer reads are computed against every key of the probe sequence: memory
``O(B·H·q·n + B·n·D)``, never an ``n x n`` matrix. Same scores as the reference's full-matrix probe
(reference/scoring.py), up to rounding.

Notation used for tensor shapes:
    B batch, n probe-sequence length (padded), q query rows (padded), H query heads, H_kv key/value heads,
    g = H / H_kv, hd head dim, D hidden, N visual tokens (padded).
"""

from __future__ import annotations

import torch
from torch import nn

from rerouting.reference import Host

from .packing import gather_rows


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[scoring.probe.projection] RoPE of token-major ``x`` ``[B, m, heads, hd]``, cos/sin ``[B, m, hd]``.

    HF's ``x * cos + rotate_half(x) * sin`` written per half, ``[x1 c1 - x2 s1, x2 c2 + x1 s2]``, into one
    output: no ``cat``, no broadcast temporaries (about 9x faster on CPU than the textbook form).
    """
    r = cos.shape[-1]  # [hosts.partial-rotary]: the first r dims rotate, the rest pass unchanged
    h = r // 2
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, m, 1, r]: the same for every head
    x1, x2 = x[..., :h], x[..., h:r]  # [B, m, heads, r / 2] each
    out = torch.empty_like(x)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    torch.mul(x1, cos[..., :h], out=out[..., :h]).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=out[..., h:r]).addcmul_(x1, sin[..., h:])
    return out


def probe_scores(
    host: Host,
    layer: nn.Module,
    states: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    queries: torch.Tensor,
    query_valid: torch.Tensor,
    visual_columns: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """[scoring.probe.query-row] [scoring.probe.softmax] [scoring.probe.head-mean] Probe scores ``[B, N]``.

    In the score dtype ([scoring.probe.dtype]): float32, float64 when the states are float64.

    Args:
        states: ``[B, n, D]`` the hidden states entering ``layer`` for the probe sequence, rows in ascending
            position, right-padded ([scoring.probe.input]).
        positions: ``[B, n]`` long, their ORIGINAL position ids ([scoring.probe.projection]).
        lengths: ``[B]`` long, valid rows per sample; later rows are never keys.
        queries: ``[B, q]`` long, rows of ``states`` used as query rows (padding entries: any valid row).
        query_valid: ``[B, q]`` bool, which entries of ``queries`` are real.
        visual_columns: ``[B, N]`` long, the row of each visual token in the probe sequence, -1 when the token
            is not a key (it scores 0) or is padding.
        rotary: cos, sin ``[B, n, hd]`` at ``positions`` when the caller has them already.
    """
    attn = host.attention_parts(layer)
    B, n, _ = states.shape
    q_rows, hd = queries.shape[1], attn.head_dim
    x = attn.input_norm(states)  # [B, n, D]
    cos, sin = rotary if rotary is not None else host.rotary_embeddings(x, positions)  # [B, n, hd] each
    k = attn.k_proj(x).view(B, n, -1, hd)  # [B, n, H_kv, hd]
    q = attn.q_proj(gather_rows(x, queries)).view(B, q_rows, -1, 2 * hd if attn.query_gate else hd)
    q = q[..., :hd]  # [B, q, H, hd]: [hosts.gated-query] the query half
    if attn.q_norm is not None:  # [hosts.qk-norm]: per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    k = rope(k, cos, sin)  # [B, n, H_kv, hd]
    q = rope(q, gather_rows(cos, queries), gather_rows(sin, queries))
    H, H_kv = q.shape[2], k.shape[2]
    score_dtype = torch.float64 if states.dtype == torch.float64 else torch.float32  # [scoring.probe.dtype]
    # Each key/value head serves its group of g query heads (query head h -> kv head h // g), as repeat_kv.
    q = q.to(score_dtype).permute(0, 2, 1, 3).reshape(B, H_kv, H // H_kv, q_rows, hd)  # [B, H_kv, g, q, hd]
    keys = k.to(score_dtype).permute(0, 2, 3, 1)[:, :, None]  # [B, H_kv, 1, hd, n]
    logits = (q @ keys) * attn.scaling  # [B, H_kv, g, q, n]
    logits = logits.view(B, H, q_rows, n)  # [B, H, q, n]
    q_positions = positions.gather(1, queries)  # [B, q]
    key_valid = torch.arange(n, device=states.device)[None, :] < lengths[:, None]  # [B, n]
    visible = (positions[:, None, :] <= q_positions[:, :, None]) & key_valid[:, None, :]  # [B, q, n]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))  # mask: [B, 1, q, n] over heads
    per_row = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, q, n]: mean over query heads
    weights = query_valid.to(per_row.dtype)  # [B, q]
    per_key = (per_row * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)  # [B, n]
    scores = per_key.gather(1, visual_columns.clamp(min=0))  # [B, N]
    return scores.masked_fill(visual_columns < 0, 0.0)
