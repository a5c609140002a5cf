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

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerouting.conformance.oracle import (
    check_decisions,
    check_scores,
    check_structure,
    expect_error,
    observe,
    run_check,
)
from rerouting.conformance.oracle.hosts import HOST_CLASSES
from rerouting.conformance.oracle.strategies import SETTINGS, Case, HostSpec, draw_case, dtypes, layouts
from rerouting.conformance.protocol import check
from rerouting.reference import PRESETS, RoutingConfig, Schedule, Scorer
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace
from rerouting.reference.flops import spectral_flops
from rerouting.reference.schedule import ClseParams


@pytest.fixture(scope="module")
def impl(impl):
    """The implementation under test, if it has the CLSE scorer (its optional ``scorers`` attribute)."""
    if not impl.supports_scorer("clse"):
        pytest.skip(f"{impl.name} declares scorers {list(impl.impl.scorers)}, not 'clse'")
    return impl


def draw_clse_case(data, impl):
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
    reference_layer = data.draw(st.integers(0, 1), label="reference layer")
    params = dataclasses.replace(params, reference_layer=reference_layer)
    probe_layer = data.draw(st.sampled_from(["decision", "previous"]), label="probe layer")
    scorer = Scorer(kind="clse", probe_layer=probe_layer, clse=params)
    exact = 1 if variant == "clse" and stages == "first" else None
    first = reference_layer + 1
    case = draw_case(
        data, policy=policy, scorer=st.just(scorer), min_first_layer=first, exact_decisions=exact
    )
    qwen2 = HOST_CLASSES["qwen2-vl"]  # CLSE's published Qwen backbone, where the implementation takes it
    if (
        case.host.family == "qwen2.5-vl"
        and impl.supports_host(qwen2)
        and data.draw(st.booleans(), label="as Qwen2-VL")
    ):
        case = dataclasses.replace(case, host=dataclasses.replace(case.host, family="qwen2-vl"))
    return case


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


@pytest.mark.spec(
    "clse.scorer",
    "clse.grid",
    "clse.reference-layer",
    "clse.spectral",
    "clse.evolution",
    "clse.gate",
    "clse.images",
    "clse.stages",
    "clse.variants",
)
@given(data=st.data())
def test_clse(impl, data):
    run_check(check_clse, impl, draw_clse_case(data, impl))


def check_clse_errors(impl):
    """Bad CLSE parameters and configurations are errors naming their rule, never clamped or ignored."""
    three = Schedule((1, 2, 3), (0.5, 0.5, 0.5))
    cases = [
        ("clse.params", lambda: ClseParams(cutoff=0.0)),
        ("clse.params", lambda: ClseParams(variant="hybrid")),
        ("clse.scorer", lambda: Scorer(kind="attention", clse=ClseParams())),
        (
            "clse.reference-layer",
            lambda: RoutingConfig(three, scorer=Scorer(kind="clse", clse=ClseParams(reference_layer=1))),
        ),
        (
            "clse.stages",
            lambda: RoutingConfig(
                three, policy="remove", scorer=Scorer(kind="clse", clse=ClseParams(spectral_stages="every"))
            ),
        ),
        (
            "clse.variants",
            lambda: RoutingConfig(three, scorer=Scorer(kind="clse", clse=ClseParams(variant="clse"))),
        ),
    ]
    for rule, build in cases:
        expect_error(rule, f"an invalid CLSE setting ({rule})", build, must_mention=[rule])


@pytest.mark.spec("clse.params", "clse.scorer", "clse.reference-layer", "clse.stages", "clse.variants")
def test_clse_errors(impl):
    run_check(check_clse_errors, impl)


def check_clse_preset(impl, case, name):
    """A CLSE preset (Qwen2-VL ratios at [1, 10, 19]) runs as its schedule says; its spectral FLOPs are probe overhead."""
    obs = observe(impl, case)
    check_structure(obs)
    check_scores(obs, "clse.presets")
    check_decisions(obs)
    arch = ArchSpec.from_model(case.model())
    budget = budget_from_trace(obs.out.trace, arch, config=case.config)
    for b, sample in enumerate(budget.samples):
        for probe in sample.probes:
            expected = spectral_flops(arch, [sample.num_visual]) if probe.stage == 0 else None
            got = probe.flops.get("spectral")
            check(
                got == expected,
                "clse.flops",
                f"sample {b}, decision at layer {probe.layer}: spectral FLOPs {got}, expected {expected}",
                observed=got,
                allowed=expected,
            )


@pytest.mark.spec("clse.presets", "clse.flops")
@given(data=st.data())
def test_clse_presets(impl, data):
    name = data.draw(
        st.sampled_from(sorted(n for n in PRESETS if n.startswith("qwen2vl_") and "clse" in n)),
        label="preset",
    )
    host = HostSpec(
        num_layers=32, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16, grid=3
    )
    layout = data.draw(
        layouts(max_batch=1, min_images=1, max_images=2), label="layout"
    )  # 32 layers: keep it short
    case = Case(host, layout, PRESETS[name], dtype=data.draw(dtypes(), label="dtype"), device=SETTINGS.device)
    run_check(check_clse_preset, impl, case, name=name)
