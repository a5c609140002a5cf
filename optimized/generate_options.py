"""``generate`` options a routed model cannot serve: refused by name before ``generate`` starts ([routing.errors]).

Under ``route(model, config)`` the first forward is a routed prefill and every later one an unrouted decode
step from its ``RoutedCache`` ([cache.decode.unrouted]). What that serves: greedy search, sampling, beam
search and ``num_return_sequences`` (``generate`` repeats each prompt before the prefill, so the trace has one
sample per beam or returned sequence, in ``repeat_interleave`` order; the cache follows beam reordering).
What it cannot serve is refused with the option's name, never run some other way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from rerouting.reference import RoutingError
from rerouting.reference.compat import CACHE_NAMES

# option -> (is the given value refused?, why)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cache_implementation": (
        lambda v: v is not None,
        "routing keeps its own RoutedCache with per-layer, per-sample lengths ([cache.contents]); "
        "static, offloaded, quantized and other cache implementations cannot hold them",
    ),
    "assistant_model": (
        lambda v: v is not None,
        "assisted generation verifies drafts with multi-token forwards and crops the cache; a routed "
        "cache cannot be cropped",
    ),
    "prompt_lookup_num_tokens": (
        lambda v: v is not None,
        "prompt-lookup decoding is assisted generation: it crops the cache, which a routed cache cannot do",
    ),
    "assistant_early_exit": (
        lambda v: v is not None,
        "early-exit self-speculation drafts from early layers and crops the cache",
    ),
    "use_cache": (
        lambda v: v is False,
        "without a cache every step would re-route prompt and generated tokens with new probe queries, "
        "not decode from the routed prefill ([cache.decode.unrouted])",
    ),
    "dola_layers": (
        lambda v: v is not None,
        "DoLa reads the hidden states of early layers, which a routed forward does not return",
    ),
    "penalty_alpha": (
        lambda v: v is not None and v > 0,
        "contrastive search reads every step's hidden states, which a routed forward does not return",
    ),
}


def check_generate_options(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """[routing.errors] Refuse, naming it, any ``generate`` option (argument or generation config) routing cannot serve."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    for name, (refused, why) in REFUSED.items():
        value = kwargs[name] if name in kwargs else getattr(config, name, None)
        if refused(value):
            shown = repr(value) if isinstance(value, (str, int, float, bool)) else f"<{type(value).__name__}>"
            raise RoutingError(
                "routing.errors", f"generate option {name}={shown} is not supported while routing: {why}"
            )
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            raise RoutingError(
                "routing.errors",
                f"generate option {name}={type(kwargs[name]).__name__}: routing builds its own RoutedCache "
                "from the prompt; pass no cache",
            )
