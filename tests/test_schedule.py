"""Schedule validation, keep targets and presets (spec/schedule.md)."""

from __future__ import annotations

import pytest

from rerouting.reference import PRESETS, Reference, RoutingConfig, RoutingError, Schedule, preset


@pytest.mark.spec("schedule.keep-ratio")
@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(RoutingError, match=r"keep ratio .* outside \(0, 1\].*schedule\.keep-ratio"):
        Schedule((2,), (ratio,))


@pytest.mark.spec("schedule.keep-ratio")
@pytest.mark.parametrize(
    ("n", "ratio", "k"), [(576, 0.2644, 152), (576, 0.01916, 11), (10, 0.05, 1), (7, 1.0, 7)]
)
def test_keep_ratio_is_floor_of_original_n_at_least_one(n, ratio, k):
    assert Schedule((1,), (ratio,)).keep_count(0, n) == k


@pytest.mark.spec("schedule.decision-layers")
@pytest.mark.parametrize("layers", [(3, 3), (5, 2), (-1,), ()])
def test_decision_layers_must_increase(layers):
    with pytest.raises(RoutingError, match="schedule.decision-layers"):
        Schedule(layers, (0.5,) * len(layers))


@pytest.mark.spec("schedule.decision-layers")
def test_decision_layer_out_of_range_names_value(llava):
    with pytest.raises(
        RoutingError, match=r"\[9\] are out of range for a decoder of 6 layers.*schedule.decision-layers"
    ):
        Reference(llava, RoutingConfig(Schedule((1, 9), (0.5, 0.5))))


@pytest.mark.spec("schedule.keep-count")
def test_absolute_count_above_n_is_rejected(llava, single):
    ref = Reference(llava, RoutingConfig(Schedule((1,), (17,), unit="count")))
    with pytest.raises(
        RoutingError, match=r"keep count 17 .* exceeds the sample's N=16.*schedule.keep-count"
    ):
        ref.prefill(**single)


@pytest.mark.spec("schedule.keep-count")
def test_absolute_count_selects_that_many(llava, single):
    result = Reference(llava, RoutingConfig(Schedule((1, 3), (9, 4), unit="count"))).prefill(**single)
    assert [d.k for d in result.trace.samples[0].decisions] == [9, 4]


@pytest.mark.spec("schedule.presets")
def test_unknown_preset_lists_valid_names():
    with pytest.raises(
        RoutingError, match=r"unknown preset 'fastv'; valid presets: .*fastv_K3_avg192.*schedule.presets"
    ):
        preset("fastv")


@pytest.mark.spec("schedule.presets")
def test_release_presets_are_present_and_valid():
    for tier in (192, 128, 64):
        for family in ("fastv_K3", "ours_vs_fastv", "pdrop_earlyL2", "ours_vs_pdrop"):
            config = PRESETS[f"{family}_avg{tier}"]
            assert config.policy == ("reroute" if family.startswith("ours") else "remove")
            config.schedule.check_layers(32)
    assert PRESETS["pdrop_default"].schedule == Schedule((8, 16, 24), (0.5, 0.25, 0.125))
    assert preset("fastv_K3_avg192", policy="reroute").policy == "reroute"


@pytest.mark.spec("schedule.stages", "schedule.dense-prefix")
def test_stage_of_layer():
    schedule = Schedule((2, 5), (0.5, 0.25))
    assert [schedule.stage_of(layer) for layer in range(7)] == [None, None, 0, 0, 0, 1, 1]


@pytest.mark.spec("schedule.stages", "schedule.dense-prefix")
def test_trace_counts_follow_stages(llava, single):
    result = Reference(llava, RoutingConfig(Schedule((2, 4), (0.5, 0.25)))).prefill(**single)
    assert result.trace.samples[0].layer_visual_counts == (16, 16, 8, 8, 4, 4)
