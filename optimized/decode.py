"""Decoding from a routed prefill's cache, batched (spec/cache.md).

Decode is never routed: each new token runs every layer densely against that layer's own cache, whose
length differs per layer and per sample; the per-layer masks hide each sample's padded entries, and positions
continue from each sample's T_b.

Notation used for tensor shapes: B batch, q new tokens per step, D hidden, V vocabulary, T padded prompt length.
"""

from __future__ import annotations

import torch
from torch import nn

from rerouting.reference import Host, RoutingConfig, host_for
from rerouting.reference.compat import call_layer, call_linear_layer
from rerouting.reference.hooks import decoding_strategy
from rerouting.reference.host import bind_ids

from .cache import RoutedCache
from .routing import PrefillResult, check_attention_implementation, check_host, routed_prefill


def decode_step(model: nn.Module, cache: RoutedCache, tokens: torch.Tensor) -> torch.Tensor:
    """[cache.decode.unrouted] [cache.decode.positions] Feed ``tokens`` (``[B, q]``); return logits ``[B, q, V]``.

    Appends q entries to every layer of ``cache`` (in place). The new tokens attend to their layer's valid
    cache entries, to every earlier decoded token and causally to each other.
    """
    host = host_for(model)
    implementation = check_attention_implementation(host)
    with torch.no_grad():
        return _decode(host, implementation, cache, tokens)


def _decode(host: Host, implementation: str, cache: RoutedCache, tokens: torch.Tensor) -> torch.Tensor:
    host = bind_ids(host, cache.rotary)  # [cache.decode.positions]: an mRoPE host's ids are T_b + δ_b + step
    h = host.embed_tokens(tokens)  # [B, q, D]
    positions = host.decode_positions(cache.prefill_lengths, cache.steps, tokens.shape[1])  # [B, q]
    rotary = host.rotary_embeddings(h, positions)  # cos, sin: [B, q, hd]
    for index, layer in enumerate(host.layers):
        if host.layer_kinds[index] == "linear":  # [hosts.linear.cache]: a step of the sample's own recurrence
            h = call_linear_layer(layer, h, padding_mask=None, cache=cache)
            continue
        h = call_layer(
            layer,
            h,
            attention_mask=cache.decode_mask(index, tokens.shape[1], implementation, h.dtype),
            position_ids=positions,
            position_embeddings=rotary,
            cache=cache,
        )  # [B, q, D]
    cache.advance(tokens.shape[1])
    return host.logits(h)  # [B, q, V]


def last_valid_logits(host: Host, result: PrefillResult, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[routing.output] Logits ``[B, 1, V]`` at each sample's last valid prompt token (any padding side)."""
    B, T = result.hidden.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=result.hidden.device)
    columns = torch.arange(T, device=attention_mask.device).expand(B, T)
    last = columns.masked_fill(attention_mask == 0, -1).amax(dim=1)  # [B]
    hidden = result.hidden.gather(1, last[:, None, None].expand(B, 1, result.hidden.shape[-1]))  # [B, 1, D]
    return host.logits(hidden)


def greedy_generate(
    model: nn.Module,
    config: RoutingConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    image_grid_thw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PrefillResult]:
    """[cache.decode.unrouted] [cache.decoding-strategy] Greedy decoding: a routed prefill, then unrouted steps.

    Returns ``[B, max_new_tokens]`` generated ids (no early stop at EOS) and the prefill result, whose cache
    has been advanced by the decoded tokens (all but the last, which is never fed back). ``strategy`` names the
    decoding strategy (reference/hooks.py; only ``"greedy"`` exists).
    """
    generate = decoding_strategy(strategy)
    host, implementation = check_host(model, config)
    result = routed_prefill(
        model,
        config,
        input_ids,
        attention_mask,
        pixel_values,
        logits_to_keep=1,
        image_grid_thw=image_grid_thw,
    )

    def step(tokens: torch.Tensor, j: int) -> torch.Tensor:
        return _decode(host, implementation, result.cache, tokens[:, None])[:, -1]  # [B, V]

    with torch.no_grad():
        logits = last_valid_logits(host, result, attention_mask)  # [B, 1, V]
        tokens = generate(logits[:, -1], step, max_new_tokens)
    return tokens, result
