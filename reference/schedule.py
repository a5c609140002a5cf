"""Routing configuration: schedules, scorers, policies and named presets (spec/schedule.md).

Everything here is a frozen dataclass validated on construction; a bad value raises ``ValueError``
naming the value and the rule it breaks. Nothing is silently clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

Policy = Literal["remove", "reroute"]
POLICIES: tuple[str, ...] = ("remove", "reroute")
#: What a deferred token does at a linear-attention layer ([hosts.linear.semantics]); the first is the default.
LINEAR_SEMANTICS: tuple[str, ...] = ("dense", "bypass")


class RoutingError(ValueError):
    """A routing input breaks a spec rule; the message names the value and the rule ID."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"{message} [rule {rule}]")
        self.rule = rule


@dataclass(frozen=True)
class Schedule:
    """[schedule.decision-layers] Decision layers and a keep target per decision.

    ``keep`` holds fractions of the sample's ORIGINAL visual count N when ``unit == "ratio"``
    ([schedule.keep-ratio]) or absolute token counts when ``unit == "count"``
    ([schedule.keep-count]). Stage s covers layers ``[layers[s], layers[s+1])``; the last stage
    runs to the final layer ([schedule.stages]). Layers before ``layers[0]`` are dense
    ([schedule.dense-prefix]).
    """

    layers: tuple[int, ...]
    keep: tuple[float, ...]
    unit: Literal["ratio", "count"] = "ratio"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.unit not in ("ratio", "count"):
            raise RoutingError("schedule.keep-ratio", f"unit={self.unit!r} is not 'ratio' or 'count'")
        if not self.layers:
            raise RoutingError("schedule.decision-layers", "a schedule needs at least one decision layer")
        if len(self.layers) != len(self.keep):
            raise RoutingError(
                "schedule.decision-layers",
                f"{len(self.layers)} decision layers {list(self.layers)} but {len(self.keep)} keep values {list(self.keep)}",
            )
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise RoutingError(
                    "schedule.decision-layers", f"decision layer {layer!r} is not an integer >= 0"
                )
        for a, b in zip(self.layers, self.layers[1:]):
            if b <= a:
                raise RoutingError(
                    "schedule.decision-layers",
                    f"decision layers {list(self.layers)} are not strictly increasing ({a} then {b})",
                )
        for decision, value in enumerate(self.keep):
            if (
                value == 0 and self.unit == "count" and type(value) is int
            ):  # [schedule.keep-zero]: the final wipe
                if decision != len(self.keep) - 1:
                    raise RoutingError(
                        "schedule.keep-zero",
                        f"keep target 0 at decision layer {self.layers[decision]}: a 0 is allowed only at the "
                        f"last decision (layer {self.layers[-1]}), where every visual token leaves",
                    )
                continue
            if self.unit == "ratio":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RoutingError(
                        "schedule.keep-ratio",
                        f"keep ratio {value!r} is not a number (a fraction of N in (0, 1], e.g. 0.5 for 50%)",
                    )
                if not (0.0 < value <= 1.0):
                    raise RoutingError("schedule.keep-ratio", f"keep ratio {value!r} is outside (0, 1]")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RoutingError("schedule.keep-count", f"keep count {value!r} is not an integer >= 1")

    @property
    def num_decisions(self) -> int:
        return len(self.layers)

    def check_layers(self, num_layers: int) -> None:
        """[schedule.decision-layers] Every decision layer must exist in a model of ``num_layers`` layers."""
        bad = [layer for layer in self.layers if layer >= num_layers]
        if bad:
            raise RoutingError(
                "schedule.decision-layers",
                f"decision layers {bad} are out of range for a decoder of {num_layers} layers (valid: 0..{num_layers - 1})",
            )

    def keep_count(self, decision: int, num_visual: int) -> int:
        """[schedule.keep-ratio] / [schedule.keep-count] The keep target k of decision ``decision`` for N visual tokens.

        Ratio: ``k = max(1, floor(N * r))``. Count: ``k`` itself, which must not exceed N.
        The cap by the pool size ([selection.pool-cap]) is applied by the selection, not here.
        """
        value = self.keep[decision]
        if value == 0 and self.unit == "count":  # [schedule.keep-zero]: the final wipe
            return 0
        if self.unit == "count":
            if value > num_visual:
                raise RoutingError(
                    "schedule.keep-count",
                    f"keep count {value} at decision layer {self.layers[decision]} exceeds the sample's N={num_visual} visual tokens",
                )
            return int(value)
        return max(1, math.floor(num_visual * value))

    def nominal_keep(self, decision: int, num_visual: int) -> float:
        """[budget.avg-tokens] The real-valued keep target ``N * r`` (no floor, no minimum), for nominal budgets."""
        value = self.keep[decision]
        return float(value) if self.unit == "count" else num_visual * float(value)

    def stage_of(self, layer: int) -> int | None:
        """[schedule.stages] The stage index of ``layer``, or None in the dense prefix."""
        stage = None
        for s, start in enumerate(self.layers):
            if layer >= start:
                stage = s
        return stage


