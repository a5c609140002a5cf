"""The contract decisions of 0.1.1 (issue 17): the other guess of each is now caught, by the rule's name.

Each mutant is the reference with the guess the spec now rules out; the property of
``rerouting.conformance.test_contract`` (or the suite's own) must fail on a fixed case naming the rule.
Also: ``rerouting.conformance.protocol`` exports the whole contract, and its table of accepted error
rules is the spec's.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import pytest
import torch

from rerouting.conformance import protocol
from rerouting.conformance.impls import Checked, ReferenceImpl
from rerouting.conformance.oracle.strategies import Case, HostSpec, Layout
from rerouting.conformance.protocol import ConformanceFailure
from rerouting.conformance.test_contract import (
    check_count_text_only,
    check_error_ids,
    check_forced,
    check_kernels,
    check_pixel_values,
    check_random_without_text,
    check_score_dtype,
    check_snapshot,
)
from rerouting.conformance.test_scoring import check_variant_layer
from rerouting.reference import RoutingConfig, RoutingError, Schedule, Scorer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HOST = HostSpec(num_layers=3, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16)
LAYOUT = Layout(((2, 1), (1, 0, 2)), "left", 3)  # one and two images (4 visual tokens each), left padded


TWO_DECISIONS, PROBE = Schedule((1, 2), (0.5, 0.5)), Scorer()


def case(schedule=TWO_DECISIONS, scorer=PROBE, layout=LAYOUT, policy="remove", dtype="float32"):
    return Case(HOST, layout, RoutingConfig(schedule, policy=policy, scorer=scorer), dtype=dtype)


COUNT_WITH_TEXT_ONLY = case(Schedule((1,), (2,), unit="count"), layout=Layout(((2, 1), (3,)), "right", 1))
RANDOM_NO_TEXT = case(scorer=Scorer(kind="random", seed=5), layout=Layout(((0, 0), (1, 0)), "left", 2))
PREVIOUS = case(Schedule((1,), (0.5,)), scorer=Scorer(probe_layer="previous"))


def failure(check_fn, impl, *args, **kwargs) -> ConformanceFailure:
    with pytest.raises(ConformanceFailure) as caught:
        check_fn(Checked(impl), *args, **kwargs)
    return caught.value


def _has_image(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == HOST.llava_config().image_token_id).any(dim=1)


# ---------------------------------------------------------------------------------------------
# Mutants: the reference with the other guess
# ---------------------------------------------------------------------------------------------


class UncheckedForced(ReferenceImpl):
    """Takes any forced selection as given (Decision.k = len(forced), no pool check)."""

    def prefill(self, model, config, input_ids, attention_mask, pixel_values, *, forced_selection=None):
        import rerouting.reference.routing as routing

        original = routing.forced_choice
        routing.forced_choice = lambda forced, pool, k, layer: tuple(sorted(set(forced)))
        try:
            return super().prefill(
                model, config, input_ids, attention_mask, pixel_values, forced_selection=forced_selection
            )
        finally:
            routing.forced_choice = original


class RecordsPreviousLayer(ReferenceImpl):
    """Under probe_layer='previous' records Decision.layer = d_s - 1."""

    def prefill(self, *args, **kwargs):
        out = super().prefill(*args, **kwargs)
        samples = tuple(
            dataclasses.replace(
                s, decisions=tuple(dataclasses.replace(d, layer=d.layer - 1) for d in s.decisions)
            )
            for s in out.trace.samples
        )
        return dataclasses.replace(out, trace=dataclasses.replace(out.trace, samples=samples))


class CountRefusesTextOnly(ReferenceImpl):
    """A count schedule is an error for a text-only sample (N = 0 < k)."""

    def prefill(self, model, config, input_ids, *args, **kwargs):
        if config.schedule.unit == "count" and not bool(_has_image(input_ids).all()):
            raise RoutingError("schedule.keep-count", "keep count 2 exceeds the sample's N=0")
        return super().prefill(model, config, input_ids, *args, **kwargs)


class RandomRefusesNoText(ReferenceImpl):
    """The random scorer refuses a sample without text, as the probe does."""

    def prefill(self, model, config, input_ids, attention_mask, *args, **kwargs):
        is_text = (input_ids != HOST.llava_config().image_token_id) & attention_mask.bool()
        if not bool(is_text.any(dim=1).all()):
            raise RoutingError("scoring.probe.query-row", "the sample has no text token")
        return super().prefill(model, config, input_ids, attention_mask, *args, **kwargs)


class Float32Scores(ReferenceImpl):
    """Records float32 scores in a float64 run."""

    def prefill(self, *args, **kwargs):
        out = super().prefill(*args, **kwargs)
        samples = tuple(
            dataclasses.replace(
                s, decisions=tuple(dataclasses.replace(d, scores=d.scores.float()) for d in s.decisions)
            )
            for s in out.trace.samples
        )
        return dataclasses.replace(out, trace=dataclasses.replace(out.trace, samples=samples))


class DropsExtraImages(ReferenceImpl):
    """Takes as many images as the placeholders need and silently ignores the rest."""

    def prefill(self, model, config, input_ids, attention_mask, pixel_values, **kwargs):
        needed = int((input_ids == HOST.llava_config().image_token_id).sum()) // HOST.tokens_per_image
        return super().prefill(model, config, input_ids, attention_mask, pixel_values[:needed], **kwargs)


class LivePrefillKV(ReferenceImpl):
    """PrefillOutput.kv follows decode's extension."""

    def decode_step(self, model, config, prefill, tokens, step):
        out = super().decode_step(model, config, prefill, tokens, step)
        for b, sample in enumerate(out.kv):
            prefill.kv[b][:] = sample
        return out


