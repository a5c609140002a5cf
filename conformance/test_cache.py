"""Conformance of spec/cache.md: the cache after prefill, and decoding from it.

Decode steps are fed drawn tokens (teacher forcing) rather than the argmax, so a near-tie in the
logits cannot make the implementation and the oracle decode different sequences.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_decisions,
    check_decode,
    check_kv,
    check_structure,
    observe,
    run_check,
    run_decode,
)
from rerouting.conformance.oracle.strategies import draw_case
from rerouting.conformance.protocol import check


def check_contents(impl, case):
    """Layer l caches exactly text + its stage's active visual tokens, in original order, from its own input."""
    obs = observe(impl, case)
    check_structure(obs)
    check_kv(obs, "cache.contents")
    check_decisions(obs)


@pytest.mark.spec("cache.contents")
@given(data=st.data())
def test_contents(impl, data):
    run_check(check_contents, impl, draw_case(data))


def _draw_decode(data):
    return data.draw(st.integers(1, 3), label="steps"), data.draw(st.integers(0, 2**16), label="token_seed")


def check_unrouted(impl, case, steps, token_seed):
    """A decoded token runs every layer densely against that layer's own cache: one entry more per layer per step."""
    run = run_decode(impl, case, steps, token_seed)
    kv = impl.decode_kv(run.outputs[-1])
    for b in range(len(run.obs.layouts)):
        for layer, entry in enumerate(kv[b]):
            before = len(run.obs.out.kv[b][layer].positions)
            after = len(entry.positions)
            check(
                after == before + steps,
                "cache.decode.unrouted",
                f"sample {b}, layer {layer}: {before} entries after prefill, {after} after {steps} decode steps "
                f"(expected {before + steps}: decode is never routed, nothing is re-selected or caught up)",
                observed=after,
                allowed=before + steps,
            )
    check_decode(run, "cache.decode.unrouted", kv=True)


@pytest.mark.spec("cache.decode.unrouted")
@given(data=st.data())
def test_unrouted(impl, data):
    case = draw_case(data)
    steps, seed = _draw_decode(data)
    run_check(check_unrouted, impl, case, steps=steps, token_seed=seed)


def check_decode_positions(impl, case, steps, token_seed):
    """Decoded tokens take positions T_b, T_b+1, ... (their cache entries, keys RoPE'd there, and logits)."""
    run = run_decode(impl, case, steps, token_seed)
    kv = impl.decode_kv(run.outputs[-1])
    for b, layout in enumerate(run.obs.layouts):
        expected = list(range(layout.length, layout.length + steps))
        for layer, entry in enumerate(kv[b]):
            tail = [int(p) for p in entry.positions.tolist()[-steps:]]
            check(
                tail == expected,
                "cache.decode.positions",
                f"sample {b}, layer {layer}: decoded tokens cached at positions {tail}, expected {expected} (T_b = {layout.length})",
            )
    check_decode(run, "cache.decode.positions", kv=True)


@pytest.mark.spec("cache.decode.positions")
@given(data=st.data())
def test_decode_positions(impl, data):
    case = draw_case(data)
    steps, seed = _draw_decode(data)
    run_check(check_decode_positions, impl, case, steps=steps, token_seed=seed)


def check_decode_equiv(impl, case, steps, token_seed):
    """Decoding from the cache == recomputing the routed forward over prompt + tokens with the same decisions."""
    run = run_decode(impl, case, steps, token_seed)
    check_decode(run, "cache.decode.equiv")


@pytest.mark.spec("cache.decode.equiv", "cache.decoding-strategy")  # greedy: the spec's tokens
@given(data=st.data())
def test_decode_equiv(impl, data):
    case = draw_case(data)
    steps, seed = _draw_decode(data)
    run_check(check_decode_equiv, impl, case, steps=steps, token_seed=seed)
