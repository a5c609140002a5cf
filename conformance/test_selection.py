"""Conformance of spec/selection.md: the candidate pool, its cap, top-k, the tie-break and the order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_decisions,
    check_kv,
    check_own_topk,
    check_scores,
    check_structure,
    observe,
    run_check,
)
from rerouting.conformance.oracle.strategies import draw_case, hosts


def check_pool(impl, case):
    """Reroute's pool is all of V at every decision; remove's is the previous selection."""
    obs = observe(impl, case)
    check_structure(obs)
    check_decisions(obs)


@pytest.mark.spec("selection.pool")
@given(data=st.data())
def test_pool(impl, data):
    run_check(check_pool, impl, draw_case(data, exact_decisions=None))


def check_pool_cap(impl, case):
    """k = min(k, |pool|): a remove schedule whose counts grow is capped by the previous selection."""
    obs = observe(impl, case)
    check_structure(obs)


@pytest.mark.spec("selection.pool-cap")
@given(data=st.data())
def test_pool_cap(impl, data):
    case = draw_case(data, policy="remove", unit="count")
    keep = sorted(case.config.schedule.keep)  # increasing counts: every later decision hits the cap
    run_check(
        check_pool_cap,
        impl,
        case.with_config(
            schedule=type(case.config.schedule)(case.config.schedule.layers, tuple(keep), "count")
        ),
    )


def check_topk(impl, case):
    """The top-k of the implementation's own fp32 scores, and the truth's top-k outside the near-tie band."""
    obs = observe(impl, case)
    check_structure(obs)
    check_own_topk(obs)
    check_scores(obs, "selection.topk")
    check_decisions(obs)


@pytest.mark.spec("selection.topk")
@given(data=st.data())
def test_topk(impl, data):
    run_check(check_topk, impl, draw_case(data))


def check_tiebreak(impl, case):
    """Exact ties (q_proj = 0: every visible key scores 1/P): the lower visual index wins."""
    obs = observe(impl, case)
    check_structure(obs)
    check_own_topk(obs)
    check_decisions(obs)


@pytest.mark.spec("selection.tiebreak")
@given(data=st.data())
def test_tiebreak(impl, data):
    case = draw_case(data, host=hosts(ties=st.sampled_from(["exact", "near-7"])))
    run_check(check_tiebreak, impl, case)


def check_order(impl, case):
    """The selection, the active sets and every layer's cache are in ascending (original) order."""
    obs = observe(impl, case)
    check_structure(obs)
    check_kv(obs, "selection.order", contents=False)


@pytest.mark.spec("selection.order")
@given(data=st.data())
def test_order(impl, data):
    run_check(check_order, impl, draw_case(data))
