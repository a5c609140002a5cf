"""The lmms-eval model's arguments: schedules, policies, the solver's target and their errors (docs/eval-protocol.md)."""

from __future__ import annotations

import pytest

from rerouting.eval.options import parse_list, resolve_dtype, resolve_routing
from rerouting.reference import PRESETS, RoutingError
from rerouting.reference.budget import nominal_visual_counts
from rerouting.reference.flops import avg_visual_tokens

LLAVA = {"num_visual": 576, "num_layers": 32}


def test_presets_keep_or_swap_their_policy():
    native = resolve_routing("ours_vs_pdrop_avg64", None, **LLAVA)
    assert native.config == PRESETS["ours_vs_pdrop_avg64"] and native.name == "ours_vs_pdrop_avg64/reroute"
    swapped = resolve_routing("ours_vs_pdrop_avg64", "remove", **LLAVA)
    assert swapped.config.policy == "remove" and swapped.config.schedule == native.config.schedule
    unrouted = resolve_routing("none", None, **LLAVA)
    assert unrouted.config is None and unrouted.name == "none"


def test_a_schedule_file(tmp_path):
    path = tmp_path / "keepall.yaml"
    path.write_text("layers: [2, 9]\nkeep: [1.0, 1.0]\npolicy: remove\n")
    routing = resolve_routing(str(path), None, **LLAVA)
    assert routing.config.schedule.layers == (2, 9) and routing.config.policy == "remove"
    assert routing.name == "keepall/remove"
    path.write_text("layers: [2]\nkeep: [1.5]\n")
    with pytest.raises(RoutingError, match=r"schedule='.*keepall.yaml'.*keep ratio 1.5 is outside"):
        resolve_routing(str(path), None, **LLAVA)


@pytest.mark.spec("budget.avg-tokens")
def test_the_solvers_target():
    routing = resolve_routing("solve", None, **LLAVA, target_avg=64, layers="2/7/15/23", shape="1/1/0.5/0.25")
    assert routing.config.policy == "reroute"
    alpha = (32 * 64 - 2 * 576) / 11088  # research/reroute.md §5.2: α = (32·avg − 1152)/11088
    assert routing.config.schedule.keep == tuple(round(alpha * c, 4) for c in (1, 1, 0.5, 0.25))
    nominal = avg_visual_tokens(nominal_visual_counts(routing.config, 576, 32))
    assert nominal == pytest.approx(64, abs=0.05)
    flat = resolve_routing("solve", "remove", **LLAVA, target_avg=128, layers=3)
    assert flat.config.schedule.layers == (3,) and flat.config.policy == "remove"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("nope", None),
            "schedule='nope' is not a preset, an existing schedule file, 'solve' or 'none'; valid presets: ",
        ),
        ((None, None), "schedule is required"),
        (("fastv_K3_avg64", "prune"), "policy='prune' is not one of remove, reroute"),
        (("none", "reroute"), "policy='reroute' with schedule='none'"),
        (
            ("ours_vs_pdrop_avg64", None, {"num_layers": 20}),
            r"does not fit this model.*decision layers \[23\]",
        ),
        (("fastv_K3_avg64", None, {"target_avg": 64}), "target_avg apply to schedule=solve only"),
        (("solve", None, {"layers": "2/7"}), "needs target_avg"),
        (("solve", None, {"target_avg": 64}), "needs layers="),
        (
            ("solve", None, {"target_avg": 64, "layers": "2,7"}),
            "layers='2,7': expected int values separated by '/'",
        ),
        (("solve", None, {"target_avg": 64, "layers": "2/7", "num_visual": None}), "needs visual="),
        (("solve", None, {"target_avg": 10, "layers": "8"}), r"target_avg=10 .*outside"),
    ],
)
def test_bad_arguments_are_named(args, message):
    schedule, policy, *extra = args
    kwargs = {**LLAVA, **(extra[0] if extra else {})}
    with pytest.raises(RoutingError, match=message) as error:
        resolve_routing(schedule, policy, **kwargs)
    assert error.value.rule == "eval.model-args"


def test_small_parsers():
    assert parse_list("1/1/0.5", "shape", float) == (1.0, 1.0, 0.5)
    assert parse_list(3, "layers", int) == (3,)
    with pytest.raises(RoutingError, match="dtype='fp8' is not one of float32, bfloat16, float16"):
        resolve_dtype("fp8")
