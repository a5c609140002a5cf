"""Named presets: the published schedules of each method, with their scorer and policy (spec/schedule.md).

[schedule.presets] Every preset is a ``RoutingConfig`` built from the rules in reference/schedule.py; methods
that live in their own module add theirs to ``PRESETS`` there (reference/nuwa.py).
"""

from __future__ import annotations

import math
from fractions import Fraction

from .schedule import Policy, RoutingConfig, RoutingError, Schedule, Scorer

# ---------------------------------------------------------------------------------------------
# Presets [schedule.presets]. LLaVA-1.5 (32 layers) schedules of the Reroute release
# (elmma/mllm-reroute, configs/experiment/llava15/**, as read in research/reroute.md §5.2),
# PDrop's own default (Cooperx521/PyramidDrop, layer_list [8,16,24], λ = 0.5) and FastV's
# paper default (K = 2, R = 50 %).
# ---------------------------------------------------------------------------------------------

_FASTV_RATIO = {192: 0.2644, 128: 0.1418, 64: 0.01916}
_PDROP_RATIOS = {
    192: (0.5965, 0.3558, 0.2123, 0.1266),
    128: (0.4570, 0.2088, 0.0954, 0.0436),
    64: (0.2789, 0.0937, 0.0315, 0.0106),
}
# [α, α, α/2, α/4] exactly as the release configs write them (0.4502/4 is written 0.1126 there).
_OURS_PDROP_RATIOS = {
    192: (0.4502, 0.4502, 0.2251, 0.1126),
    128: (0.2655, 0.2655, 0.1328, 0.0664),
    64: (0.1392, 0.1392, 0.0696, 0.0348),
}


def ttp_keep(
    average: int | Fraction, *, num_layers: int, first_layer: int, final_wipe: int, num_visual: int
) -> int:
    """[twig.ttp.budget] [twig.ttp.final-wipe] R' = ceil((L·R̄ − K·N) / (F − K)), in exact arithmetic.

    ``average`` is the target R̄ (an integer or a ``Fraction``); ``final_wipe == num_layers`` means no wipe.
    """
    L, K, F, N = num_layers, first_layer, final_wipe, num_visual
    if not K < F <= L:
        raise RoutingError(
            "twig.ttp.final-wipe", f"final-wipe layer F={F} must satisfy K < F <= L (K={K}, L={L})"
        )
    if isinstance(average, bool) or not isinstance(average, (int, Fraction)):
        raise RoutingError("twig.ttp.budget", f"target average {average!r} is not an integer or a Fraction")
    kept = math.ceil(Fraction(L * average - K * N, F - K))
    if not 1 <= kept <= N:
        raise RoutingError(
            "twig.ttp.budget",
            f"target average R̄={average} gives R'={kept}, outside 1..N={N}: R̄ must lie in "
            f"({Fraction(K * N, L)}, {Fraction(K * N + (F - K) * N, L)}] for L={L}, K={K}, F={F}",
        )
    return kept


def ttp_config(
    average: int | Fraction,
    *,
    num_layers: int,
    first_layer: int,
    final_wipe: int,
    num_visual: int,
    twig_layers: int | None = None,
) -> RoutingConfig:
    """[twig.ttp.final-wipe] TTP for a target average: decisions ``(K, F)`` keeping ``(R', 0)``, or ``(K,)`` at F = L."""
    kept = ttp_keep(
        average, num_layers=num_layers, first_layer=first_layer, final_wipe=final_wipe, num_visual=num_visual
    )
    if final_wipe == num_layers:
        schedule = Schedule((first_layer,), (kept,), unit="count")
    else:
        schedule = Schedule((first_layer, final_wipe), (kept, 0), unit="count")
    return RoutingConfig(schedule, policy="remove", scorer=Scorer(kind="twig", twig_layers=twig_layers))


