"""The budget of a twig run (spec/twig.md, [twig.budget]): the routed base, the twig apart, KV per cache group.

Pure functions of one sample's trace and the architecture, like reference/budget.py. The twig's layers are the
base's own layer class (the same shapes), so its cost is the base's per-layer count at ``T_b`` tokens.

Notation: K the twig's first layer, T its layers, L base layers, M text, N visual, T_b = M + N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .archs import ArchSpec
from .flops import avg_visual_tokens, kv_layer_bytes, layer_flops_true, lm_head_flops
from .schedule import RoutingError
from .trace import SampleTrace


@dataclass(frozen=True)
class TwigBudget:
    """[twig.budget] One sample's twig run.

    Attributes:
        avg_visual_tokens: the routed base's realized avg_T over its L layers (final wipe included).
        twig_visual_token_layers: T·N, the visual token-layers the twig runs in prefill (not in avg_T).
        twig_flops_true: the twig's T layers over all T_b tokens in prefill (``budget.flops.true``, biases in).
        twig_head_flops_per_draft: the twig head on one drafted row.
        kv_entries: per cache group, the entries of each of its layers after prefill:
            ``base_prefix`` (layers 0..K-1), ``twig`` (its T layers), ``base_routed`` (layers K..L-1).
        kv_bytes: per cache group, its bytes in ``kv_dtype``.
    """

    avg_visual_tokens: float
    twig_visual_token_layers: int
    twig_flops_true: int
    twig_head_flops_per_draft: int
    kv_entries: dict[str, tuple[int, ...]]
    kv_bytes: dict[str, int]


def twig_budget(
    sample: SampleTrace,
    arch: ArchSpec,
    *,
    first_layer: int,
    twig_layers: int,
    kv_dtype: torch.dtype = torch.float16,
) -> TwigBudget:
    """[twig.budget] [budget.active-counts] The twig run's budget of one sample, counts read from its trace."""
    L = len(sample.active_visual)
    if not (first_layer >= 0 and twig_layers >= 1 and first_layer + twig_layers <= L):
        raise RoutingError(
            "twig.module", f"a twig of T={twig_layers} from K={first_layer} needs K + T <= L={L}"
        )
    M, N = sample.num_text, len(sample.visual_positions)
    counts = [len(active) for active in sample.active_visual]
    entries = [M + n for n in counts]
    groups = {
        "base_prefix": tuple(entries[:first_layer]),
        "twig": (M + N,) * twig_layers,
        "base_routed": tuple(entries[first_layer:]),
    }
    return TwigBudget(
        avg_visual_tokens=avg_visual_tokens(counts),
        twig_visual_token_layers=twig_layers * N,
        twig_flops_true=twig_layers * sum(layer_flops_true(arch, M + N).values()),
        twig_head_flops_per_draft=lm_head_flops(arch, 1),
        kv_entries=groups,
        kv_bytes={
            name: sum(kv_layer_bytes(arch, n, kv_dtype) for n in group) for name, group in groups.items()
        },
    )
