"""Matched budgets: keep ratios whose nominal avg_T matches a target ([budget.avg-tokens], spec/budget.md).

The solved ratios are checked through the real selection code (:func:`~rerouting.reference.budget.schedule_trace`),
so the realized avg_T (integer keep counts) is reported next to the nominal one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

from .budget import _check_sizes, nominal_visual_counts, schedule_trace
from .flops import avg_visual_tokens
from .schedule import RoutingConfig, RoutingError, Schedule


class MatchedBudget(NamedTuple):
    """A solved schedule: keep ratios (rounded), and the avg_T they give (integer k and real N·r)."""

    ratios: tuple[float, ...]
    realized_avg: float
    nominal_avg: float


def _stage_lengths(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    schedule = Schedule(tuple(layers), (1.0,) * len(layers))
    schedule.check_layers(num_layers)
    bounds = (*schedule.layers, num_layers)
    return tuple(b - a for a, b in pairwise(bounds))


def solve_scale(
    layers: Sequence[int],
    shape: Sequence[float] | str,
    target_avg: float,
    *,
    num_visual: int,
    num_layers: int,
) -> float:
    """[budget.avg-tokens] The unrounded scale whose NOMINAL avg_T equals ``target_avg``.

    With decision layers d_0 < ... and stage lengths K_s, nominal avg_T = (d_0·N + N·Σ_s K_s·c_s)/L.

    - ``shape`` a sequence: c_s = α·shape_s, linear in α, closed form
      α = (L·target − d_0·N) / (N·Σ_s K_s·shape_s) (release: α = (32·avg − 1152)/11088 for
      layers (2,7,15,23), shape (1,1,½,¼), N = 576).
    - ``shape="geometric"``: c_s = λ^(s+1) (PDrop's λ, λ², ...), λ by bisection on (0, 1].

    Errors (rule budget.avg-tokens) when the target is not above the dense prefix's share d_0·N/L,
    or needs a keep ratio above 1.
    """
    lengths = _stage_lengths(layers, num_layers)
    _check_sizes(0, num_visual, num_layers)
    if num_visual < 1:
        raise RoutingError("budget.avg-tokens", "a matched budget needs N >= 1 visual tokens")
    floor_avg = layers[0] * num_visual / num_layers
    if not floor_avg < target_avg <= num_visual:
        raise RoutingError(
            "budget.avg-tokens",
            f"target avg_T={target_avg} is outside ({floor_avg:g}, {num_visual}] for a dense prefix of {layers[0]} layers",
        )
    need = (num_layers * target_avg - layers[0] * num_visual) / num_visual  # = Σ_s K_s·c_s
    if isinstance(shape, str):
        if shape != "geometric":
            raise RoutingError(
                "budget.avg-tokens", f"shape {shape!r} is not a sequence of floats or 'geometric'"
            )
        if need > sum(lengths):
            raise RoutingError("budget.avg-tokens", f"target avg_T={target_avg} needs a keep ratio above 1")
        low, high = 0.0, 1.0
        for _ in range(200):
            mid = (low + high) / 2
            value = sum(k * mid ** (s + 1) for s, k in enumerate(lengths))
            low, high = (mid, high) if value < need else (low, mid)
        return (low + high) / 2
    shape = tuple(float(c) for c in shape)
    if len(shape) != len(lengths) or any(not c > 0 for c in shape):
        raise RoutingError(
            "budget.avg-tokens",
            f"shape {list(shape)} must hold one positive value per decision layer {list(layers)}",
        )
    alpha = need / math.fsum(k * c for k, c in zip(lengths, shape))
    if alpha * max(shape) > 1:
        raise RoutingError(
            "budget.avg-tokens", f"target avg_T={target_avg} needs keep ratio {alpha * max(shape):.4f} > 1"
        )
    return alpha


def solve_keep_ratios(
    layers: Sequence[int],
    shape: Sequence[float] | str,
    target_avg: float,
    *,
    num_visual: int,
    num_layers: int,
    decimals: int = 4,
    policy: str = "reroute",
) -> MatchedBudget:
    """[budget.avg-tokens] Keep ratios whose nominal avg_T matches ``target_avg``, rounded like the release.

    Solves the scale with :func:`solve_scale` (α for a linear ``shape``, λ for ``"geometric"``), then
    rounds each ratio c_s = α·shape_s (or λ^(s+1)) to ``decimals`` places (the release's configs use 4,
    except FastV's 64 tier, 0.01916). Returns the ratios, the realized avg_T (integer
    k = max(1, ⌊N·r⌋) through the real selection, :func:`schedule_trace`) and the nominal avg_T of the
    ROUNDED ratios (so it may differ from the target in the second decimal). A rising ``shape`` is an
    error under ``policy="remove"`` (the pool cap would bind).
    """
    if policy == "remove" and not isinstance(shape, str) and any(b > a for a, b in pairwise(shape)):
        raise RoutingError(
            "budget.avg-tokens",
            f"shape {list(shape)} rises: under remove the pool cap makes avg_T nonlinear in α (use reroute)",
        )
    scale = solve_scale(layers, shape, target_avg, num_visual=num_visual, num_layers=num_layers)
    if isinstance(shape, str):
        raw = [scale ** (s + 1) for s in range(len(layers))]
    else:
        raw = [scale * float(c) for c in shape]
    ratios = tuple(round(r, decimals) for r in raw)
    config = RoutingConfig(Schedule(tuple(layers), ratios), policy=policy)  # type: ignore[arg-type]
    trace = schedule_trace(config, num_text=1, num_visual=num_visual, num_layers=num_layers)
    realized = avg_visual_tokens(trace.samples[0].layer_visual_counts)
    nominal = avg_visual_tokens(nominal_visual_counts(config, num_visual, num_layers))
    return MatchedBudget(ratios, realized, nominal)
