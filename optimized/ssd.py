"""Self-speculative decoding with a twig, batched (spec/twig.md, [twig.ssd.batch]).

The ``ssd`` strategy (reference/ssd.py) keeps the bookkeeping: per-sample draft limits, stops, acceptance.
``BatchedSpeculation`` is its arithmetic over the whole batch in one pass per token or per verify: every sample
is fed as many tokens as the round's longest draft, into two ``RoutedCache`` groups (the base's, layer l with
its own prefill entries per sample, and the twig's, slots K..K+T-1 over the full prompt). All groups get the
same decoded columns; a per-sample validity mask over those columns does each sample's rollback (a column a
sample did not keep is invisible to it for good), and trailing columns no sample kept are cut off.

Notation: B batch, S decoded columns kept so far, q columns fed this round, n_l a layer's padded prefill
entries, C = n_l + S + (columns of the round so far), D hidden, V vocabulary, W the twig's vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from rerouting.reference import RoutingConfig, RoutingError, host_for
from rerouting.reference.compat import call_layer
from rerouting.reference.hooks import decoding_strategy
from rerouting.reference.host import bind_ids
from rerouting.reference.ssd import SpeculationOptions, SpeculationStats, draft_stops

from .cache import RoutedCache
from .decode import last_valid_logits
from .routing import PrefillResult, check_attention_implementation, routed_prefill


class BatchedSpeculation:
    """[twig.ssd.draft] [twig.ssd.verify] [twig.ssd.rollback] [twig.ssd.batch] SSD's arithmetic over a batch."""

    def __init__(self, model: nn.Module, twig, result: PrefillResult, options: SpeculationOptions):
        if result.cache is None or result.twig_cache is None:
            raise RoutingError(
                "twig.ssd.rollback", "SSD needs the prefill's base and twig caches (use_cache=True)"
            )
        self.host = host_for(model)
        self.implementation = check_attention_implementation(self.host)
        self.twig, self.options = twig, options
        self.base, self.twig_cache = result.cache, result.twig_cache
        self.host = bind_ids(self.host, self.base.rotary)
        B, device = self.base.prefill_lengths.shape[0], self.base.prefill_lengths.device
        self.valid = torch.zeros(
            B, 0, dtype=torch.bool, device=device
        )  # [B, S]: decoded columns each sample kept
        self.states: list[torch.Tensor] = []  # the round's layer-K states, one [B, 1, D] per fed column
        self.stats: SpeculationStats | None = None

    # --- masks and positions ---------------------------------------------------------------------
    def _positions(self, offset: int, q: int) -> torch.Tensor:
        """[cache.decode.positions] ``[B, q]``: T_b + (columns b kept) + offset + j."""
        kept = self.valid.sum(dim=1)
        return self.host.decode_positions(self.base.prefill_lengths + kept, offset, q)

    def _mask(self, cache: RoutedCache, layer: int, before: int, q: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, 1, q, C]``: the sample's prefill entries of ``layer``, its kept decoded columns, the round's
        ``before`` earlier columns, and the ``q`` new ones causally."""
        entries, width = cache.entries[layer], cache.width(layer)
        B, device = entries.shape[0], entries.device
        prefix = torch.arange(width, device=device)[None, :] < entries[:, None]  # [B, n_l]
        earlier = torch.ones(B, before, dtype=torch.bool, device=device)
        row = torch.cat([prefix, self.valid, earlier], dim=1)[:, None, :].expand(B, q, -1)  # [B, q, C - q]
        new = torch.ones(q, q, dtype=torch.bool, device=device).tril().expand(B, q, q)
        visible = torch.cat([row, new], dim=-1)[:, None]  # [B, 1, q, C]
        if self.implementation == "sdpa":
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(
            ~visible, torch.finfo(dtype).min
        )

    def _run(self, cache: RoutedCache, layers, h: torch.Tensor, slots, before: int) -> torch.Tensor:
        q = h.shape[1]
        positions = self._positions(before, q)
        rotary = self.host.rotary_embeddings(h, positions)
        for layer, slot in zip(layers, slots):
            h = call_layer(
                layer,
                h,
                attention_mask=self._mask(cache, slot, before, q, h.dtype),
                position_ids=positions,
                position_embeddings=rotary,
                cache=cache,
            )
        return h

    # --- the Speculation protocol ----------------------------------------------------------------
    def draft(self, pending: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[twig.ssd.draft] Feed every sample's pending token, then drafts until every sample has stopped."""
        K, T = self.twig.first_layer, self.twig.num_layers
        B, device = pending.shape[0], self.valid.device
        drafting = limits > 0  # [B]
        counts = torch.zeros(B, dtype=torch.long)
        drafts: list[torch.Tensor] = []
        token = pending.to(device)
        self.states = []
        with torch.no_grad():
            while True:
                before = len(self.states)
                h = self.host.embed_tokens(token[:, None])  # [B, 1, D]
                h = self._run(self.base, self.host.layers[:K], h, range(K), before)
                self.states.append(h)
                if not bool(drafting.any()):
                    break
                h = self._run(self.twig_cache, self.twig.layers, h, range(K, K + T), before)
                logits = self.twig.logits(h)[:, -1].float()  # [B, W]
                token = logits.argmax(dim=-1)  # [B]
                confidence = torch.softmax(logits, dim=-1).gather(1, token[:, None])[:, 0]
                drafts.append(token.cpu())
                for b in range(B):
                    if drafting[b]:
                        counts[b] += 1
                        stop = draft_stops(int(token[b]), float(confidence[b]), self.options)
                        if stop or counts[b] == limits[b]:
                            drafting[b] = False
            # the last fed column (the last draft, or the pending token alone) goes through the twig too
            self._run(
                self.twig_cache, self.twig.layers, self.states[-1], range(K, K + T), len(self.states) - 1
            )
        stacked = torch.stack(drafts, dim=1) if drafts else torch.zeros(B, 0, dtype=torch.long)
        return stacked, counts

    def verify(self) -> torch.Tensor:
        """[twig.ssd.verify] Base layers K..L-1 once over the round's columns: logits ``[B, q, V]``."""
        K = self.twig.first_layer
        with torch.no_grad():
            h = torch.cat(self.states, dim=1)  # [B, q, D]
            h = self._run(self.base, self.host.layers[K:], h, range(K, self.host.num_layers), 0)
            return self.host.logits(h)

    def rollback(self, kept: torch.Tensor) -> None:
        """[twig.ssd.rollback] Sample b keeps its first ``kept[b]`` columns of the round, in every group."""
        q = len(self.states)
        kept = kept.to(self.valid.device)
        keep_max = int(kept.max()) if kept.numel() else 0
        new = torch.arange(keep_max, device=self.valid.device)[None, :] < kept[:, None]  # [B, keep_max]
        self.valid = torch.cat([self.valid, new], dim=1)
        drop = q - keep_max  # columns no sample kept
        if drop:
            for cache in (self.base, self.twig_cache):
                for layer in cache.layers:
                    if layer.is_initialized and layer.keys.numel():
                        layer.keys, layer.values = layer.keys[..., :-drop, :], layer.values[..., :-drop, :]
        self.states = []

    def cache_lengths(self) -> dict[str, list[list[int]]]:
        """[twig.ssd.rollback] ``{"base": [L][B], "twig": [T][B]}``: valid entries per layer and sample."""
        kept = self.valid.sum(dim=1)
        K, T = self.twig.first_layer, self.twig.num_layers
        base = [(self.base.entries[i] + kept).tolist() for i in range(self.host.num_layers)]
        twig = [(self.twig_cache.entries[i] + kept).tolist() for i in range(K, K + T)]
        return {"base": base, "twig": twig}


def ssd_generate(
    model: nn.Module,
    config: RoutingConfig,
    twig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    options: SpeculationOptions | None = None,
    image_features=None,
) -> tuple[torch.Tensor, SpeculationStats, PrefillResult]:
    """[twig.ssd.lossless] Batched SSD from the TTP-routed prefill: ``[B, max_new_tokens]`` ids, stats, prefill."""
    options = options or SpeculationOptions()
    result = routed_prefill(
        model, config, input_ids, attention_mask, pixel_values, twig=twig, image_features=image_features
    )
    host = host_for(model)
    with torch.no_grad():
        logits = last_valid_logits(host, result, attention_mask)[:, -1]  # [B, V]
    step = BatchedSpeculation(model, twig, result, options)
    tokens = decoding_strategy("ssd")(logits, step, max_new_tokens)
    return tokens, step.stats, result
