"""Conformance of spec/cache.md "Cache policies": the retroactive cache after prefill, and decoding from it.

Drawn cases are re-run with ``cache="retroactive"``; the truth is the float64 reference under the same policy,
and the decode recompute is the routed forward over prompt + tokens in which the generated tokens see no visual
token outside the final selection (``conformance/oracle/decode.py`` ``recompute``).
"""

from __future__ import annotations

import dataclasses

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


@pytest.fixture(scope="module")
def impl(impl):
    """The implementation under test, if it has the retroactive cache policy (its ``cache_policies`` attribute)."""
    if not impl.supports_cache_policy("retroactive"):
        pytest.skip(
            f"{impl.name} declares cache policies {list(impl.impl.cache_policies)}, not 'retroactive'"
        )
    return impl


def retroactive(case):
    return dataclasses.replace(case, config=dataclasses.replace(case.config, cache="retroactive"))


def check_retroactive_lengths(obs) -> None:
    """Every layer holds text + (final selection ∩ that layer's active set), nothing else."""
    for b, (sample, layout) in enumerate(zip(obs.out.trace.samples, obs.layouts)):
        final = set(sample.decisions[-1].selected) if sample.decisions else None
        for layer, entry in enumerate(obs.out.kv[b]):
            active = set(sample.active_visual[layer])
            kept = active if final is None else active & final
            expected = sorted(set(layout.text) | {layout.visual[i] for i in kept})
            positions = [int(p) for p in entry.positions.tolist()]
            check(
                positions == expected,
                "cache.policy.retroactive",
                f"sample {b}, layer {layer}: cache positions {positions}, expected text + final selection {expected}",
                observed=len(positions),
                allowed=len(expected),
            )


def check_retroactive(impl, case, steps, token_seed):
    """The retroactive cache: lengths and entries after prefill, then decode == the recompute under the same rule."""
    obs = observe(impl, case)
    check_structure(obs)
    check_retroactive_lengths(obs)
    check_kv(obs, "cache.policy.retroactive")
    check_decisions(obs)
    check_decode(run_decode(impl, case, steps, token_seed), "cache.policy.retroactive", kv=True)


@pytest.mark.spec("cache.policy", "cache.policy.retroactive")
@given(data=st.data())
def test_retroactive(impl, data):
    case = retroactive(draw_case(data))
    seed = data.draw(st.integers(0, 2**16), label="token_seed")
    run_check(check_retroactive, impl, case, steps=1, token_seed=seed)  # one step: the cut is what is new
