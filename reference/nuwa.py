"""Nüwa's stage 1, the ``nuwa`` vision-side reducer, per image and obvious (spec/nuwa.md).

On each image's patch grid: the [CLS]-row salience of the select layer, candidates per 2x2 region, the
global top anchors in grid order, the ReLU-cosine x proximity weights, pillars unchanged, collectors
aggregated, then the host's own projector. The anchors' rows of the merged embeddings are replaced and the
layouts say which visual tokens enter the decoder; positions never change ([nuwa.entering]).

Stage 2 is ordinary routing (presets in ``nuwa_presets``). The discrete bookkeeping here (``candidates``,
``anchors``, ``anchor_count``, ``pillar_mask``) is what the optimized path imports.

Notation: P patches of an image (grid ``h x w``), d_v vision width, D decoder width, H vision heads,
I images of the batch, n anchors of an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compat import vision_encoder_layers
from .hooks import VisionInputs, register_reducer
from .host import Host, SampleLayout
from .presets import PRESETS
from .schedule import RoutingConfig, RoutingError, Schedule, Scorer

NORMALISATIONS = ("code", "convex")
SALIENCES = ("cls", "cls-key-norm")  # the code's, the paper's Eq. 3
PILLAR_SCORES = ("salience", "key-norm")  # the code's, the paper's Eq. 4
STAGE2_KEEP = {112: 16, 224: 32, 336: 48}  # the release's preserve_cfg


@dataclass(frozen=True)
class NuwaParams:
    """[nuwa.params] Stage 1's parameters (defaults: the release's ``nuwa_avg64``, LLaVA-1.5)."""

    tokens: int = 112
    top_n: int = 1
    distance: float = 280.0
    pillar_quantile: float = 0.55
    feature_layers: tuple[int, int] = (16, 24)
    normalisation: Literal["code", "convex"] = "code"
    salience: Literal["cls", "cls-key-norm"] = "cls"
    pillar_score: Literal["salience", "key-norm"] = "salience"

    def __post_init__(self) -> None:
        if not isinstance(self.feature_layers, (tuple, list)):
            raise RoutingError("nuwa.params", f"feature_layers={self.feature_layers!r} is not a pair (a, b)")
        object.__setattr__(self, "feature_layers", tuple(self.feature_layers))

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def real(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        bad = None
        if not integer(self.tokens) or self.tokens < 1:
            bad = f"tokens={self.tokens!r} is not an integer >= 1"
        elif not integer(self.top_n) or not 1 <= self.top_n <= 4:
            bad = f"top_n={self.top_n!r} is not an integer in 1..4 (a 2x2 region has 4 patches)"
        elif not real(self.distance) or self.distance < 0:
            bad = f"distance={self.distance!r} is not a real >= 0 (squared patches)"
        elif not real(self.pillar_quantile) or not 0 <= self.pillar_quantile <= 1:
            bad = f"pillar_quantile={self.pillar_quantile!r} is not in [0, 1]"
        elif (
            len(self.feature_layers) != 2
            or not all(integer(i) for i in self.feature_layers)
            or not 1 <= self.feature_layers[0] <= self.feature_layers[1]
        ):
            bad = f"feature_layers={self.feature_layers!r} is not a range (a, b) with 1 <= a <= b"
        elif self.normalisation not in NORMALISATIONS:
            bad = f"normalisation={self.normalisation!r} is not one of {list(NORMALISATIONS)}"
        elif self.salience not in SALIENCES:
            bad = f"salience={self.salience!r} is not one of {list(SALIENCES)}"
        elif self.pillar_score not in PILLAR_SCORES:
            bad = f"pillar_score={self.pillar_score!r} is not one of {list(PILLAR_SCORES)}"
        if bad:
            raise RoutingError("nuwa.params", bad)


def stage2_keep(n_v: int) -> int:
    """[nuwa.stage2] Nüwa's stage-2 keep count: 16 / 32 / 48 for 112 / 224 / 336 anchors, else floor(0.1·n_V) >= 1."""
    return STAGE2_KEEP.get(n_v, max(1, math.floor(0.1 * n_v)))