class UnnamedErrors(ReferenceImpl):
    """Refuses bad inputs with messages that name no rule."""

    def prefill(self, *args, **kwargs):
        try:
            return super().prefill(*args, **kwargs)
        except RoutingError as error:
            raise ValueError(re.sub(r"\s*\[rule [^\]]+\]", "", str(error))) from None


class UncheckedKernel(ReferenceImpl):
    """Runs under the host's kernel without checking it: a kernel it does not know crashes."""

    def prefill(self, model, *args, **kwargs):
        kernel = model.config.get_text_config()._attn_implementation
        if kernel not in protocol.SUPPORTED_ATTENTION:
            raise RuntimeError(f"{kernel} does not take an additive mask")
        return super().prefill(model, *args, **kwargs)


class ChangesKernel(ReferenceImpl):
    """Sets the host to eager for good."""

    def prefill(self, model, *args, **kwargs):
        out = super().prefill(model, *args, **kwargs)
        model.set_attn_implementation({"text_config": "eager"})
        return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_reference_passes_the_contract_cases():
    reference = Checked(ReferenceImpl())
    check_forced(reference, case(), seed=1)
    check_variant_layer(reference, PREVIOUS)
    check_count_text_only(reference, COUNT_WITH_TEXT_ONLY)
    check_random_without_text(reference, RANDOM_NO_TEXT)
    check_score_dtype(reference, case())
    check_pixel_values(reference, case())
    check_snapshot(reference, case(), steps=2)
    check_error_ids(reference, case())
    check_kernels(reference, case())


@pytest.mark.spec("selection.forced")
def test_forced_selection_outside_the_pool_is_caught():
    assert failure(check_forced, UncheckedForced(), case(), seed=1).rule == "selection.forced"


@pytest.mark.spec("scoring.probe.variant-layer")
def test_previous_layer_recorded_as_decision_layer_is_caught():
    assert (
        failure(check_variant_layer, RecordsPreviousLayer(), PREVIOUS).rule == "scoring.probe.variant-layer"
    )


@pytest.mark.spec("schedule.keep-count", "layout.text-only")
def test_count_error_on_text_only_sample_is_caught():
    assert (
        failure(check_count_text_only, CountRefusesTextOnly(), COUNT_WITH_TEXT_ONLY).rule
        == "schedule.keep-count"
    )


@pytest.mark.spec("scoring.probe.query-row", "scoring.scorer.random")
def test_random_scorer_refusing_no_text_is_caught():
    assert (
        failure(check_random_without_text, RandomRefusesNoText(), RANDOM_NO_TEXT).rule
        == "scoring.probe.query-row"
    )


@pytest.mark.spec("scoring.probe.dtype")
def test_float32_scores_in_a_float64_run_are_caught():
    assert failure(check_score_dtype, Float32Scores(), case()).rule == "scoring.probe.dtype"


@pytest.mark.spec("layout.pixel-values", "layout.visual-set")
def test_extra_images_ignored_are_caught():
    assert failure(check_pixel_values, DropsExtraImages(), case()).rule == "layout.pixel-values"


@pytest.mark.spec("cache.snapshot")
def test_prefill_kv_following_decode_is_caught():
    assert failure(check_snapshot, LivePrefillKV(), case(), steps=2).rule == "cache.snapshot"


@pytest.mark.spec("routing.errors.ids")
def test_errors_naming_no_rule_are_caught():
    assert failure(check_error_ids, UnnamedErrors(), case()).rule == "routing.errors.ids"


@pytest.mark.spec("routing.kernels")
@pytest.mark.parametrize("mutant", [UncheckedKernel, ChangesKernel])
def test_unchecked_kernels_are_caught(mutant):
    assert failure(check_kernels, mutant(), case()).rule == "routing.kernels"


@pytest.mark.spec("routing.errors.ids")
def test_error_rules_are_the_spec_table():
    """protocol.ERROR_RULES is spec/routing.md's table under routing.errors.ids, key for key."""
    text = resources.files("rerouting.spec").joinpath("routing.md").read_text(encoding="utf-8")
    table = {}
    for line in text.split("**[routing.errors.ids]**")[1].split("**[routing.kernels]**")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            table[cells[0].strip("`")] = tuple(re.findall(r"`([a-z0-9.-]+)`", cells[2]))
    assert table == protocol.ERROR_RULES


def test_protocol_exports_the_contract():
    """Every type an implementation touches is importable from the protocol, and is the reference's own."""
    import rerouting.reference as reference

    for name in ("Trace", "SampleTrace", "Decision", "RoutingConfig", "Schedule", "Scorer", "RoutingError"):
        assert getattr(protocol, name) is getattr(reference, name), name
    for name in ("Implementation", "PrefillOutput", "DecodeOutput", "LayerKV", "ForcedSelection"):
        assert name in protocol.__all__, name
    assert all(hasattr(protocol, name) for name in protocol.__all__)