def _build_presets() -> dict[str, RoutingConfig]:
    presets: dict[str, RoutingConfig] = {}
    for tier in (192, 128, 64):
        presets[f"fastv_K3_avg{tier}"] = RoutingConfig(Schedule((3,), (_FASTV_RATIO[tier],)), policy="remove")
        presets[f"ours_vs_fastv_avg{tier}"] = RoutingConfig(
            Schedule((3, 7, 15, 23), (_FASTV_RATIO[tier],) * 4), policy="reroute"
        )
        presets[f"pdrop_earlyL2_avg{tier}"] = RoutingConfig(
            Schedule((2, 7, 15, 23), _PDROP_RATIOS[tier]), policy="remove"
        )
        presets[f"ours_vs_pdrop_avg{tier}"] = RoutingConfig(
            Schedule((2, 7, 15, 23), _OURS_PDROP_RATIOS[tier]), policy="reroute"
        )
    # [schedule.presets] The release's Qwen2.5-VL-7B (28 layers) schedules: LLaVA's ratios, of each sample's own
    # N ([layout.image-grid]), at the layers of configs/experiment/qwen25vl/** (research/reroute.md §5.2).
    for tier in (192, 128, 64):
        presets[f"qwen25vl_fastv_K3_avg{tier}"] = RoutingConfig(
            Schedule((3,), (_FASTV_RATIO[tier],)), policy="remove"
        )
        presets[f"qwen25vl_ours_vs_fastv_avg{tier}"] = RoutingConfig(
            Schedule((3, 6, 13, 20), (_FASTV_RATIO[tier],) * 4), policy="reroute"
        )
        presets[f"qwen25vl_pdrop_earlyL2_avg{tier}"] = RoutingConfig(
            Schedule((2, 6, 13, 20), _PDROP_RATIOS[tier]), policy="remove"
        )
        presets[f"qwen25vl_ours_vs_pdrop_avg{tier}"] = RoutingConfig(
            Schedule((2, 6, 13, 20), _OURS_PDROP_RATIOS[tier]), policy="reroute"
        )
    # [twig.presets] TwigVLM's TTP (K = 2, T = 3, final wipe F = 24) and TTP + Reroute, LLaVA-1.5 (N = 576).
    for tier in (192, 128, 64):
        kept = ttp_keep(tier, num_layers=32, first_layer=2, final_wipe=24, num_visual=576)
        twig = Scorer(kind="twig", twig_layers=3)
        presets[f"twig_K2_T3_avg{tier}"] = RoutingConfig(
            Schedule((2, 24), (kept, 0), unit="count"), policy="remove", scorer=twig
        )
        presets[f"twig_reroute_K2_T3_avg{tier}"] = RoutingConfig(
            Schedule((2, 8, 16, 24), (kept, kept, kept, 0), unit="count"), policy="reroute", scorer=twig
        )
    presets["pdrop_default"] = RoutingConfig(Schedule((8, 16, 24), (0.5, 0.25, 0.125)), policy="remove")
    presets["fastv_K2_R50"] = RoutingConfig(
        Schedule((2,), (0.5,)), policy="remove", scorer=Scorer(probe_layer="previous")
    )
    presets.update(_clse_presets())
    return presets


# [clse.presets] CLSE's released schedules (zjubinchen/CLSE, research/twig-clse.md §2.3): LLaVA-1.5 keep counts
# at layers [1, 11, 21] by RETAIN_TOKEN, Qwen2-VL keep ratios of N at [1, 10, 19] by RETAIN_RATIO. Attention
# from layer K-1 (probe_layer="previous"), the gate at the first decision only.
CLSE_LLAVA_LAYERS = (1, 11, 21)
CLSE_LLAVA_COUNTS = {192: (330, 210, 62), 128: (220, 140, 41), 64: (110, 70, 20)}
CLSE_QWEN2VL_LAYERS = (1, 10, 19)
CLSE_QWEN2VL_RATIOS = {
    0.334: (0.57, 0.36, 0.098),
    0.223: (0.38, 0.24, 0.066),
    0.112: (0.19, 0.12, 0.034),
}
_CLSE_QWEN2VL_TIERS = {192: 0.334, 128: 0.223, 64: 0.112}


def clse_llava_counts(retain: int) -> tuple[int, int, int]:
    """[clse.presets] The keep counts of ``RETAIN_TOKEN=retain``: the code's table, else ``int(1.72R, 1.09R, 0.32R)``."""
    if retain in CLSE_LLAVA_COUNTS:
        return CLSE_LLAVA_COUNTS[retain]
    return tuple(int(f * retain) for f in (1.72, 1.09, 0.32))  # PriorTR's cast; the code leaves floats


def clse_qwen2vl_ratios(retain: float) -> tuple[float, float, float]:
    """[clse.presets] The keep ratios of ``RETAIN_RATIO=retain``: the code's table, else ``retain·(1.71, 1.08, 0.294)``."""
    if retain in CLSE_QWEN2VL_RATIOS:
        return CLSE_QWEN2VL_RATIOS[retain]
    return tuple(retain * f for f in (1.71, 1.08, 0.294))


def _clse_presets() -> dict[str, RoutingConfig]:
    scorer = Scorer(kind="clse", probe_layer="previous")
    presets: dict[str, RoutingConfig] = {}
    for tier in (192, 128, 64):
        llava = Schedule(CLSE_LLAVA_LAYERS, clse_llava_counts(tier), unit="count")
        presets[f"clse_avg{tier}"] = RoutingConfig(llava, policy="remove", scorer=scorer)
        presets[f"ours_vs_clse_avg{tier}"] = RoutingConfig(llava, policy="reroute", scorer=scorer)
        qwen = Schedule(CLSE_QWEN2VL_LAYERS, clse_qwen2vl_ratios(_CLSE_QWEN2VL_TIERS[tier]))
        presets[f"qwen2vl_clse_avg{tier}"] = RoutingConfig(qwen, policy="remove", scorer=scorer)
        presets[f"qwen2vl_ours_vs_clse_avg{tier}"] = RoutingConfig(qwen, policy="reroute", scorer=scorer)
    return presets


PRESETS: dict[str, RoutingConfig] = _build_presets()


def preset(name: str, *, policy: Policy | None = None) -> RoutingConfig:
    """[schedule.presets] The named preset, optionally with its policy swapped."""
    if name not in PRESETS:
        raise RoutingError(
            "schedule.presets", f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}"
        )
    config = PRESETS[name]
    return config if policy is None else config.with_policy(policy)
