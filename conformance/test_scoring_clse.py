"""Conformance of spec/clse.md: the CLSE scorer's scores and decisions against the float64 truth.

The near-tie band is the probe's (``oracle/scores.py``): ``β = 2·e_plain + floor``, with ``e_plain`` the
largest score error of the yardstick family over the example. For a CLSE score the yardsticks run the whole
pipeline (states, spectral high-pass, evolution, standardisation, gate, product with the attention) in the
arithmetic under test (the float32 reference, SDPA and eager) and under Monte Carlo rounding of every Linear and
norm, so ``e_plain`` measures the gate's amplification of state errors (``g(1-g)/τ <= 1/(4τ)`` per unit of
standardised evolution) rather than bounding it; the floor stays the probe's rounding after the logits (the gate
is at most 1, so the product adds no more than one rounding of the score). Measured: 80 examples per dtype
pass (float32, bfloat16).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import check_decisions, check_scores, check_structure, observe, run_check
from rerouting.conformance.oracle.strategies import draw_case
from rerouting.conformance.protocol import check
from rerouting.reference import Scorer
from rerouting.reference.schedule import ClseParams


def draw_clse_case(data):
    """A case scored by CLSE: any variant, both probe layers, both policies, the spectral stages each allows."""
    policy = data.draw(st.sampled_from(["reroute", "remove"]), label="policy")
    variant = data.draw(st.sampled_from(["clse_attn", "clse", "attn"]), label="clse variant")
    stages = (
        data.draw(st.sampled_from(["first", "every"]), label="spectral stages")
        if policy == "reroute"
        else "first"
    )
    params = ClseParams(
        cutoff=data.draw(st.sampled_from([0.1, 0.5]), label="cutoff"), variant=variant, spectral_stages=stages
    )
    probe_layer = data.draw(st.sampled_from(["decision", "previous"]), label="probe layer")
    scorer = Scorer(kind="clse", probe_layer=probe_layer, clse=params)
    exact = 1 if variant == "clse" and stages == "first" else None
    return draw_case(data, policy=policy, scorer=st.just(scorer), min_first_layer=1, exact_decisions=exact)


def check_clse(impl, case):
    """CLSE scores within the band of the truth, decisions equal outside the near-tie band, probe sizes per variant."""
    obs = observe(impl, case)
    check_structure(obs)
    check_scores(obs, "clse.scorer")
    check_decisions(obs)
    params = case.config.scorer.clse
    if params is None:  # the case fell back to the default probe (a one-layer host)
        return
    for b, sample in enumerate(obs.out.trace.samples):
        for d in sample.decisions:
            sizes = (int(d.probe_keys), int(d.probe_queries))
            if params.variant == "clse":
                check(
                    sizes == (0, 0),
                    "clse.variants",
                    f"sample {b}, decision at layer {d.layer}: variant 'clse' runs no probe, but the trace records {sizes}",
                    observed=sizes,
                    allowed=(0, 0),
                )


@pytest.mark.spec("clse.scorer", "clse.spectral", "clse.evolution", "clse.gate", "clse.images", "clse.stages")
@given(data=st.data())
def test_clse(impl, data):
    run_check(check_clse, impl, draw_clse_case(data))
