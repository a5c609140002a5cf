"""Top-k selection with the spec's tie-break, as one stable sort (spec/selection.md).

The pool and the keep target come from the reference (``candidate_pool``, ``capped_k``): they are discrete
rules over a few hundred indices, not worth a second implementation. Only the ranking is re-done with torch.

Notation used for tensor shapes: N visual tokens, P pool size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rerouting.reference import RoutingError


def select_topk(scores: torch.Tensor, pool: Sequence[int], k: int) -> tuple[int, ...]:
    """[selection.topk] [selection.tiebreak] [selection.order] The k highest-scoring pool tokens, ascending.

    A stable descending sort over the pool (which is ascending) keeps equal scores in visual-index order, so
    the lower index wins a tie, exactly as the reference's ``sorted(key=(-score, index))``.

    Args:
        scores: ``[N]`` float32 scores of every visual token.
        pool: eligible visual indices, ascending.
        k: ``0 <= k <= len(pool)``.
    """
    if not 0 <= k <= len(pool):
        raise RoutingError("selection.pool-cap", f"cannot select k={k} from a pool of {len(pool)}")
    pool_index = torch.as_tensor(pool, dtype=torch.long, device=scores.device)  # [P]
    order = torch.sort(scores[pool_index], descending=True, stable=True).indices[:k]  # [k]
    return tuple(sorted(pool_index[order].tolist()))
