"""The scorer registry (reference/scoring.py): decisions call their scorer through ``SCORERS``."""

from __future__ import annotations

import pytest
import torch

from rerouting.optimized import routed_prefill
from rerouting.reference import Reference, RoutingConfig, RoutingError, Schedule, Scorer
from rerouting.reference.scoring import (
    SCORERS,
    AttentionProbe,
    DecisionContext,
    RandomBaseline,
    scoring_method,
)


def scorer_of_kind(kind: str) -> Scorer:
    """A ``Scorer`` config naming ``kind``, past the config's own check (which knows the built-in kinds)."""
    scorer = Scorer()
    object.__setattr__(scorer, "kind", kind)
    return scorer


@pytest.fixture
def reversed_scorer():
    """A registered scorer ranking the last visual token highest; what it saw is kept in ``contexts``."""
    contexts: list[DecisionContext] = []

    class Reversed:
        probes = False

        def __call__(self, context: DecisionContext) -> torch.Tensor:
            contexts.append(context)
            return torch.arange(len(context.visual), dtype=torch.float32)

    SCORERS["reversed"] = Reversed()
    yield contexts
    del SCORERS["reversed"]


@pytest.mark.spec("scoring.scorer")
def test_builtin_kinds_are_registered():
    assert isinstance(scoring_method("attention"), AttentionProbe)
    assert isinstance(scoring_method("random"), RandomBaseline)
    with pytest.raises(
        RoutingError, match=r"scorer kind 'no-such-kind' is not registered.*\[rule scoring.scorer\]"
    ):
        scoring_method("no-such-kind")


@pytest.mark.spec("scoring.scorer", "selection.topk")
def test_reference_decides_through_the_registry(llava, single, reversed_scorer):
    config = RoutingConfig(Schedule((1, 3), (0.5, 0.25)), scorer=scorer_of_kind("reversed"))
    trace = Reference(llava, config).prefill(**single).trace
    decisions = trace.samples[0].decisions
    assert [d.selected for d in decisions] == [tuple(range(8, 16)), tuple(range(12, 16))]
    assert [(d.probe_keys, d.probe_queries) for d in decisions] == [(0, 0), (0, 0)]  # probes=False
    first = reversed_scorer[0]
    assert (first.layer, first.queries, len(first.visual)) == (1, (), 16)
    assert first.states.shape == first.previous_states.shape == (single["input_ids"].shape[1], 32)


@pytest.mark.spec("scoring.scorer")
def test_optimized_refuses_a_scorer_it_has_no_fast_path_for(llava, single, reversed_scorer):
    config = RoutingConfig(Schedule((1,), (0.5,)), scorer=scorer_of_kind("reversed"))
    with pytest.raises(RoutingError, match=r"'reversed' has no fast implementation.*\[rule scoring.scorer\]"):
        routed_prefill(llava, config, **single)
    with pytest.raises(RoutingError, match="'nope' is not registered"):
        routed_prefill(llava, RoutingConfig(Schedule((1,), (0.5,)), scorer=scorer_of_kind("nope")), **single)
