"""The twig scorer of TTP, batched (spec/twig.md): the twig over the compact batch entering base layer K.

At K every token is still active, so the current compact batch is every valid token in original order. The
twig's layers run on it with the stage's own mask and rotary (their K/V go to the twig's cache group when
there is one); the scores are the query-row probe of the last twig layer (optimized/scoring.py), the same
computation as the reference's full-matrix probe up to rounding.

Notation: B batch, n compact length, D hidden, N visual tokens (padded), q query rows (padded).
"""

from __future__ import annotations

import torch

from rerouting.reference import RoutingError
from rerouting.reference.compat import call_layer
from rerouting.reference.scoring import query_rows

from .packing import inverse
from .scoring import probe_scores


def twig_scores(prefill) -> torch.Tensor:
    """[twig.ttp.score] Scores ``[B, N]``: the last twig layer's head-mean attention from the query row(s).

    ``prefill`` is the optimized prefill (optimized/routing.py ``_Prefill``) at its first decision, layer K.
    """
    twig, host, packing = prefill.twig, prefill.host, prefill.packing
    if packing is not prefill.dense:
        raise RoutingError(
            "twig.ttp.score",
            f"the twig scores at K={twig.first_layer}, before any decision; tokens were already cut",
        )
    x, cache = prefill.x, prefill.twig_cache
    K = twig.first_layer
    for i, layer in enumerate(twig.layers[:-1]):
        x = _twig_layer(prefill, layer, x, K + i)  # [B, n, D]
    samples, variant = prefill.samples, prefill.config.scorer.query
    queries = [query_rows(s.text, s.visual, variant) if s.routed else (0,) for s in samples]
    q = max(len(r) for r in queries)
    query_pos = torch.zeros(len(queries), q, dtype=torch.long)  # [B, q]
    query_valid = torch.zeros(len(queries), q, dtype=torch.bool)  # [B, q]
    for b, r in enumerate(queries):
        query_pos[b, : len(r)] = torch.tensor(r)
        query_valid[b, : len(r)] = True
    query_pos, query_valid = query_pos.to(prefill.device), query_valid.to(prefill.device)
    inv = inverse(packing.index, prefill.Tv + 1)  # [B, Tv + 1]: compact row of each position
    columns = inv.gather(1, prefill.visual_rows.clamp(min=0)).masked_fill(
        prefill.visual_rows < 0, -1
    )  # [B, N]
    rows = inv.gather(1, query_pos).masked_fill(~query_valid, 0)  # [B, q]
    last = twig.layers[-1]
    scores = probe_scores(
        host, last, x, packing.index, packing.lengths, rows, query_valid, columns, prefill.rotary
    )
    if cache is not None:  # the last twig layer's K/V too: SSD drafts from the whole twig
        _twig_layer(prefill, last, x, K + twig.num_layers - 1)
    return scores


def _twig_layer(prefill, layer, x: torch.Tensor, slot: int) -> torch.Tensor:
    """One twig layer on the dense compact batch, its K/V into the twig's cache slot ``slot`` (if any)."""
    cache = prefill.twig_cache
    if cache is not None:
        cache.record(slot, prefill.packing)
        for lower in range(slot):  # slots below K stay empty; their bookkeeping says "dense", never read
            if cache.entries[lower] is None:
                cache.record(lower, prefill.packing)
    return call_layer(
        layer,
        x,
        attention_mask=prefill.mask,
        position_ids=prefill.packing.index,
        position_embeddings=prefill.rotary,
        cache=cache,
        is_causal=prefill.mask is None,
    )
