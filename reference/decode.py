"""Reference decoding from a routed prefill's cache (spec/cache.md).

Decode is never routed: each new token runs every layer densely against that layer's own cache,
whose length differs per layer, at positions that continue from the prefill length.
"""

from __future__ import annotations

import copy

import torch

from .compat import call_layer, call_linear_layer
from .hooks import decoding_strategy
from .host import attention_implementation, bind_ids
from .routing import PrefillResult, Reference


def decode_step(reference: Reference, result: PrefillResult, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """[cache.decode.unrouted] [cache.decode.positions] Feed one token per sample; return logits ``[B, V]``.

    Appends one K/V entry per layer to each sample's cache in ``result`` (mutated in place).

    Args:
        tokens: ``[B]`` long, the next token of each sample.
        step: how many tokens were already decoded; sample b's token sits at position ``T_b + step``.
    """
    out = []
    with torch.no_grad(), attention_implementation(reference.model, reference.attention):
        for b, sample_cache in enumerate(result.caches):
            host = bind_ids(reference.host, sample_cache.rotary)  # [layout.rotary-ids]: ids T_b + δ_b + step
            h = host.embed_tokens(tokens[b].view(1, 1))  # [1, 1, D]
            position = host.decode_positions(torch.tensor([sample_cache.length]), step, 1)  # [1, 1]
            cos, sin = host.rotary_embeddings(h, position)
            for index, layer in enumerate(host.layers):
                if host.layer_kinds[index] == "linear":  # [hosts.linear.cache]: one recurrent step
                    h = call_linear_layer(layer, h, padding_mask=None, cache=sample_cache.cache)
                    continue
                n = sample_cache.cache.layers[index].keys.shape[-2]  # this layer's own length
                mask = torch.zeros(1, 1, 1, n + 1, dtype=h.dtype)  # the new token sees its whole layer cache
                h = call_layer(
                    layer,
                    h,
                    attention_mask=mask,
                    position_ids=position,
                    position_embeddings=(cos, sin),
                    cache=sample_cache.cache,
                )
            out.append(host.logits(h)[0, -1])
    return torch.stack(out)  # [B, V]


def greedy_generate(
    reference: Reference,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    image_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PrefillResult]:
    """[cache.decode.unrouted] [cache.decoding-strategy] Greedy decoding: a routed prefill, then unrouted steps.

    Returns ``[B, max_new_tokens]`` generated ids (no early stop at EOS) and the prefill result as it was
    before decoding (the caches used for decoding are copies). ``strategy`` names the decoding strategy
    (reference/hooks.py; only ``"greedy"`` exists).
    """
    generate = decoding_strategy(strategy)
    grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    result = reference.prefill(input_ids, attention_mask, pixel_values, **grid)
    working = copy.copy(result)
    working.caches = copy.deepcopy(result.caches)
    last = torch.tensor([int(c.length) - 1 for c in result.caches])
    valid_cols = [
        reference.host.layouts(input_ids, attention_mask, **grid)[b].valid for b in range(len(result.caches))
    ]
    logits = torch.stack(
        [result.logits[b, valid_cols[b][last[b]]] for b in range(len(result.caches))]
    )  # [B, V]
    tokens = generate(
        logits, lambda tokens, step: decode_step(reference, working, tokens, step), max_new_tokens
    )
    return tokens, result