# --- the vision tower ------------------------------------------------------------------------------


def _tower_parts(host: Host):
    """[nuwa.params] The host's CLIP tower, projector and select layer's hidden-state index; others refused."""
    inner = getattr(host.model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    layers = vision_encoder_layers(tower)
    if layers is None or not hasattr(inner, "multi_modal_projector"):
        raise RoutingError(
            "nuwa.params", f"the nuwa reducer needs a LLaVA CLIP tower; {type(host.model).__name__}"
        )
    config = host.model.config
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or strategy != "default":
        raise RoutingError(
            "nuwa.params",
            f"vision_feature_layer={layer!r}, vision_feature_select_strategy={strategy!r}: the nuwa reducer "
            "needs one feature layer and the 'default' strategy (CLS dropped)",
        )
    select = layer % (len(layers) + 1)  # index into hidden_states (0: the embeddings)
    if select < 1:
        raise RoutingError("nuwa.params", f"vision_feature_layer={layer} selects the embeddings, not a layer")
    return tower, inner.multi_modal_projector, select


def encode_images(host: Host, pixel_values: torch.Tensor | None) -> BaseModelOutputWithPooling | None:
    """[nuwa.probe] The vision tower's output with every hidden state, and the host's own projected features.

    One tower forward (any attention kernel, no attention maps); ``pooler_output`` is the per-image list
    ``[P, D]`` exactly as the host's ``get_image_features`` gives it.
    """
    if pixel_values is None:
        return None
    tower, projector, select = _tower_parts(host)
    out = tower(pixel_values.to(host.dtype), output_hidden_states=True, return_dict=True)
    out.pooler_output = list(projector(out.hidden_states[select][:, 1:]))  # [P, D] per image
    return out


def cls_attention(layer: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """[nuwa.probe] The [CLS] row of ``layer``'s attention probabilities ``[H, P + 1]`` from its input ``[P + 1, d_v]``.

    The layer's own ``layer_norm1``, ``q_proj``, ``k_proj`` and ``scale``; only this row is formed.
    """
    attn = layer.self_attn
    x = layer.layer_norm1(states)  # [P + 1, d_v]
    q = attn.q_proj(x[:1]).view(1, attn.num_heads, attn.head_dim).transpose(0, 1)  # [H, 1, hd]
    k = attn.k_proj(x).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)  # [H, P + 1, hd]
    score_dtype = score_dtype_of(states)
    logits = (q.to(score_dtype) @ k.to(score_dtype).transpose(1, 2))[:, 0] * attn.scale  # [H, P + 1]
    return torch.softmax(logits, dim=-1)


def score_dtype_of(states: torch.Tensor) -> torch.dtype:
    """[nuwa.salience] Salience and the pillar quantile in float32 (float64 in a float64 run)."""
    return torch.float64 if states.dtype == torch.float64 else torch.float32


def salience(layer: torch.nn.Module, states: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """[nuwa.salience] ``[P]``: the select layer's [CLS]-row probability at each patch, summed over heads.

    ``kind="cls-key-norm"`` (the paper's Eq. 3) multiplies it by the patch's key norm (``key_norms``).
    """
    scores = cls_attention(layer, states)[:, 1:].sum(dim=0)
    return scores * key_norms(layer, states) if kind == "cls-key-norm" else scores


def key_norms(layer: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """[nuwa.salience] ``[P]``: the L2 norm of each patch's key (all heads) at the select layer, in the score dtype."""
    keys = layer.self_attn.k_proj(layer.layer_norm1(states))[1:]  # [P, d_v]
    return keys.to(score_dtype_of(states)).norm(dim=-1)


# --- anchors (discrete bookkeeping; the optimized path imports these) ------------------------------


def regions(grid: tuple[int, int]) -> list[list[int]]:
    """[nuwa.regions] The 2x2 regions of a ``(h, w)`` grid as patch-index lists, row-major; odd edges 1 wide."""
    h, w = grid
    return [
        [r * w + c for r in range(i, min(i + 2, h)) for c in range(j, min(j + 2, w))]
        for i in range(0, h, 2)
        for j in range(0, w, 2)
    ]


def candidates(scores: Sequence[float], grid: tuple[int, int], top_n: int) -> list[int]:
    """[nuwa.regions] The ``min(top_n, |region|)`` highest-salience patches of every region (ties: lower index)."""
    chosen = []
    for region in regions(grid):
        chosen += sorted(region, key=lambda p: (-scores[p], p))[:top_n]
    return chosen


def anchor_count(params: NuwaParams, grid: tuple[int, int], num_images: int) -> int:
    """[nuwa.anchors] ``min(ceil(tokens / I_b), |candidates|)`` anchors per image of a sample with ``I_b`` images."""
    pool = sum(min(params.top_n, len(region)) for region in regions(grid))
    return min(math.ceil(params.tokens / num_images), pool)


def anchors(scores: Sequence[float], grid: tuple[int, int], top_n: int, count: int) -> tuple[int, ...]:
    """[nuwa.anchors] The ``count`` candidates of highest salience (ties: lower index), in ascending grid order."""
    ranked = sorted(candidates(scores, grid, top_n), key=lambda p: (-scores[p], p))
    return tuple(sorted(ranked[:count]))


def pillar_mask(anchor_scores: torch.Tensor, quantile: float) -> list[bool]:
    """[nuwa.pillars] Per anchor: is its salience at least the ``quantile`` quantile of the anchors' (linear)."""
    scores = anchor_scores.to(score_dtype_of(anchor_scores))
    threshold = torch.quantile(scores, quantile)
    return (scores >= threshold).tolist()


# --- aggregation ---------------------------------------------------------------------------------


def similarity(hidden_states: Sequence[torch.Tensor], layers: tuple[int, int]) -> torch.Tensor:
    """[nuwa.similarity] ``[P, P]`` ReLU cosine of the mean of hidden states ``a..b`` (patch tokens, ``[P + 1, d_v]`` each)."""
    a, b = layers
    mean = torch.stack(list(hidden_states[a : b + 1])).mean(dim=0)[1:]  # [P, d_v]
    unit = F.normalize(mean, p=2, dim=-1)
    return torch.relu(unit @ unit.T)


def proximity(grid: tuple[int, int], distance: float, dtype: torch.dtype) -> torch.Tensor:
    """[nuwa.proximity] ``[P, P]``: ``1 - min(δ / sqrt(D), 1)`` for grid distance δ; D = 0: the identity."""
    h, w = grid
    coords = torch.tensor([(r, c) for r in range(h) for c in range(w)], dtype=torch.float64)
    delta = torch.cdist(coords, coords)  # [P, P]
    if distance == 0:
        return (delta == 0).to(dtype)
    return (1.0 - torch.clamp(delta / math.sqrt(distance), max=1.0)).to(dtype)


def aggregate(features: torch.Tensor, weights: torch.Tensor, anchor: int, normalisation: str) -> torch.Tensor:
    """[nuwa.collectors] A collector's feature ``[d_v]`` from every patch's ``features`` ``[P, d_v]``, weights ``[P]``.

    ``code``: the row over its sum + 1e-8, the self weight then set to 1 (not convex); ``convex``: the row over
    its sum + 1e-8.
    """
    row = weights / (weights.sum() + 1e-8)  # [P]
    if normalisation == "code":
        row = row.clone()
        row[anchor] = 1.0
    return row @ features


@dataclass(frozen=True)
class ImageReduction:
    """One image's stage 1: anchors (patch indices, ascending), which are pillars, and features ``[P, d_v]``.

    ``features`` are the select-layer patch features with every collector's row aggregated.
    """

    anchors: tuple[int, ...]
    pillars: tuple[bool, ...]
    features: torch.Tensor


def reduce_image(
    hidden_states: Sequence[torch.Tensor],
    select_layer: torch.nn.Module,
    select: int,
    grid: tuple[int, int],
    count: int,
    params: NuwaParams,
) -> ImageReduction:
    """[nuwa.anchors] [nuwa.pillars] [nuwa.collectors] Stage 1 of one image from its hidden states ``[P + 1, d_v]``."""
    states = hidden_states[select - 1]  # [P + 1, d_v]: the select layer's input
    scores = salience(select_layer, states, params.salience)  # [P]
    chosen = anchors(scores.tolist(), grid, params.top_n, count)
    by = scores if params.pillar_score == "salience" else key_norms(select_layer, states)
    is_pillar = pillar_mask(by[list(chosen)], params.pillar_quantile)
    x = hidden_states[select][1:]  # [P, d_v]: the features the host projects
    weights = similarity(hidden_states, params.feature_layers) * proximity(grid, params.distance, x.dtype)
    features = x.clone()
    for anchor, pillar in zip(chosen, is_pillar):
        if not pillar:  # a pillar keeps x[anchor] bit for bit
            features[anchor] = aggregate(x, weights[anchor], anchor, params.normalisation)
    return ImageReduction(chosen, tuple(is_pillar), features)


@register_reducer("nuwa")
class NuwaReducer:
    """[nuwa.entering] Nüwa's stage 1 as a vision-side reducer: anchors' rows replaced, entering sets in the layouts."""

    def check(self, params: object) -> None:
        """[nuwa.params] The reducer's record must be a ``NuwaParams``."""
        if not isinstance(params, NuwaParams):
            raise RoutingError(
                "nuwa.params", f"the nuwa reducer needs reducer_params=NuwaParams(...), got {params!r}"
            )

    def model_free_entering(self, params: NuwaParams, num_visual: int) -> tuple[int, ...]:
        """[nuwa.budget] One image of ``num_visual`` tokens on a square grid: as many anchors as a real run keeps.

        The anchors of equal saliences (the lowest index of every region first); only their number matters.
        """
        self.check(params)
        side = math.isqrt(num_visual)
        if side * side != num_visual:
            raise RoutingError("nuwa.budget", f"N={num_visual} visual tokens are not one square image grid")
        grid = (side, side)
        return anchors([0.0] * num_visual, grid, params.top_n, anchor_count(params, grid, 1))

    def encode(self, host: Host, pixel_values: torch.Tensor | None) -> BaseModelOutputWithPooling | None:
        """[nuwa.probe] The tower outputs stage 1 reads (see ``encode_images``)."""
        return encode_images(host, pixel_values)

    def __call__(
        self, embeds: torch.Tensor, layouts: list[SampleLayout], vision: VisionInputs | None = None
    ) -> tuple[torch.Tensor, list[SampleLayout]]:
        """[nuwa.images] [nuwa.projection] Every image on its own grid; one projector call over all images."""
        if vision is None:
            raise RoutingError(
                "nuwa.images", "the nuwa reducer needs the vision tower's outputs (VisionInputs)"
            )
        self.check(vision.params)
        params, host = vision.params, vision.host
        if not any(layout.visual for layout in layouts):
            return embeds, layouts
        reductions = image_reductions(host, vision.outputs, layouts, params)
        _, projector, _ = _tower_parts(host)
        projected = projector(torch.stack([r.features for rs in reductions for r in rs]))  # [I, P, D]
        out, new_layouts, image = embeds.clone(), [], 0
        for b, (layout, per_sample) in enumerate(zip(layouts, reductions)):
            entering = []
            for span, reduction in zip(layout.images, per_sample):
                for a in reduction.anchors:
                    out[b, layout.valid[layout.visual[span.start + a]]] = projected[image, a].to(out.dtype)
                    entering.append(span.start + a)
                image += 1
            new_layouts.append(replace(layout, entering=tuple(entering)) if layout.visual else layout)
        return out, new_layouts


def check_outputs(
    host: Host, outputs: BaseModelOutputWithPooling | None, layouts: list[SampleLayout], params: NuwaParams
) -> tuple[tuple[torch.Tensor, ...], torch.nn.Module, int, torch.nn.Module]:
    """[nuwa.images] The tower's hidden states, select layer, its hidden-state index and the projector, checked.

    Every hidden state must be there (projected features alone are refused), ``feature_layers`` must exist, every
    image span must have a grid of its token count, and the layouts' images must be the tower's.
    """
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is None or any(h is None for h in hidden):
        raise RoutingError(
            "nuwa.images",
            "the nuwa reducer needs every hidden state of the vision tower; projected image features alone "
            "are not enough (give pixel_values)",
        )
    tower, projector, select = _tower_parts(host)
    if params.feature_layers[1] >= len(hidden):
        raise RoutingError(
            "nuwa.params",
            f"feature_layers={params.feature_layers} but the vision tower has {len(hidden) - 1} layers",
        )
    images = 0
    for layout in layouts:
        if layout.visual and not layout.images:
            raise RoutingError("nuwa.images", "a sample's visual tokens have no image spans")
        for span in layout.images:
            if span.grid is None or span.grid[0] * span.grid[1] != span.stop - span.start:
                raise RoutingError("nuwa.images", f"image span {span} has no grid the nuwa reducer can use")
            images += 1
    if images != hidden[0].shape[0]:
        raise RoutingError(
            "nuwa.images", f"{images} images in the layouts but {hidden[0].shape[0]} in the tower"
        )
    return tuple(hidden), vision_encoder_layers(tower)[select - 1], select, projector


def image_reductions(
    host: Host, outputs: BaseModelOutputWithPooling | None, layouts: list[SampleLayout], params: NuwaParams
) -> list[list[ImageReduction]]:
    """[nuwa.images] Per sample, every image's stage 1 in order, each on its own grid, from the tower's outputs."""
    hidden, layer, select, _ = check_outputs(host, outputs, layouts, params)
    reductions, image = [], 0
    for layout in layouts:
        per_sample = []
        for span in layout.images:
            count = anchor_count(params, span.grid, len(layout.images))
            states = [h[image] for h in hidden]  # [P + 1, d_v] per hidden state
            per_sample.append(reduce_image(states, layer, select, span.grid, count, params))
            image += 1
        reductions.append(per_sample)
    return reductions


def stage1_flops(params: NuwaParams, grid: tuple[int, int], width: int, collectors: int) -> dict[str, int]:
    """[nuwa.budget] Stage 1's vision-side FLOPs for one image (2 per multiply-add), by part.

    ``width`` is the vision tower's ``d_v``; ``collectors`` the image's number of collectors.
    """
    P = grid[0] * grid[1]
    a, b = params.feature_layers
    parts = {
        "cls_row": 2 * (P + 1) * width * width + 2 * width * width + 2 * (P + 1) * width,
        "feature_mean": (b - a) * P * width,
        "normalise": 3 * P * width,
        "similarity": 2 * P * P * width,
        "weights": 2 * P * P,
        "aggregation": 2 * collectors * P * width,
    }
    return {**parts, "total": sum(parts.values())}


def nuwa_presets() -> dict[str, RoutingConfig]:
    """[nuwa.stage2] [nuwa.reroute] ``nuwa_avg{64,128,192}`` and ``ours_vs_nuwa_avg{64,128,192}`` (LLaVA-1.5)."""
    presets = {}
    scorer = Scorer(probe_layer="previous")
    for tier, tokens, top_n in ((64, 112, 1), (128, 224, 2), (192, 336, 3)):
        params = NuwaParams(tokens=tokens, top_n=top_n)
        k = stage2_keep(tokens)
        presets[f"nuwa_avg{tier}"] = RoutingConfig(
            Schedule((16,), (k,), unit="count"),
            policy="remove",
            scorer=scorer,
            reducer="nuwa",
            reducer_params=params,
        )
        presets[f"ours_vs_nuwa_avg{tier}"] = RoutingConfig(
            Schedule((16, 20, 24, 28), (k,) * 4, unit="count"),
            policy="reroute",
            scorer=scorer,
            reducer="nuwa",
            reducer_params=params,
        )
    return presets


PRESETS.update(nuwa_presets())  # [schedule.presets]
