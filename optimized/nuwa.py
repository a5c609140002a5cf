"""Nüwa's stage 1, batched over the images of a batch (spec/nuwa.md).

Same rules as ``rerouting.reference.nuwa``; the tensor work runs once per grid shape for all its images:
the [CLS] rows of the select layer as one batched matmul, the similarity and proximity only on the anchors'
rows (``[I, n, P]``, never ``[I, P, P]``), the aggregation as one ``bmm``, then one projector call and one
scatter into the embeddings. The discrete bookkeeping (candidates, anchors, counts, pillars, validations)
is the reference's, imported.

Notation: I images of one grid shape, P patches, d_v vision width, H vision heads, n anchors (padded to the
largest count), B batch, T padded length, D decoder width.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from rerouting.reference import SampleLayout
from rerouting.reference.hooks import VisionInputs
from rerouting.reference.nuwa import (
    NuwaParams,
    anchor_count,
    anchors,
    check_outputs,
    pillar_mask,
    proximity,
    score_dtype_of,
)


def cls_salience(layer: torch.nn.Module, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nuwa.probe] [nuwa.salience] ``[I, P]`` twice: the [CLS]-row probabilities summed over heads, and the
    patches' key norms, from ``[I, P + 1, d_v]``."""
    attn = layer.self_attn
    images, n, _ = states.shape
    x = layer.layer_norm1(states)  # [I, P + 1, d_v]
    q = attn.q_proj(x[:, :1]).view(images, 1, attn.num_heads, attn.head_dim)  # [I, 1, H, hd]
    k = attn.k_proj(x).view(images, n, attn.num_heads, attn.head_dim)  # [I, P + 1, H, hd]
    score_dtype = score_dtype_of(states)
    logits = (
        torch.einsum("ihd,inhd->ihn", q[:, 0].to(score_dtype), k.to(score_dtype)) * attn.scale
    )  # [I, H, P + 1]
    norms = k[:, 1:].reshape(images, n - 1, -1).to(score_dtype).norm(dim=-1)  # [I, P]
    return torch.softmax(logits, dim=-1)[:, :, 1:].sum(dim=1), norms  # [I, P] each


def _reduce_group(
    hidden: tuple[torch.Tensor, ...],
    images: list[int],
    grid: tuple[int, int],
    counts: list[int],
    layer: torch.nn.Module,
    select: int,
    params: NuwaParams,
) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """[nuwa.anchors] [nuwa.pillars] [nuwa.collectors] Stage 1 of the ``images`` (one grid): features ``[I, P, d_v]``."""
    index = torch.tensor(images, device=hidden[0].device)
    scores, norms = cls_salience(layer, hidden[select - 1].index_select(0, index))  # [I, P] each
    if params.salience == "cls-key-norm":
        scores = scores * norms
    by = scores if params.pillar_score == "salience" else norms
    x = hidden[select].index_select(0, index)[:, 1:]  # [I, P, d_v]
    chosen = [anchors(s, grid, params.top_n, c) for s, c in zip(scores.tolist(), counts)]
    n = max(len(a) for a in chosen)
    rows = torch.tensor([list(a) + [a[0]] * (n - len(a)) for a in chosen], device=x.device)  # [I, n], padded
    real = (
        torch.arange(n, device=x.device)[None]
        < torch.tensor([len(a) for a in chosen], device=x.device)[:, None]
    )
    collector = torch.zeros(len(images), n, dtype=torch.bool, device=x.device)  # [I, n]
    for i, a in enumerate(chosen):
        pillars = pillar_mask(by[i, list(a)], params.pillar_quantile)
        collector[i, : len(a)] = ~torch.tensor(pillars, device=x.device)
    a, b = params.feature_layers
    mean = torch.stack([h.index_select(0, index) for h in hidden[a : b + 1]]).mean(dim=0)[
        :, 1:
    ]  # [I, P, d_v]
    unit = F.normalize(mean, p=2, dim=-1)
    anchor_unit = unit.gather(1, rows[..., None].expand(-1, -1, unit.shape[-1]))  # [I, n, d_v]
    near = proximity(grid, params.distance, x.dtype).to(x.device)[rows]  # [I, n, P]
    weights = torch.relu(anchor_unit @ unit.transpose(1, 2)) * near  # [I, n, P]
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-8)
    if params.normalisation == "code":
        weights.scatter_(2, rows[..., None], 1.0)  # self weight 1
    aggregated = torch.bmm(weights, x)  # [I, n, d_v]
    features = x.clone()
    take = collector & real  # [I, n]: only collectors move; pillars keep x bit for bit
    image_rows = torch.arange(len(images), device=x.device)[:, None].expand_as(rows)
    features[image_rows[take], rows[take]] = aggregated[take]
    return features, chosen


def reduce_batch(
    embeds: torch.Tensor, layouts: list[SampleLayout], vision: VisionInputs
) -> tuple[torch.Tensor, list[SampleLayout]]:
    """[nuwa.images] [nuwa.projection] [nuwa.entering] The ``nuwa`` reducer on a batch: embeddings and layouts out."""
    params = vision.params
    if not any(layout.visual for layout in layouts):
        return embeds, layouts
    hidden, layer, select, projector = check_outputs(vision.host, vision.outputs, layouts, params)
    spans = [(b, span, len(layout.images)) for b, layout in enumerate(layouts) for span in layout.images]
    features = hidden[select][:, 1:].clone()  # [I, P, d_v]
    chosen: list[tuple[int, ...]] = [()] * len(spans)
    for grid in sorted({span.grid for _, span, _ in spans}):
        images = [i for i, (_, span, _) in enumerate(spans) if span.grid == grid]
        counts = [anchor_count(params, grid, spans[i][2]) for i in images]
        reduced, picked = _reduce_group(hidden, images, grid, counts, layer, select, params)
        features[torch.tensor(images, device=features.device)] = reduced
        for i, a in zip(images, picked):
            chosen[i] = a
    projected = projector(features)  # [I, P, D]: one call, the host's own shape
    rows, image_index, patch_index, entering = [], [], [], [[] for _ in layouts]
    for i, ((b, span, _), a) in enumerate(zip(spans, chosen)):
        layout = layouts[b]
        for p in a:
            rows.append((b, int(layout.valid[layout.visual[span.start + p]])))
            image_index.append(i)
            patch_index.append(p)
            entering[b].append(span.start + p)
    out = embeds.clone()
    batch_rows = torch.tensor([r[0] for r in rows], device=embeds.device)
    columns = torch.tensor([r[1] for r in rows], device=embeds.device)
    source = projected[
        torch.tensor(image_index, device=embeds.device), torch.tensor(patch_index, device=embeds.device)
    ]
    out[batch_rows, columns] = source.to(out.dtype)
    new = [replace(lay, entering=tuple(e)) if lay.visual else lay for lay, e in zip(layouts, entering)]
    return out, new
