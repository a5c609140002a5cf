"""What the optimized prefill accepts, checked before it runs: host class, attention, schedule, scorer.

Each check raises a ``RoutingError`` naming the refused value ([routing.errors], [scoring.scorer]); nothing
falls back to an unrouted or reference run.
"""

from __future__ import annotations

from torch import nn

from rerouting.reference import Host, RoutingConfig, RoutingError, host_for
from rerouting.reference.cache_policy import check_cache_policy
from rerouting.reference.hooks import reducer_for
from rerouting.reference.hybrid import check_host_config
from rerouting.reference.scoring import scoring_method

from .packing import SUPPORTED_ATTENTION


def check_attention_implementation(host: Host) -> str:
    """[routing.errors] The decoder's attention implementation, if this path supports it."""
    name = host.config.get_text_config()._attn_implementation
    if name not in SUPPORTED_ATTENTION:
        raise RoutingError(
            "routing.errors",
            f"attention implementation {name!r} is not supported by the optimized path; "
            f"supported: {', '.join(SUPPORTED_ATTENTION)}",
        )
    return name


# [scoring.scorer] The registry keys (reference/scoring.py SCORERS) this path has a fast implementation for: the
# attention probe fused and batched over the query rows only (scoring.py), the random baseline drawn per sample,
# the CLSE gate batched over the images of each grid shape (scoring_clse.py).
FAST_SCORERS = ("attention", "random", "twig", "clse")  # twig: optimized/scoring_twig.py


def check_scorer(kind: str) -> None:
    """[scoring.scorer] A scorer kind must be registered and have a fast implementation here."""
    scoring_method(kind)  # unknown to the registry: an error naming the kind
    if kind not in FAST_SCORERS:
        raise RoutingError(
            "scoring.scorer",
            f"scorer kind {kind!r} has no fast implementation in the optimized path; "
            f"fast: {', '.join(FAST_SCORERS)} (use rerouting.reference.Reference)",
        )


def check_host(model: nn.Module, config: RoutingConfig) -> tuple[Host, str]:
    """[routing.errors] The host adapter and attention implementation, or a ``RoutingError`` naming the value."""
    host = host_for(model)  # rejects unsupported model classes
    implementation = check_attention_implementation(host)
    config.schedule.check_layers(host.num_layers)
    check_host_config(host, config)  # [hosts.linear.decisions] [hosts.deepstack]
    check_scorer(config.scorer.kind)
    check_reducer(config)
    check_cache_policy(config.cache, host.layer_kinds)  # [cache.policy.retroactive]
    return host, implementation


# [layout.vision-reducer] The reducers this path has a fast implementation for (optimized/nuwa.py: batched).
FAST_REDUCERS = ("identity", "nuwa")


def check_reducer(config: RoutingConfig) -> None:
    """[layout.vision-reducer] The reducer must be registered, its record valid, and fast here."""
    reducer_for(config)  # unknown name or bad record: an error naming it
    if config.reducer not in FAST_REDUCERS:
        raise RoutingError(
            "layout.vision-reducer",
            f"reducer {config.reducer!r} has no fast implementation in the optimized path; "
            f"fast: {', '.join(FAST_REDUCERS)} (use rerouting.reference.Reference)",
        )
