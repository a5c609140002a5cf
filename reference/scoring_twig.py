"""The twig scorer of twig-guided pruning (TTP, spec/twig.md).

At the schedule's first decision (layer K, where every token is still active) the twig's T layers run on the
states entering base layer K, and the score of each visual token is the last twig layer's attention probe: its
own input norm and q/k projections, RoPE at original positions, head mean of the query row's probabilities.
Later decisions (TTP + Reroute) are scored by the ordinary attention probe of their own layer.

Notation: T_b the sample's valid length, D hidden, N visual tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .routing import run_block
from .schedule import RoutingError
from .scoring import AttentionProbe, DecisionContext, attention_scores, register_scorer


def twig_states(context: DecisionContext) -> torch.Tensor:
    """[twig.ttp.score] ``[T_b, D]``: the states entering the twig's LAST layer, the twig run on every valid token."""
    twig, hidden = context.twig, context.states
    every = list(range(hidden.shape[0]))
    scratch = DynamicCache()  # the scorer's run keeps no cache; SSD fills the twig's own group
    for layer in twig.layers[:-1]:
        hidden = run_block(context.host, layer, hidden, every, scratch)
    return hidden


@register_scorer("twig")
class TwigScorer:
    """[twig.ttp.score] At layer K: the twig's last layer's head-mean attention; later: the attention probe."""

    probes = True

    def __call__(self, context: DecisionContext) -> torch.Tensor:
        twig = context.twig
        if twig is None:
            raise RoutingError("twig.ttp.score", "the 'twig' scorer was called without a twig")
        if context.layer != twig.first_layer:
            return AttentionProbe()(context)
        if len(context.keys) != context.states.shape[0]:
            raise RoutingError(
                "twig.ttp.score",
                f"the twig scores at K={twig.first_layer}, where every token must still be active "
                f"({len(context.keys)} of {context.states.shape[0]} are)",
            )
        return attention_scores(
            context.host,
            twig.layers[-1],
            twig_states(context),
            context.keys,
            context.queries,
            context.visual,
            context.score_dtype,
        )
