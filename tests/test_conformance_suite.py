"""Tests of the conformance suite: deliberately broken implementations (mutants) are caught, by the right rule.

Each mutant is the reference with one bug planted (one of its module-level functions replaced while it
runs, or its output doctored). The properties of ``rerouting.conformance`` are called directly on a
fixed case where the bug must show, and the failure must name the rule the bug breaks. One mutant also
runs through ``rerouting conform`` (``conformance.cli.main``) with ``--impl module:object`` to check the
plumbing: loading by name, the exit code and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rerouting.conformance.cli import main as conform
from rerouting.conformance.impls import Checked, ReferenceImpl
from rerouting.conformance.oracle.strategies import Case, HostSpec, Layout, draw_case, hosts, layouts
from rerouting.conformance.protocol import CapabilityMissing, ConformanceFailure, LayerKV
from rerouting.conformance.test_budget import check_flops_true, check_kv_bytes
from rerouting.conformance.test_cache import check_decode_positions
from rerouting.conformance.test_routing import (
    check_causal,
    check_output,
    check_positions,
    check_readmit,
    check_remove_as_reroute,
)
from rerouting.conformance.test_scoring import check_random
from rerouting.conformance.test_selection import check_tiebreak, check_topk
from rerouting.reference import RoutingConfig, Schedule, Scorer, Trace
from rerouting.reference.compat import call_layer, layer_cache_argument
from rerouting.reference.host import causal_mask as true_causal_mask
from rerouting.reference.host_qwen import mrope_release_ok

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


HOST = HostSpec(
    num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=40, grid=3
)
LAYOUT = Layout(((3, 4), (2, 3, 2)), "left", 7)  # text before and after one and two images, left padded


TWO_DECISIONS = Schedule((1, 2), (0.5, 0.5))


def case(schedule=TWO_DECISIONS, policy="reroute", host=HOST, layout=LAYOUT) -> Case:
    return Case(host, layout, RoutingConfig(schedule, policy=policy))


@contextlib.contextmanager
def patched(module: str, name: str, value):
    target = importlib.import_module(module)
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield original
    finally:
        setattr(target, name, original)


class Patched(ReferenceImpl):
    """The reference with ``module.name`` replaced by ``replacement(original)`` during prefill and decode."""

    module, attr = "rerouting.reference.routing", ""

    def replacement(self, original):
        raise NotImplementedError

    def _patch(self):
        target = importlib.import_module(self.module)
        return patched(self.module, self.attr, self.replacement(getattr(target, self.attr)))

    def prefill(self, *args, **kwargs):
        with self._patch():
            return super().prefill(*args, **kwargs)

    def decode_step(self, *args, **kwargs):
        with self._patch():
            return super().decode_step(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Mutants
# ---------------------------------------------------------------------------------------------


class NoCausalMask(Patched):
    """Block_l attends to the whole active set: the mask is dropped (the release's eager-attention bug)."""

    name, attr = "no-causal-mask", "causal_mask"

    def replacement(self, original):
        return lambda positions, keys, dtype: torch.zeros(1, 1, len(positions), len(keys), dtype=dtype)


class RenumberedPositions(Patched):
    """Active tokens are renumbered 0..n-1 for RoPE, PDrop-style, instead of keeping their original ids."""

    name, attr = "renumbered-positions", "run_block"

    def replacement(self, original):
        def run_block(host, layer, hidden, active, cache):
            idx = torch.tensor(active)
            x = hidden[idx][None]
            positions = torch.arange(len(active))[None]  # the bug: gaps closed
            cos, sin = host.rotary_embeddings(x, positions)
            out = call_layer(
                layer,
                x,
                attention_mask=true_causal_mask(idx, idx, x.dtype),
                position_ids=positions,
                position_embeddings=(cos, sin),
                cache=cache,
            )
            result = hidden.clone()
            result[idx] = out[0]
            return result

        return run_block


class OneDRotaryOnQwen(Patched):
    """Rotary at each active token's rank on every axis (1-D RoPE), not the host's 3-D mRoPE ids.

    Right on LLaVA (1-D RoPE: the rank is the position id), wrong on Qwen2.5-VL after any image of more
    than one token (its h/w ids follow the image grid, and text after it continues at max id + 1).
    """

    name, attr = "one-d-rotary-on-qwen", "run_block"

    def replacement(self, original):
        def run_block(host, layer, hidden, active, cache):
            if getattr(host, "rotary_axes", 1) != 3:
                return original(host, layer, hidden, active, cache)
            idx = torch.tensor(active)
            x = hidden[idx][None]
            positions = idx[None]
            cos, sin = host.rotary(x, positions[None].expand(3, -1, -1))  # the bug: ranks on t, h and w
            out = call_layer(
                layer,
                x,
                attention_mask=true_causal_mask(idx, idx, x.dtype),
                position_ids=positions,
                position_embeddings=(cos, sin),
                cache=cache,
            )
            result = hidden.clone()
            result[idx] = out[0]
            return result

        return run_block


class ImplicitCausalMask(Patched):
    """Block_l gets ``attention_mask=None`` and leaves causality to the kernel: SDPA's implicit causal mask.

    Runs under the host's own kernel (as an outside implementation does) and calls the layer directly,
    past ``call_layer``'s guard. Exact under SDPA (one unpadded sample, active rows ascending); under
    eager attention there is then no mask at all.
    """

    name, attr = "implicit-causal-mask", "run_block"

    def prefill(self, model, config, *args, **kwargs):
        kernel = model.config.get_text_config()._attn_implementation
        return super().prefill(model, config, *args, attention=kernel, **kwargs)

    def replacement(self, original):
        def run_block(host, layer, hidden, active, cache):
            idx = torch.tensor(active)
            x = hidden[idx][None]
            cos, sin = host.rotary_embeddings(x, idx[None])
            out = layer(  # the bug: no mask, and no is_causal request either
                x,
                attention_mask=None,
                position_ids=idx[None],
                use_cache=True,
                position_embeddings=(cos, sin),
                **{layer_cache_argument(type(layer)): cache},
            )
            result = hidden.clone()
            result[idx] = out[0]
            return result

        return run_block


class HighIndexTiebreak(Patched):
    """Equal scores go to the higher visual index (torch.topk leaves ties implementation-defined)."""

    name, attr = "high-index-tiebreak", "select_topk"

    def replacement(self, original):
        def select_topk(scores, pool, k):
            values = scores.tolist()
            return tuple(sorted(sorted(pool, key=lambda i: (-values[i], -i))[:k]))

        return select_topk


class ProbeRunsWholeLayer(Patched):
    """The probe runs the decision layer's full forward (as hook-based toolkits do) and discards it."""

    name, attr = "probe-runs-whole-layer", "attention_scores"
    module = "rerouting.reference.scoring"  # the registered attention scorer calls it from there

    def replacement(self, original):
        def attention_scores(host, layer, hidden, keys, queries, visual, score_dtype):
            idx = torch.tensor(list(keys))
            x = hidden[idx][None]
            cos, sin = host.rotary_embeddings(x, idx[None])
            layer(x, attention_mask=true_causal_mask(idx, idx, x.dtype), position_embeddings=(cos, sin))
            return original(host, layer, hidden, keys, queries, visual, score_dtype)

        return attention_scores


class JitteredScores(Patched):
    """Scores times (1 + eps·r), r ~ U(-1, 1), then the top-k of those: a conforming implementation for small eps."""

    module, attr = "rerouting.reference.scoring", "attention_scores"

    def __init__(self, eps: float):
        super().__init__()
        self.eps, self.name = eps, f"jittered-scores-{eps:g}"
        self.generator = torch.Generator().manual_seed(0)

    def replacement(self, original):
        def attention_scores(host, layer, hidden, keys, queries, visual, score_dtype):
            scores = original(host, layer, hidden, keys, queries, visual, score_dtype)
            noise = torch.rand(scores.shape, generator=self.generator, dtype=torch.float64) * 2 - 1
            return (scores.double() * (1 + self.eps * noise)).to(scores.dtype)

        return attention_scores


class NoReadmission(ReferenceImpl):
    """Reroute that re-admits nothing: remove's computation, with a trace doctored to look like reroute's."""

    name = "no-readmission"

    def prefill(self, model, config, *args, **kwargs):
        out = super().prefill(model, config.with_policy("remove"), *args, **kwargs)
        samples = []
        for sample in out.trace.samples:
            decisions = tuple(
                dataclasses.replace(d, pool=tuple(range(sample.num_visual)), probe_keys=sample.seq_len)
                for d in sample.decisions
            )
            samples.append(dataclasses.replace(sample, decisions=decisions))
        out.trace = Trace(policy="reroute", num_layers=out.trace.num_layers, samples=tuple(samples))
        return out


class RandomScorerProbeSizes(ReferenceImpl):
    """Under the random scorer, records the attention probe's sizes (every token, one query row) anyway."""

    name = "random-scorer-probe-sizes"

    def prefill(self, *args, **kwargs):
        out = super().prefill(*args, **kwargs)
        samples = tuple(
            dataclasses.replace(
                sample,
                decisions=tuple(
                    dataclasses.replace(d, probe_keys=sample.seq_len, probe_queries=1)
                    for d in sample.decisions
                ),
            )
            for sample in out.trace.samples
        )
        out.trace = dataclasses.replace(out.trace, samples=samples)
        return out


class DecodePositionsFromCacheLength(ReferenceImpl):
    """Decoded tokens are placed after each sample's last-layer cache length instead of after T_b."""

    name = "decode-positions-from-cache-length"

    def decode_step(self, model, config, prefill, tokens, step):
        _, result = prefill.state
        lengths = [c.length for c in result.caches]
        for c in result.caches:
            c.length = len(c.positions[-1])  # the bug: a routed layer's (shorter) cache length
        try:
            return super().decode_step(model, config, prefill, tokens, step)
        finally:
            for c, n in zip(result.caches, lengths):
                c.length = n


class PaddedCache(ReferenceImpl):
    """Keeps one unused padding slot per layer in the K/V tensors it reports for a sample."""

    name = "padded-cache"

    def prefill(self, *args, **kwargs):
        out = super().prefill(*args, **kwargs)
        pad = lambda t: torch.cat([t, torch.zeros_like(t[:, :1])], dim=1)  # noqa: E731
        out.kv = [[LayerKV(pad(kv.keys), pad(kv.values), kv.positions) for kv in layers] for layers in out.kv]
        return out


class NoForcedSelection:
    """A complete implementation except for forced_selection."""

    name = "no-forced-selection"

    def __init__(self):
        self.inner = ReferenceImpl()

    def prefill(self, model, config, input_ids, attention_mask, pixel_values):
        return self.inner.prefill(model, config, input_ids, attention_mask, pixel_values)

    def decode_step(self, *args):
        return self.inner.decode_step(*args)


# ---------------------------------------------------------------------------------------------
# The suite catches each mutant by the rule it breaks
# ---------------------------------------------------------------------------------------------


def failure(check, impl, *args, **kwargs) -> ConformanceFailure:
    with pytest.raises(ConformanceFailure) as caught:
        check(Checked(impl), *args, **kwargs)
    return caught.value


def test_reference_passes_the_same_cases():
    """The fixed cases below are sound: the reference itself passes them."""
    reference = Checked(ReferenceImpl())
    check_causal(reference, case())
    check_positions(reference, case(Schedule((1,), (0.25,))))
    check_readmit(reference, case(Schedule((1, 2), (0.25, 0.25))))
    check_tiebreak(reference, case(host=dataclasses.replace(HOST, ties="exact")))
    check_decode_positions(reference, case(), steps=2, token_seed=3)
    check_kv_bytes(reference, case())


def test_near_tie_choices_are_accepted():
    """Inside the near-tie band any valid top-k passes, and the forward is then judged under that choice."""
    near = case(Schedule((1, 2), (0.34, 0.34)), host=dataclasses.replace(HOST, ties="near-7"))
    jittered = JitteredScores(2.0**-24)  # one fp32 rounding's worth: flips the order of near-tied scores
    check_topk(Checked(jittered), near)
    check_output(Checked(jittered), near)
    reference = Checked(ReferenceImpl()).prefill(near.model(), near.config, **near.inputs())
    mine = Checked(jittered).prefill(near.model(), near.config, **near.inputs())
    selections = [[d.selected for d in s.decisions] for s in (reference.trace.samples + mine.trace.samples)]
    assert selections[: len(selections) // 2] != selections[len(selections) // 2 :], (
        "the jitter flipped no decision"
    )


def test_scores_off_by_more_than_the_band_are_caught():
    error = failure(check_topk, JitteredScores(0.05), case())
    assert error.rule in ("selection.topk", "scoring.probe.softmax"), error


def test_dropped_causal_mask_is_caught():
    assert failure(check_causal, NoCausalMask(), case()).rule == "routing.active.causal"


@pytest.mark.spec("routing.active.causal")
def test_implicit_causal_mask_is_caught_on_an_eager_host():
    """``attention_mask=None`` passes on an SDPA host (its implicit causal mask) and fails on an eager one."""
    check_causal(Checked(ImplicitCausalMask()), case(host=dataclasses.replace(HOST, attention="sdpa")))
    eager = case(host=dataclasses.replace(HOST, attention="eager"))
    assert failure(check_causal, ImplicitCausalMask(), eager).rule == "routing.active.causal"


def test_renumbered_positions_are_caught():
    assert (
        failure(check_positions, RenumberedPositions(), case(Schedule((1,), (0.25,)))).rule
        == "routing.active.positions"
    )


@pytest.mark.skipif(
    not mrope_release_ok(), reason="this transformers has the Qwen mRoPE bug: no Qwen case is drawn"
)
def test_one_d_rotary_on_qwen_is_caught_through_the_drawn_cases():
    """The drawn cases (both host families) catch 1-D positions on Qwen2.5-VL, and only there."""
    impl, caught, families = Checked(OneDRotaryOnQwen()), [], []

    @settings(
        max_examples=12,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data):
        drawn = draw_case(
            data, host=hosts(ties=st.just("none")), layout=layouts(text_after_image=True), unit="ratio"
        )
        families.append(drawn.host.family)
        try:
            check_positions(impl, drawn)
        except ConformanceFailure as error:
            caught.append((drawn.host.family, error.rule))

    run()
    assert {"llava", "qwen2.5-vl"} <= set(families), families
    assert caught, "the drawn Qwen2.5-VL cases did not catch 1-D positions"
    assert all(c == ("qwen2.5-vl", "routing.active.positions") for c in caught), caught


def test_missing_readmission_is_caught():
    error = failure(check_readmit, NoReadmission(), case(Schedule((1, 2), (0.25, 0.25))))
    assert error.rule == "selection.topk", (
        error
    )  # a deferred token the probe ranks first is never re-selected


@pytest.mark.spec("budget.flops.probe")
def test_probe_sizes_under_the_random_scorer_are_caught():
    random = dataclasses.replace(
        case(), config=RoutingConfig(TWO_DECISIONS, scorer=Scorer(kind="random", seed=5))
    )
    check_random(Checked(ReferenceImpl()), random)
    error = failure(check_random, RandomScorerProbeSizes(), random)
    assert error.rule == "budget.flops.probe" and "probe_keys=" in str(error), error


def test_wrong_tiebreak_is_caught():
    tied = case(host=dataclasses.replace(HOST, ties="exact"))
    assert failure(check_tiebreak, HighIndexTiebreak(), tied).rule == "selection.tiebreak"


def test_wasted_layer_forward_in_probe_is_caught():
    one = case(layout=Layout(((3, 4),), "left", 7))  # FLOP parity runs batches of one
    error = failure(check_flops_true, ProbeRunsWholeLayer(), one)
    assert error.rule == "budget.flops.true" and "FlopCounterMode" in str(error), error


def test_wrong_decode_positions_are_caught():
    error = failure(check_decode_positions, DecodePositionsFromCacheLength(), case(), steps=2, token_seed=3)
    assert error.rule == "cache.decode.positions", error


def test_padded_cache_bytes_are_caught():
    assert failure(check_kv_bytes, PaddedCache(), case()).rule == "budget.kv.bytes"


def test_missing_capability_fails_by_name():
    with pytest.raises(CapabilityMissing, match="forced_selection is not implemented by no-forced-selection"):
        check_remove_as_reroute(Checked(NoForcedSelection()), case(Schedule((1, 2), (0.5, 0.25))))


def test_conform_cli_reports_a_mutant(tmp_path):
    """``rerouting conform --impl module:object`` exits non-zero and its report names the broken rule."""
    code = conform(
        [
            "--impl",
            f"{__name__}:NoCausalMask",
            "--out",
            str(tmp_path),
            "--profile",
            "ci",
            "--max-examples",
            "5",
            "-k",
            "test_causal",
        ]
    )
    assert code == 1, code
    report = json.loads((tmp_path / "report.json").read_text())
    assert (
        report["summary"]["failed"] == 1 and report["rules"]["routing.active.causal"]["status"] == "failed"
    ), report
    (failure_record,) = report["failures"]
    assert failure_record["rule"] == "routing.active.causal", failure_record
    assert "NoCausalMask" in failure_record["reproducer"] and "check_causal" in failure_record["reproducer"]
    assert "routing.active.causal" in (tmp_path / "report.md").read_text()


def test_conform_cli_reference_passes(tmp_path):
    code = conform(
        [
            "--impl",
            "reference",
            "--out",
            str(tmp_path),
            "--max-examples",
            "2",
            "-k",
            "test_meta or test_order",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["failed"] == 0 and report["summary"]["passed"] >= 2, report["summary"]
