"""Two hooks with one implementation each today: the vision-side reducer and the decoding strategy.

A vision-side reducer ([layout.vision-reducer], spec/layout.md) changes what enters the decoder: it takes the
merged input embeddings and the layouts and returns both; ``identity`` is the only one. A decoding strategy
([cache.decoding-strategy], spec/cache.md) turns the routed prefill's last logits and an unrouted decode step
into generated tokens: ``greedy`` here, ``ssd`` (self-speculative decoding with a twig) in reference/ssd.py.
Each is looked up by name in its registry.

Notation: B batch, T padded length, D hidden, V vocabulary, n generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .host import SampleLayout
from .schedule import RoutingError


class VisionReducer(Protocol):
    """Merged embeddings ``[B, T, D]`` and layouts in, the embeddings and layouts the decoder runs on out."""

    def __call__(
        self, embeds: torch.Tensor, layouts: list[SampleLayout]
    ) -> tuple[torch.Tensor, list[SampleLayout]]: ...


# step(tokens [B], j) feeds the j-th generated token of every sample and returns the next logits [B, V].
DecodeStep = Callable[[torch.Tensor, int], torch.Tensor]


class DecodingStrategy(Protocol):
    """From the prefill's last logits ``[B, V]`` and an unrouted ``step``: ``[B, max_new_tokens]`` token ids."""

    def __call__(self, logits: torch.Tensor, step: DecodeStep, max_new_tokens: int) -> torch.Tensor: ...


REDUCERS: dict[str, VisionReducer] = {}
STRATEGIES: dict[str, DecodingStrategy] = {}


def register_reducer(name: str) -> Callable[[type], type]:
    """Class decorator: an instance of the class becomes the vision-side reducer called ``name``."""

    def register(cls: type) -> type:
        REDUCERS[name] = cls()
        return cls

    return register


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: an instance of the class becomes the decoding strategy called ``name``."""

    def register(cls: type) -> type:
        STRATEGIES[name] = cls()
        return cls

    return register


def vision_reducer(name: str) -> VisionReducer:
    """[layout.vision-reducer] The registered reducer ``name``; an unknown name is an error naming it."""
    if name not in REDUCERS:
        raise RoutingError(
            "layout.vision-reducer",
            f"vision reducer {name!r} is not registered; registered: {', '.join(REDUCERS)}",
        )
    return REDUCERS[name]


def decoding_strategy(name: str) -> DecodingStrategy:
    """[cache.decoding-strategy] The registered strategy ``name``; an unknown name is an error naming it."""
    if name not in STRATEGIES:
        raise RoutingError(
            "cache.decoding-strategy",
            f"decoding strategy {name!r} is not registered; registered: {', '.join(STRATEGIES)}",
        )
    return STRATEGIES[name]


@register_reducer("identity")
class IdentityReducer:
    """[layout.vision-reducer] The decoder runs on exactly what the host merged: both returned as they came."""

    def __call__(
        self, embeds: torch.Tensor, layouts: list[SampleLayout]
    ) -> tuple[torch.Tensor, list[SampleLayout]]:
        return embeds, layouts


@register_strategy("greedy")
class Greedy:
    """[cache.decoding-strategy] [cache.decode.unrouted] The argmax of every step; the last token is not fed."""

    def __call__(self, logits: torch.Tensor, step: DecodeStep, max_new_tokens: int) -> torch.Tensor:
        generated = []
        for j in range(max_new_tokens):
            tokens = logits.argmax(dim=-1)  # [B]
            generated.append(tokens)
            if j + 1 < max_new_tokens:
                logits = step(tokens, j)  # [B, V]
        return torch.stack(generated, dim=1)  # [B, n]
