"""Cache policies: what each layer's KV cache holds after prefill (spec/cache.md, "Cache policies").

``per-layer`` leaves ``cache.contents`` as it is; ``retroactive`` (CLSE's LLaVA code) cuts every layer's cache
to the text and the final selection. Plain per-sample code over the reference's ``SampleCache``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from transformers import DynamicCache

from .schedule import RoutingError


def retained(
    text: Sequence[int], visual: Sequence[int], final: Sequence[int] | None
) -> frozenset[int] | None:
    """[cache.policy.retroactive] The positions a retroactive cache keeps: text plus ``A_{S-1}``; None: no decision."""
    if final is None:
        return None
    return frozenset(text) | frozenset(visual[i] for i in final)


def retroactive_cut(cache: DynamicCache, positions: list[torch.Tensor], keep: Collection[int]):
    """[cache.policy.retroactive] Every layer's entries at positions in ``keep``, unchanged and in cache order.

    ``cache`` is a batch-1 ``DynamicCache``; ``positions[l]`` ``[n_l]`` the positions of layer l's entries.
    Returns the new cache and its per-layer positions.
    """
    cut, cut_positions = DynamicCache(), []
    for layer, where in enumerate(positions):
        rows = torch.tensor([j for j, p in enumerate(where.tolist()) if p in keep], dtype=torch.long)
        entry = cache.layers[layer]
        cut.update(entry.keys[:, :, rows], entry.values[:, :, rows], layer)  # [1, H_kv, n'_l, hd] each
        cut_positions.append(where[rows])
    return cut, cut_positions


def retroactive_lengths(num_text: int, active_visual: Sequence[Sequence[int]], final: Sequence[int] | None):
    """[cache.policy.retroactive] [budget.kv.entries] Entries per layer under ``retroactive``: M + |A_{S-1} ∩ active_l|."""
    if final is None:
        return tuple(num_text + len(active) for active in active_visual)
    kept = set(final)
    return tuple(num_text + len(kept.intersection(active)) for active in active_visual)


def generated_mask(
    positions: torch.Tensor, key_positions: torch.Tensor, generated_from: int, hidden: Collection[int], dtype
) -> torch.Tensor:
    """[cache.policy.retroactive] Additive ``[1, 1, q, k]``: generated queries (position >= generated_from) see no ``hidden`` key."""
    hide = torch.tensor([int(p) in hidden for p in key_positions.tolist()], dtype=torch.bool)  # [k]
    blocked = (positions[:, None] >= generated_from) & hide[None, :]  # [q, k]
    return torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def check_cache_policy(cache_policy: str, layer_kinds) -> None:
    """[cache.policy.retroactive] The retroactive cut is defined for KV caches: a host with linear layers refuses it."""
    if cache_policy == "retroactive" and "linear" in tuple(layer_kinds):
        raise RoutingError(
            "cache.policy.retroactive",
            "cache='retroactive' on a host with linear-attention layers (their state is not per token)",
        )


def check_recompute(generated_from: int | None, cache_policy: str, forced) -> None:
    """[cache.policy.retroactive] The recompute mode needs the retroactive policy and forced decisions."""
    if generated_from is None:
        return
    if cache_policy != "retroactive" or forced is None:
        raise RoutingError(
            "cache.policy.retroactive",
            f"generated_from={generated_from} recomputes decoding under the retroactive cache policy: it needs "
            f"cache='retroactive' (got {cache_policy!r}) and forced decisions",
        )
