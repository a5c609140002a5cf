"""What ``rerouting audit`` does differently on a Qwen2-VL / Qwen2.5-VL model than on LLaVA-1.5.

- ``--schedule release`` (and the default, no ``--schedule``) means the model's own release schedules:
  the 12 LLaVA-1.5 presets on LLaVA, the 12 ``qwen25vl_*`` presets on Qwen (group ``qwen25vl_release``,
  which names them on any model);
- ``--image-size WxH``: N from the model's own resize rule (``image_size``);
- the notes about preset labels: LLaVA's hold on 32 layers and N = 576 only; the Qwen presets copy LLaVA's
  ratios at Qwen's layers, so their ``avgNN`` labels are nominal there (research/reroute.md §3 item 4).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rerouting.reference.archs import ArchSpec

from .image_size import QWEN_MODEL_TYPES, image_layout
from .inputs import QWEN_RELEASE_SCHEDULES, SCHEDULE_GROUPS, AuditError, AuditSchedule
from .models import ModelInfo


def is_qwen(model_type: str) -> bool:
    """A Qwen2-VL / Qwen2.5-VL model (``config.model_type``)."""
    return model_type in QWEN_MODEL_TYPES


def schedule_groups(model_type: str) -> dict[str, tuple[str, ...]]:
    """The ``--schedule`` groups on this model: ``release`` is the Qwen release on a Qwen model."""
    if is_qwen(model_type):
        return {**SCHEDULE_GROUPS, "release": QWEN_RELEASE_SCHEDULES}
    return dict(SCHEDULE_GROUPS)


def preset_notes(
    schedules: Sequence[AuditSchedule], arch: ArchSpec, num_visual: int, model_type: str
) -> list[str]:
    """[budget.avg-tokens] Why a preset's ``avgNN`` label may not hold on this model and N."""
    presets = [s for s in schedules if s.source == "preset"]
    qwen_presets = [s for s in presets if s.name.startswith("qwen25vl_")]
    notes = []
    if len(qwen_presets) < len(presets) and (arch.num_layers != 32 or num_visual != 576):
        notes.append(
            "The presets are LLaVA-1.5 schedules (32 layers, N = 576): their avgNN labels hold only there; "
            f"here L = {arch.num_layers} and N = {num_visual}, so a missed label is expected."
        )
    if qwen_presets:
        notes.append(
            "The qwen25vl presets are the release's Qwen2.5-VL-7B schedules: LLaVA-1.5's keep ratios (of each "
            "image's own N) at Qwen's layers, so their avgNN labels are LLaVA's and nominal here (research/"
            "reroute.md §3 item 4); the ratios (66.7 / 77.8 / 88.9 % fewer visual tokens) are the meaningful "
            f"labels. L = {arch.num_layers}, N = {num_visual}: a missed label is expected."
        )
    return notes


def image_setting(args: argparse.Namespace, model: ModelInfo) -> dict | None:
    """[layout.image-grid] ``--image-size`` (with ``--min-pixels`` / ``--max-pixels``): the image's record, or None."""
    pixels = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    if args.image_size is None:
        given = [f"--{k.replace('_', '-')}" for k, v in pixels.items() if v is not None]
        if given:
            raise AuditError(f"{' and '.join(given)} only works with --image-size WxH")
        return None
    if args.visual_tokens is not None:
        raise AuditError(
            f"--image-size {args.image_size[0]}x{args.image_size[1]} and --visual-tokens {args.visual_tokens} "
            "both set N: give one"
        )
    try:
        return image_layout(model.vision, model.model_type, args.image_size, **pixels)
    except ValueError as error:
        raise AuditError(f"--model {model.name}: {error}") from None