ClseVariant = Literal["clse_attn", "clse", "attn"]
CLSE_VARIANTS: tuple[str, ...] = ("clse_attn", "clse", "attn")


@dataclass(frozen=True)
class ClseParams:
    """[clse.params] The CLSE scorer's constants, defaults as in the released code (spec/clse.md).

    Attributes:
        cutoff: the Gaussian high-pass cutoff ratio, ``sigma = cutoff * min(H // 2, W // 2)`` ([clse.spectral]).
        tau: the gate temperature ([clse.gate]).
        eps: the epsilon of the evolution ratio and of the standardisation ([clse.evolution]).
        reference_layer: the layer whose input is ``z_L`` ([clse.reference-layer]); 0 = the decoder input.
        variant: ``clse_attn`` (gate x attention), ``clse`` (gate only) or ``attn`` ([clse.variants]).
        spectral_stages: ``first`` or ``every`` decision uses the spectral term ([clse.stages]).
    """

    cutoff: float = 0.1
    tau: float = 0.1
    eps: float = 1e-6
    reference_layer: int = 0
    variant: ClseVariant = "clse_attn"
    spectral_stages: Literal["first", "every"] = "first"

    def __post_init__(self) -> None:
        for name, value, low_open in (
            ("cutoff", self.cutoff, 0.0),
            ("tau", self.tau, 0.0),
            ("eps", self.eps, 0.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low_open:
                raise RoutingError("clse.params", f"{name}={value!r} is not a number > 0")
        if self.cutoff > 1:
            raise RoutingError("clse.params", f"cutoff={self.cutoff!r} is outside (0, 1]")
        layer = self.reference_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise RoutingError("clse.params", f"reference_layer={layer!r} is not an integer >= 0")
        if self.variant not in CLSE_VARIANTS:
            raise RoutingError("clse.params", f"variant={self.variant!r} is not one of {list(CLSE_VARIANTS)}")
        if self.spectral_stages not in ("first", "every"):
            raise RoutingError(
                "clse.params", f"spectral_stages={self.spectral_stages!r} is not 'first' or 'every'"
            )

    def spectral_at(self, stage: int) -> bool:
        """[clse.stages] Whether decision ``stage`` uses the spectral term (never for the ``attn`` variant)."""
        return self.variant != "attn" and (self.spectral_stages == "every" or stage == 0)


@dataclass(frozen=True)
class Scorer:
    """[scoring.scorer] Which scorer ranks candidates at a decision.

    ``kind="attention"`` is the FastV/PDrop attention probe ([scoring.probe.*]);
    ``probe_layer`` and ``query`` select its named variants ([scoring.probe.variant-layer],
    [scoring.probe.variant-query]). ``kind="random"`` is the seeded random baseline
    ([scoring.scorer.random]).
    """

    kind: Literal["attention", "random", "twig", "clse"] = "attention"
    probe_layer: Literal["decision", "previous"] = "decision"
    query: Literal["last", "text-after-image"] = "last"
    seed: int = 0
    twig_layers: int | None = None  # [twig.ttp.score]: the twig's T, checked against the twig routed with
    clse: ClseParams | None = None  # [clse.scorer]: the CLSE scorer's parameters, only with kind="clse"

    def __post_init__(self) -> None:
        if self.kind not in ("attention", "random", "twig", "clse"):
            raise RoutingError(
                "scoring.scorer",
                f"scorer kind {self.kind!r} is not 'attention', 'random', 'twig' or 'clse'",
            )
        if self.kind == "twig" and self.probe_layer != "decision":
            raise RoutingError(
                "twig.ttp.score",
                f"probe_layer={self.probe_layer!r} with kind='twig': the twig scores at K and later decisions "
                "use their own layer's probe (probe_layer='decision')",
            )
        if self.twig_layers is not None and (
            self.kind != "twig"
            or isinstance(self.twig_layers, bool)
            or not isinstance(self.twig_layers, int)
            or self.twig_layers < 1
        ):
            raise RoutingError(
                "twig.ttp.score",
                f"twig_layers={self.twig_layers!r} needs kind='twig' and an integer >= 1 (got kind {self.kind!r})",
            )
        if self.kind == "clse" and self.clse is None:
            object.__setattr__(self, "clse", ClseParams())
        if self.kind != "clse" and self.clse is not None:
            raise RoutingError("clse.scorer", f"clse parameters given to a scorer of kind {self.kind!r}")
        if self.clse is not None and not isinstance(self.clse, ClseParams):
            raise RoutingError("clse.params", f"clse={self.clse!r} is not a ClseParams")
        if self.probe_layer not in ("decision", "previous"):
            raise RoutingError(
                "scoring.probe.variant-layer",
                f"probe_layer {self.probe_layer!r} is not 'decision' or 'previous'",
            )
        if self.query not in ("last", "text-after-image"):
            raise RoutingError(
                "scoring.probe.variant-query", f"query {self.query!r} is not 'last' or 'text-after-image'"
            )


_COMPUTE_DTYPES = (torch.float32, torch.float64)
CachePolicy = Literal["per-layer", "retroactive"]
CACHE_POLICIES: tuple[str, ...] = ("per-layer", "retroactive")  # [cache.policy]


def check_clse(params: ClseParams, schedule: Schedule, policy: str) -> None:
    """[clse.reference-layer] [clse.stages] [clse.variants] CLSE parameters that fit the schedule and policy."""
    if params.reference_layer >= schedule.layers[0]:
        raise RoutingError(
            "clse.reference-layer",
            f"reference_layer={params.reference_layer} is not before the first decision layer {schedule.layers[0]}",
        )
    several = schedule.num_decisions > 1
    if params.spectral_stages == "every" and policy == "remove" and several:
        raise RoutingError(
            "clse.stages",
            "spectral_stages='every' needs policy 'reroute': under 'remove' the grid is gone after the first decision",
        )
    if params.variant == "clse" and several and params.spectral_stages == "first":
        raise RoutingError(
            "clse.variants",
            f"variant 'clse' has no score at decisions {list(schedule.layers[1:])} without the spectral term "
            "(spectral_stages='first'); use 'clse_attn', one decision, or spectral_stages='every' under reroute",
        )


@dataclass(frozen=True)
class RoutingConfig:
    """A complete routing setup: schedule, policy, scorer, and the reference's compute dtype.

    ``reducer`` names the vision-side reducer run before the decoder ([layout.vision-reducer]) and
    ``reducer_params`` is its own frozen parameter record (e.g. ``NuwaParams``, [nuwa.params]); the
    ``identity`` reducer takes none. The name and the record's type are checked where the reducer is looked up.
    """

    schedule: Schedule
    policy: Policy = "reroute"
    scorer: Scorer = field(default_factory=Scorer)
    compute_dtype: torch.dtype = torch.float32
    linear_attention: str = "dense"  # [hosts.linear.semantics]: only hybrid hosts have linear layers
    reducer: str = "identity"
    reducer_params: Any = None
    cache: CachePolicy = "per-layer"  # [cache.policy]

    def __post_init__(self) -> None:
        if self.cache not in CACHE_POLICIES:
            raise RoutingError(
                "cache.policy", f"cache policy {self.cache!r} is not one of {list(CACHE_POLICIES)}"
            )
        if self.linear_attention not in LINEAR_SEMANTICS:
            raise RoutingError(
                "hosts.linear.semantics",
                f"linear_attention {self.linear_attention!r} is not one of {list(LINEAR_SEMANTICS)}",
            )
        if not isinstance(self.reducer, str):
            raise RoutingError("layout.vision-reducer", f"reducer {self.reducer!r} is not a reducer name")
        if self.reducer == "identity" and self.reducer_params is not None:
            raise RoutingError(
                "layout.vision-reducer",
                f"reducer_params {self.reducer_params!r} given to the identity reducer, which takes none",
            )
        if self.reducer != "identity" and self.scorer.kind in ("clse", "twig"):
            # [clse.grid] the spectral term needs each image's full grid; [twig.ttp.score] the twig reads the
            # full prompt: neither is defined after a vision-side reducer has dropped tokens
            raise RoutingError(
                "layout.vision-reducer",
                f"scorer kind {self.scorer.kind!r} with vision reducer {self.reducer!r}: the {self.scorer.kind} "
                "scorer is defined on every visual token of each image, which the reducer drops",
            )
        if self.policy not in POLICIES:
            raise RoutingError("selection.pool", f"policy {self.policy!r} is not one of {list(POLICIES)}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise RoutingError(
                "routing.errors", f"compute_dtype {self.compute_dtype} is not torch.float32 or torch.float64"
            )
        if self.scorer.probe_layer == "previous" and self.schedule.layers[0] == 0:
            raise RoutingError(
                "scoring.probe.variant-layer",
                "probe_layer='previous' needs decision layers >= 1, got layer 0",
            )

        if self.scorer.clse is not None:
            check_clse(self.scorer.clse, self.schedule, self.policy)

    def with_policy(self, policy: Policy) -> RoutingConfig:
        return replace(self, policy=policy)
