"""Candidate pool and top-k selection (spec/selection.md).

Plain Python over visual indices: the selection is a discrete decision and reads best that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedule import RoutingError

# forced_selection[b][s]: the visual indices (0..N_b-1) sample b selects at decision s. The one definition:
# the reference, the optimized path and the conformance protocol all import it from here.
ForcedSelection = Sequence[Sequence[Sequence[int]]]


def candidate_pool(
    policy: str,
    num_visual: int,
    previous: Sequence[int] | None,
    entering: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """[selection.pool] The visual indices eligible at a decision.

    ``reroute``: every visual token, at every decision. ``remove``: every visual token at the first
    decision (``previous is None``), then exactly the tokens selected at the previous decision. "Every
    visual token" is every one that entered the decoder: ``entering`` when a vision-side reducer left
    some out ([nuwa.entering]), else all ``num_visual``.
    """
    if policy == "reroute" or previous is None:
        return tuple(range(num_visual)) if entering is None else tuple(entering)
    if policy == "remove":
        return tuple(previous)
    raise RoutingError("selection.pool", f"policy {policy!r} is not 'remove' or 'reroute'")


def capped_k(k: int, pool: Sequence[int]) -> int:
    """[selection.pool-cap] The keep target, capped by the pool size."""
    return min(k, len(pool))


def select_topk(scores: torch.Tensor, pool: Sequence[int], k: int) -> tuple[int, ...]:
    """[selection.topk] The k pool tokens with the highest scores, in original order.

    Ties are broken by the lower visual index ([selection.tiebreak]); the result is sorted
    ascending ([selection.order]).

    Args:
        scores: ``[N]`` floating scores of every visual token.
        pool: eligible visual indices.
        k: how many to select, ``0 <= k <= len(pool)``.
    """
    if not 0 <= k <= len(pool):
        raise RoutingError("selection.pool-cap", f"cannot select k={k} from a pool of {len(pool)}")
    values = scores.tolist()
    ranked = sorted(pool, key=lambda i: (-values[i], i))
    return tuple(sorted(ranked[:k]))


def forced_choice(forced: Sequence[int], pool: Sequence[int], k: int, layer: int) -> tuple[int, ...]:
    """[selection.forced] A forced selection, ascending, once checked to be ``k`` distinct tokens of the pool.

    ``k`` is the schedule's capped target ([selection.pool-cap]), never ``len(forced)``.

    Args:
        forced: the visual indices a caller forces at the decision of decision layer ``layer``.
    """
    chosen = tuple(sorted(forced))
    if len(set(chosen)) != k or not set(chosen) <= set(pool):
        raise RoutingError(
            "selection.forced",
            f"forced selection {list(chosen)} at decision layer {layer} is not {k} distinct tokens of the pool {list(pool)}",
        )
    return chosen


def check_forced(forced: ForcedSelection | None, batch: int, decisions: int, routed: Sequence[bool]) -> None:
    """[selection.forced] One forced entry per sample, and one selection per decision for every routed sample."""
    if forced is None:
        return
    if len(forced) != batch:
        raise RoutingError(
            "selection.forced", f"forced_selection has {len(forced)} samples, the batch has {batch}"
        )
    for b, (entry, is_routed) in enumerate(zip(forced, routed)):
        if is_routed and len(entry) != decisions:
            raise RoutingError(
                "selection.forced",
                f"forced_selection[{b}] has {len(entry)} selections, the schedule has {decisions} decisions",
            )
