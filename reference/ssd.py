"""Self-speculative decoding with a twig (SSD, spec/twig.md): the strategy and the reference's speculation.

The strategy ``ssd`` (registered in the decoding-strategy registry, [cache.decoding-strategy]) is the discrete
bookkeeping both implementations share: per sample, how many tokens may be drafted, where a draft stops, how
many drafts are accepted and what is emitted. It drives a ``Speculation``, which owns the caches and the
arithmetic: ``draft`` feeds the pending tokens and the drafts through base layers 0..K-1 and the twig,
``verify`` runs base layers K..L-1 once over them, ``rollback`` keeps the accepted tokens in every cache group.
``ReferenceSpeculation`` does it one sample at a time with one ``DynamicCache`` per group.

Notation: B batch, q tokens fed in a round (pending + drafts), D hidden, V vocabulary, K the twig's first layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from .compat import call_layer
from .hooks import register_strategy
from .host import attention_implementation, bind_ids
from .routing import PrefillResult, Reference, run_block
from .schedule import RoutingError

NUM_SPECULATIONS, DRAFT_CONFIDENCE = 5, 0.6  # [twig.ssd.draft] the release's defaults


@dataclass(frozen=True)
class SpeculationOptions:
    """[twig.ssd.draft] Up to ``num_speculations`` drafts; stop after EOS or a draft below ``draft_confidence``."""

    num_speculations: int = NUM_SPECULATIONS
    draft_confidence: float = DRAFT_CONFIDENCE
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        n = self.num_speculations
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RoutingError("twig.ssd.draft", f"num_speculations={n!r} is not an integer >= 1")
        c = self.draft_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise RoutingError("twig.ssd.draft", f"draft_confidence={c!r} is not a number in [0, 1]")


@dataclass
class SpeculationStats:
    """What an SSD run did, per sample: rounds, drafts, accepted drafts, and the cache lengths after each verify.

    Attributes:
        drafted, accepted: per sample, per round, ``n`` and ``m`` ([twig.ssd.verify]).
        fed: ``[B]`` tokens kept in every cache group so far (the accepted ones).
        lengths: after each round's rollback, ``{group: [layers][B]}`` entries per layer (``cache_lengths``).
        fed_history: after each round, ``fed`` as it stood then (what ``lengths`` must add to the prefill's).
        logits: per sample, the base logits ``[V]`` each emitted token is the argmax of.
    """

    drafted: list[list[int]] = field(default_factory=list)
    accepted: list[list[int]] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)
    lengths: list[dict[str, list[list[int]]]] = field(default_factory=list)
    fed_history: list[list[int]] = field(default_factory=list)
    logits: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted tokens, all samples and rounds."""
        drafted = sum(sum(r) for r in self.drafted)
        return sum(sum(r) for r in self.accepted) / drafted if drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per round (``m + 1``), averaged over every sample's rounds."""
        rounds = sum(len(r) for r in self.accepted)
        return sum(m + 1 for r in self.accepted for m in r) / rounds if rounds else 0.0


class Speculation(Protocol):
    """The arithmetic of SSD over a batch (the ``step`` the ``ssd`` strategy is given).

    ``draft(pending [B], limits [B])`` feeds each sample's pending token and its drafts through base layers
    0..K-1 and the twig, sample b drafting at most ``limits[b]`` tokens (``-1``: the sample is finished and
    takes no part), and returns the drafts ``[B, n]`` (padding past a sample's count) with their counts ``[B]``;
    ``verify()`` returns the base logits ``[B, q, V]`` of the fed tokens; ``rollback(kept [B])`` keeps each
    sample's first ``kept[b]`` tokens of the round in every cache group; ``cache_lengths()`` reports
    ``{group: [layers][B]}``.
    """

    options: SpeculationOptions

    def draft(self, pending: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def verify(self) -> torch.Tensor: ...

    def rollback(self, kept: torch.Tensor) -> None: ...

    def cache_lengths(self) -> dict[str, list[list[int]]]: ...


def draft_stops(token: int, probability: float, options: SpeculationOptions) -> bool:
    """[twig.ssd.draft] Whether drafting stops after this draft (it is kept): EOS, or below the confidence."""
    return token == options.eos_token_id or probability < options.draft_confidence


def accepted_count(drafts: list[int], base_tokens: list[int]) -> int:
    """[twig.ssd.verify] ``m``: the longest prefix of ``drafts`` with ``drafts[j] == base_tokens[j]``."""
    m = 0
    while m < len(drafts) and drafts[m] == base_tokens[m]:
        m += 1
    return m


@register_strategy("ssd")
class SelfSpeculative:
    """[twig.ssd.verify] [twig.ssd.batch] Rounds of draft, verify, accept, roll back, each sample on its own."""

    def __call__(self, logits: torch.Tensor, step, max_new_tokens: int) -> torch.Tensor:
        if not all(hasattr(step, name) for name in ("draft", "verify", "rollback")):
            raise RoutingError(
                "cache.decoding-strategy",
                "decoding strategy 'ssd' needs a twig's speculation (draft, verify, rollback); it was given a "
                "plain decode step: route with twig=... and generate with assistant_model=twig",
            )
        B = logits.shape[0]
        stats = SpeculationStats(
            drafted=[[] for _ in range(B)],
            accepted=[[] for _ in range(B)],
            fed=[0] * B,
            logits=[[row] for row in logits],
        )
        step.stats = stats
        emitted = [[int(t)] for t in logits.argmax(dim=-1)]  # the prefill's own next token
        while any(len(e) < max_new_tokens for e in emitted):
            pending = torch.tensor([e[-1] for e in emitted])
            limits = torch.tensor(
                [
                    min(step.options.num_speculations, max_new_tokens - len(e) - 1)
                    if len(e) < max_new_tokens
                    else -1
                    for e in emitted
                ]
            )  # [twig.ssd.draft]: n never exceeds the tokens still to generate minus one
            drafts, counts = step.draft(pending, limits)
            verify = step.verify()  # [B, q, V]
            base = verify.argmax(dim=-1)  # [B, q]
            kept = torch.zeros(B, dtype=torch.long)
            for b in range(B):
                if limits[b] < 0:
                    continue
                n = int(counts[b])
                m = accepted_count(drafts[b, :n].tolist(), base[b, :n].tolist())
                emitted[b] += [*drafts[b, :m].tolist(), int(base[b, m])]
                stats.logits[b] += list(verify[b, : m + 1])
                stats.drafted[b].append(n)
                stats.accepted[b].append(m)
                kept[b] = m + 1  # p, x_1..x_m
                stats.fed[b] += m + 1
            step.rollback(kept)  # [twig.ssd.rollback]
            stats.lengths.append(step.cache_lengths())
            stats.fed_history.append(list(stats.fed))
        return torch.tensor(emitted, dtype=torch.long)  # [B, max_new_tokens]


class ReferenceSpeculation:
    """[twig.ssd.draft] [twig.ssd.verify] [twig.ssd.rollback] SSD's arithmetic, one sample at a time, literally.

    Cache groups per sample: the routed prefill's ``DynamicCache`` (base layers 0..L-1, layer l holding its own
    entries) and the twig's own ``DynamicCache`` (slots K..K+T-1), filled by the twig over the full prompt.
    """

    def __init__(self, reference: Reference, result: PrefillResult, twig_caches: list[DynamicCache], options):
        self.reference, self.options = reference, options
        self.caches = [c.cache for c in result.caches]
        self.rotary = [c.rotary for c in result.caches]
        self.lengths = [c.length for c in result.caches]
        self.twig_caches = twig_caches
        self.fed = [0] * len(self.caches)  # tokens kept in every group, per sample
        self.round: list[
            tuple[list[int], list[torch.Tensor]]
        ] = []  # per sample: fed tokens, their layer-K states

    def _feed(self, b: int, token: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token of sample b through base layers 0..K-1 and the twig: its layer-K state ``[1, 1, D]``, twig logits."""
        reference, twig = self.reference, self.reference.twig
        host = bind_ids(reference.host, self.rotary[b])
        h = host.embed_tokens(torch.tensor([[token]]))  # [1, 1, D]
        position = host.decode_positions(torch.tensor([self.lengths[b]]), self.fed[b] + offset, 1)  # [1, 1]
        rotary = host.rotary_embeddings(h, position)
        for layer in host.layers[: twig.first_layer]:
            h = _one_token(layer, h, position, rotary, self.caches[b])
        state = h
        for layer in twig.layers:
            h = _one_token(layer, h, position, rotary, self.twig_caches[b])
        return state, twig.logits(h)[0, -1]

    def draft(self, pending: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[twig.ssd.draft] Feed p, x_1, .., x_n; x_{i+1} is the twig's argmax after x_i; stop per the options."""
        self.round = []
        drafts, counts = [], []
        with torch.no_grad(), attention_implementation(self.reference.model, self.reference.attention):
            for b in range(len(self.caches)):
                fed, states, mine = [int(pending[b])], [], []
                if limits[b] >= 0:
                    state, logits = self._feed(b, fed[-1], 0)
                    states.append(state)
                    while len(mine) < int(limits[b]):
                        token = int(logits.argmax())
                        confidence = float(torch.softmax(logits.float(), dim=-1)[token])
                        mine.append(token)
                        fed.append(token)
                        state, logits = self._feed(b, token, len(fed) - 1)  # the last draft is fed too
                        states.append(state)
                        if draft_stops(token, confidence, self.options):
                            break
                self.round.append((fed, states))
                drafts.append(mine)
                counts.append(len(mine))
        width = max(counts, default=0)
        padded = torch.zeros(len(drafts), width, dtype=torch.long)
        for b, mine in enumerate(drafts):
            padded[b, : len(mine)] = torch.tensor(mine, dtype=torch.long)
        return padded, torch.tensor(counts)

    def verify(self) -> torch.Tensor:
        """[twig.ssd.verify] Base layers K..L-1 once over each sample's fed tokens: logits ``[B, q, V]`` (padded)."""
        reference, K = self.reference, self.reference.twig.first_layer
        out = []
        with torch.no_grad(), attention_implementation(reference.model, reference.attention):
            for b, (_fed, states) in enumerate(self.round):
                if not states:
                    out.append(None)
                    continue
                host = bind_ids(reference.host, self.rotary[b])
                h = torch.cat(states, dim=1)  # [1, q, D]
                q = h.shape[1]
                positions = host.decode_positions(torch.tensor([self.lengths[b]]), self.fed[b], q)  # [1, q]
                rotary = host.rotary_embeddings(h, positions)
                for index in range(K, host.num_layers):
                    n = self.caches[b].layers[index].keys.shape[-2]  # this layer's own length
                    h = call_layer(
                        host.layers[index],
                        h,
                        attention_mask=_verify_mask(n, q, h.dtype),
                        position_ids=positions,
                        position_embeddings=rotary,
                        cache=self.caches[b],
                    )
                out.append(host.logits(h)[0])  # [q, V]
        width = max((o.shape[0] for o in out if o is not None), default=1)
        V = reference.host.lm_head.out_features
        logits = torch.zeros(len(out), width, V, dtype=reference.compute_dtype)
        for b, o in enumerate(out):
            if o is not None:
                logits[b, : o.shape[0]] = o
        return logits

    def rollback(self, kept: torch.Tensor) -> None:
        """[twig.ssd.rollback] Every group drops the round's tokens past the first ``kept[b]``, from its own length."""
        twig = self.reference.twig
        for b, (fed, _) in enumerate(self.round):
            drop = len(fed) - int(kept[b]) if self.round[b][1] else 0
            twig_slots = range(twig.first_layer, twig.first_layer + twig.num_layers)
            for layer in self.caches[b].layers:
                _drop(layer, drop)
            for index in twig_slots:
                _drop(self.twig_caches[b].layers[index], drop)
            self.fed[b] += int(kept[b])

    def cache_lengths(self) -> dict[str, list[list[int]]]:
        """[twig.ssd.rollback] ``{"base": [L][B], "twig": [T][B]}`` entries per layer of each group."""
        twig = self.reference.twig
        slots = range(twig.first_layer, twig.first_layer + twig.num_layers)
        return {
            "base": [
                [c.layers[i].keys.shape[-2] for c in self.caches] for i in range(len(self.caches[0].layers))
            ],
            "twig": [[c.layers[i].keys.shape[-2] for c in self.twig_caches] for i in slots],
        }


def _one_token(layer, h, position, rotary, cache) -> torch.Tensor:
    """One token through ``layer``: it sees the layer's whole cache and itself."""
    n = (
        cache.layers[layer.self_attn.layer_idx].keys.shape[-2]
        if len(cache.layers) > layer.self_attn.layer_idx
        else 0
    )
    mask = torch.zeros(1, 1, 1, n + 1, dtype=h.dtype)
    return call_layer(
        layer, h, attention_mask=mask, position_ids=position, position_embeddings=rotary, cache=cache
    )


def _verify_mask(n: int, q: int, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 1, q, n + q]``: every cache entry, and the new tokens causally."""
    mask = torch.zeros(1, 1, q, n + q, dtype=dtype)
    new = torch.ones(q, q, dtype=torch.bool).triu(1)  # above the diagonal: a later token
    mask[0, 0, :, n:] = mask[0, 0, :, n:].masked_fill(new, torch.finfo(dtype).min)
    return mask


def _drop(layer, count: int) -> None:
    if count:
        layer.keys, layer.values = layer.keys[..., :-count, :], layer.values[..., :-count, :]


def twig_prefill(reference: Reference, input_ids, attention_mask=None, pixel_values=None) -> list[tuple]:
    """[twig.module] Per sample: the twig's cache over the full prompt and its logits ``[T_b, W]``.

    Base layers 0..K-1 run densely (as in every TTP prefill, K being its first decision) and the twig's T
    layers on their output, every valid token active.
    """
    host, twig = reference.host, reference.twig
    if pixel_values is not None:
        pixel_values = pixel_values.to(reference.compute_dtype)
    out = []
    with torch.no_grad(), attention_implementation(reference.model, reference.attention):
        embeds = host.embed(input_ids, pixel_values)
        for b, layout in enumerate(host.layouts(input_ids, attention_mask)):
            hidden, every = embeds[b, layout.valid], list(range(layout.length))
            scratch, cache = DynamicCache(), DynamicCache()
            for layer in host.layers[: twig.first_layer]:
                hidden = run_block(host, layer, hidden, every, scratch)
            for layer in twig.layers:
                hidden = run_block(host, layer, hidden, every, cache)
            out.append((cache, twig.logits(hidden)))
    return out


def ssd_generate(
    reference: Reference,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    options: SpeculationOptions | None = None,
) -> tuple[torch.Tensor, SpeculationStats]:
    """[twig.ssd.lossless] SSD from the TTP-routed prefill: ``[B, max_new_tokens]`` ids (no stop at EOS), stats."""
    from .hooks import decoding_strategy

    if reference.twig is None:
        raise RoutingError("twig.ssd.draft", "SSD needs a twig: Reference(model, config, twig=...)")
    options = options or SpeculationOptions()
    result = reference.prefill(input_ids, attention_mask, pixel_values)
    working = copy.copy(result)
    working.caches = copy.deepcopy(result.caches)
    twig_caches = [cache for cache, _ in twig_prefill(reference, input_ids, attention_mask, pixel_values)]
    layouts = reference.host.layouts(input_ids, attention_mask)
    logits = torch.stack([result.logits[b, layout.valid[-1]] for b, layout in enumerate(layouts)])  # [B, V]
    step = ReferenceSpeculation(reference, working, twig_caches, options)
    tokens = decoding_strategy("ssd")(logits, step, max_new_tokens)
    return tokens, step.stats
