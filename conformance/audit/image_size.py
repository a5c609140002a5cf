"""``--image-size WxH`` of ``rerouting audit``: the visual-token count N an image of that size gives.

- **Qwen2-VL / Qwen2.5-VL** ([layout.image-grid]): the image processor resizes the image with
  ``smart_resize`` (transformers, ``models/qwen2_vl/image_processing_qwen2_vl.py``; the PIL backend
  ``image_processing_pil_qwen2_vl.py`` holds a copy): both sides are rounded to multiples of
  ``factor = patch_size · merge_size`` (14 · 2 = 28), then scaled down (up) when the area exceeds
  ``max_pixels`` (is below ``min_pixels``), the aspect ratio kept as closely as possible. The resized image
  is cut into ``gh × gw`` patches of 14 px (``image_grid_thw = (1, gh, gw)``), and the vision tower's 2×2
  merger turns them into ``N = (gh/2)·(gw/2) = (h/28)·(w/28)`` visual tokens. ``min_pixels`` and
  ``max_pixels`` default to the processor's class defaults (``Qwen2VLImageProcessor.size``: 56·56 and
  28·28·1280); ``--min-pixels`` / ``--max-pixels`` set a checkpoint's own values (the Reroute release runs
  Qwen2.5-VL-7B with ``max_pixels = 451584 = 576·28²``, research/reroute.md §5.5).
- **LLaVA-1.5** (``model_type`` ``llava``): the CLIP processor resizes the shortest side to the tower's
  ``image_size`` and centre-crops a square (336 × 336 for LLaVA-1.5), so every image gives the same
  ``(image_size / patch_size)² = 576`` tokens; the report says so.
- Any other model (LLaVA-NeXT's any-resolution tiling, ...): an error naming the model type; use
  ``--visual-tokens``.

The arithmetic is a copy of transformers' function (so the audit needs no image-processing dependency);
``tests/test_audit_image_size.py`` pins it against the transformers function itself.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

# Qwen2VLImageProcessor.size (transformers 5.x): {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
SMART_RESIZE_SOURCE = (
    "transformers models/qwen2_vl/image_processing_qwen2_vl.py smart_resize "
    "(factor = patch_size · merge_size; min_pixels, max_pixels)"
)
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_image_size(text: str) -> tuple[int, int]:
    """argparse ``type`` of ``--image-size``: ``"640x480"`` → ``(640, 480)`` (width, height), both ≥ 1."""
    found = _SIZE.match(text)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 640x480")
    width, height = int(found[1]), int(found[2])
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be at least 1 pixel")
    return width, height


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule, as transformers' ``smart_resize``: the ``(height, width)`` the image is resized to.

    Both multiples of ``factor``; the area within ``[min_pixels, max_pixels]``; the aspect ratio kept as
    closely as possible. Raises ``ValueError`` for an aspect ratio above 200, as transformers does.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width):g}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_geometry(config: Any) -> dict | None:
    """What ``--image-size`` needs from a model config: the resize rule and the patch sizes, or None."""
    model_type = str(getattr(config, "model_type", ""))
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    if model_type in QWEN_MODEL_TYPES:
        return {
            "rule": "smart_resize",
            "patch_size": int(vision.patch_size),
            "merge_size": int(vision.spatial_merge_size),
            "temporal_patch_size": int(getattr(vision, "temporal_patch_size", 2)),
        }
    if model_type == "llava":
        return {"rule": "fixed", "image_size": int(vision.image_size), "patch_size": int(vision.patch_size)}
    return None


def image_layout(
    geometry: dict | None,
    model_type: str,
    size: tuple[int, int],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> dict:
    """The ``layout.image`` record of an image of ``size = (width, height)``: its resized size, grid and N.

    Raises ``ValueError`` (the audit turns it into an error naming the option) when the model has no
    size rule here or the size is refused by it.
    """
    width, height = size
    text = f"{width}x{height}"
    if geometry is None:
        raise ValueError(
            f"--image-size {text}: model_type {model_type!r} has no image-size rule here (Qwen2-VL/Qwen2.5-VL: "
            "smart resize; LLaVA-1.5: a fixed square crop); give --visual-tokens N instead"
        )
    if geometry["rule"] == "fixed":
        if min_pixels is not None or max_pixels is not None:
            raise ValueError("--min-pixels/--max-pixels apply to Qwen2-VL/Qwen2.5-VL's smart resize only")
        side, patch = geometry["image_size"], geometry["patch_size"]
        grid = side // patch
        return {
            "size": [width, height],
            "rule": "fixed",
            "resized": [side, side],
            "grid_thw": None,
            "merged_grid": [grid, grid],
            "num_visual": grid * grid,
            "source": "LLaVA-1.5's CLIP processor: shortest side resized to the tower's image_size, centre crop",
            "note": (
                f"LLaVA-1.5 resizes and centre-crops every image to {side}x{side} ({grid}x{grid} patches of "
                f"{patch} px): N = {grid * grid} whatever the image size"
            ),
        }
    factor = geometry["patch_size"] * geometry["merge_size"]
    low = QWEN_MIN_PIXELS if min_pixels is None else min_pixels
    high = QWEN_MAX_PIXELS if max_pixels is None else max_pixels
    if low > high:
        raise ValueError(f"--min-pixels {low} is above --max-pixels {high}")
    try:
        resized_h, resized_w = smart_resize(height, width, factor, low, high)
    except ValueError as error:
        raise ValueError(f"--image-size {text}: {error} (smart resize)") from None
    gh, gw = resized_h // geometry["patch_size"], resized_w // geometry["patch_size"]
    merged = [gh // geometry["merge_size"], gw // geometry["merge_size"]]
    return {
        "size": [width, height],
        "rule": "smart_resize",
        "resized": [resized_w, resized_h],
        "grid_thw": [1, gh, gw],
        "merged_grid": merged,
        "num_visual": merged[0] * merged[1],
        "factor": factor,
        "min_pixels": low,
        "max_pixels": high,
        "pixels_source": {
            "min_pixels": "processor default" if min_pixels is None else "--min-pixels",
            "max_pixels": "processor default" if max_pixels is None else "--max-pixels",
        },
        "source": SMART_RESIZE_SOURCE,
        "note": (
            f"smart resize: {width}x{height} → {resized_w}x{resized_h} (multiples of {factor}), "
            f"grid (1, {gh}, {gw}) patches, {merged[0]}x{merged[1]} merged: N = {merged[0] * merged[1]}"
        ),
    }
