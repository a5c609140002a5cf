"""The Qwen3-family conformance properties (conformance/test_hosts_qwen3.py) catch probes that skip the layer's parts.

Each mutant is the reference with the probe of a LLaMA-style host: no q/k norm (wrong on Qwen3-VL and Qwen3.5),
or the whole gated ``q_proj`` output read as queries (wrong on Qwen3.5). The property must fail on a fixed
case of each family, naming the Qwen3 rule; and on the drawn cases it must fail only where the bug shows.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rerouting.conformance.impls import Checked, ReferenceImpl
from rerouting.conformance.oracle.hosts import QWEN3_SERVED
from rerouting.conformance.oracle.strategies import Case, HostSpec, Layout
from rerouting.conformance.protocol import ConformanceFailure
from rerouting.conformance.test_hosts_qwen3 import check_qwen3_routing, qwen3_case
from rerouting.reference import AttentionParts, RoutingConfig, Schedule
from rerouting.reference.host import DecoderHost

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(len(QWEN3_SERVED) < 2, reason="this transformers serves no Qwen3-family host"),
]

LAYOUT = Layout(((2, 3), (1, 2, 2)), "left", 5, (((4, 4),), ((2, 4), (4, 2))))


def qwen3(family: str, layers: tuple[int, ...], linear: str = "dense") -> Case:
    host = HostSpec(
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=40,
        grid=0,
        family=family,
    )
    return Case(host, LAYOUT, RoutingConfig(Schedule(layers, (0.5,) * len(layers)), linear_attention=linear))


class PartsMutant(ReferenceImpl):
    """The reference with ``DecoderHost.attention_parts`` losing some of the layer's parts."""

    name = "parts-mutant"

    def parts(self, parts: AttentionParts) -> AttentionParts:
        raise NotImplementedError

    @contextlib.contextmanager
    def _patched(self):
        original = DecoderHost.attention_parts
        DecoderHost.attention_parts = lambda host, layer: self.parts(original(host, layer))
        try:
            yield
        finally:
            DecoderHost.attention_parts = original

    def prefill(self, *args, **kwargs):
        with self._patched():
            return super().prefill(*args, **kwargs)


class NoQKNorm(PartsMutant):
    """The probe skips q_norm and k_norm (the project's probe before the Qwen3 hosts)."""

    name = "no-qk-norm"

    def parts(self, parts):
        return AttentionParts(parts.input_norm, parts.q_proj, parts.k_proj, parts.head_dim, parts.scaling)


class WholeGatedQuery(PartsMutant):
    """The probe reads the query rows of a gated ``q_proj`` as ``[2H, hd]``: half its heads are gates."""

    name = "whole-gated-query"

    def parts(self, parts):
        return AttentionParts(
            parts.input_norm,
            parts.q_proj,
            parts.k_proj,
            parts.head_dim,
            parts.scaling,
            q_norm=parts.q_norm,
            k_norm=parts.k_norm,
            query_gate=False,
        )


def failure(mutant, case) -> ConformanceFailure:
    with pytest.raises(ConformanceFailure) as error:
        check_qwen3_routing(Checked(mutant), case)
    return error.value


@pytest.mark.parametrize(
    ("mutant", "case", "rule"),
    [
        (NoQKNorm(), qwen3("qwen3-vl", (2, 3)), "hosts.qk-norm"),
        (NoQKNorm(), qwen3("qwen3.5", (1, 3)), "hosts.linear.semantics"),
        (WholeGatedQuery(), qwen3("qwen3.5", (1, 3), "bypass"), "hosts.linear.semantics"),
    ],
)
def test_probes_without_the_layers_parts_are_caught(mutant, case, rule):
    assert failure(mutant, case).rule == rule
    check_qwen3_routing(Checked(ReferenceImpl()), case)  # the reference itself passes the same case


def test_no_qk_norm_is_caught_through_the_drawn_cases():
    impl, caught, families = Checked(NoQKNorm()), [], []

    @settings(
        max_examples=8,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data):
        case = qwen3_case(data, impl)
        families.append(case.host.family)
        try:
            check_qwen3_routing(impl, case)
        except ConformanceFailure as error:
            caught.append(error.rule)

    run()
    assert caught, f"the drawn Qwen3 cases ({families}) did not catch a probe without q/k norm"
    assert set(caught) <= {"hosts.qk-norm", "hosts.linear.semantics", "selection.topk"}, caught
