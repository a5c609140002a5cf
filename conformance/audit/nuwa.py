"""[nuwa.budget] Nüwa's stage 1 in the audit: its vision-side cost, reported apart from the decoder's budgets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rerouting.reference.archs import load_arch
from rerouting.reference.hooks import reducer_for
from rerouting.reference.nuwa import pillar_mask, stage1_flops

from .models import ModelInfo


def vision_width(model: ModelInfo) -> int | None:
    """The vision tower's width ``d_v`` from the model's config (None where it has no vision config)."""
    if model.source == "embedded":
        config = load_arch(model.name)[0]
        vision = getattr(config, "vision_config", None)
        return getattr(vision, "hidden_size", None)
    vision = json.loads(Path(model.source).read_text()).get("vision_config") or {}
    return vision.get("hidden_size")


def vision_side(config, num_visual: int, width: int) -> dict:
    """[nuwa.budget] One image's stage-1 FLOPs by part, for the anchors and collectors a real run has."""
    params = config.reducer_params
    anchors = reducer_for(config).model_free_entering(params, num_visual)
    distinct = torch.arange(
        len(anchors), dtype=torch.float64
    )  # distinct saliences: the pillars a real run has
    collectors = len(anchors) - sum(pillar_mask(distinct, params.pillar_quantile))
    side = int(num_visual**0.5)
    return {
        "rule": "nuwa.budget",
        "per": "image",
        "anchors": len(anchors),
        "collectors": collectors,
        "vision_width": width,
        "flops": stage1_flops(params, (side, side), width, collectors),
        "note": "vision side (CLIP): not in any decoder convention's total",
    }


def add_vision_side(audited: Sequence[dict], schedules, num_visual: int, model: ModelInfo) -> list[str]:
    """Every run of a schedule with the ``nuwa`` reducer gets ``vision_side``; one note per such schedule."""
    notes = []
    width = None
    for entry, schedule in zip(audited, schedules):
        if schedule.config.reducer == "identity":
            continue
        width = vision_width(model) if width is None else width
        if width is None:
            notes.append(f"{entry['name']}: the model has no vision config, so stage 1's cost is not counted")
            continue
        record = vision_side(schedule.config, num_visual, width)
        for run in entry["runs"]:
            run["vision_side"] = record
        parts = record["flops"]
        notes.append(
            f"{entry['name']}: Nüwa stage 1 runs on the vision side, apart from the decoder totals: "
            f"{parts['total'] / 1e9:.3f} GFLOPs per image (similarity {parts['similarity'] / 1e9:.3f}, "
            f"[CLS] row {parts['cls_row'] / 1e9:.3f}, aggregation of {record['collectors']} collectors "
            f"{parts['aggregation'] / 1e9:.3f}; {record['anchors']} anchors, d_v = {width}) [nuwa.budget]"
        )
    return notes
