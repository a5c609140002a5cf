"""Candidate pool and top-k selection (spec/selection.md)."""

from __future__ import annotations

import pytest
import torch

from rerouting.reference import RoutingError, candidate_pool, capped_k, select_topk


@pytest.mark.spec("selection.pool")
def test_pool_per_policy():
    assert candidate_pool("reroute", 5, (1, 3)) == (0, 1, 2, 3, 4)
    assert candidate_pool("remove", 5, (1, 3)) == (1, 3)
    assert candidate_pool("remove", 5, None) == (0, 1, 2, 3, 4)


@pytest.mark.spec("selection.pool-cap")
def test_k_is_capped_by_pool():
    assert capped_k(8, (1, 3)) == 2
    assert capped_k(1, (1, 3)) == 1
    with pytest.raises(RoutingError, match="selection.pool-cap"):
        select_topk(torch.zeros(4), (0, 1), 3)


@pytest.mark.spec("selection.topk", "selection.order")
def test_topk_returns_highest_in_original_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05])
    assert select_topk(scores, range(5), 3) == (1, 2, 3)
    assert select_topk(scores, (0, 2, 4), 2) == (0, 2)


@pytest.mark.spec("selection.tiebreak")
def test_ties_go_to_the_lower_index():
    scores = torch.tensor([0.5, 0.7, 0.5, 0.5, 0.7])
    assert select_topk(scores, range(5), 3) == (0, 1, 4)
    assert select_topk(scores, (2, 3, 4), 2) == (2, 4)
