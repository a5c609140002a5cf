"""A case's inputs changed for one check: one sample alone, one image more or fewer (LLaVA and Qwen2.5-VL).

On LLaVA ``pixel_values`` has one row per image; on Qwen2.5-VL one row per 14-px patch (``gh·gw`` per
image) and ``image_grid_thw`` one row per image, so an image is added or dropped in both.
"""

from __future__ import annotations

import torch

from .strategies import Case


def one_image_more(case: Case, inputs: dict) -> dict:
    """``inputs`` with the batch's first image given twice: pixels (and on Qwen its grid) for no placeholders."""
    pixels = inputs["pixel_values"]
    if not case.host.is_qwen:
        return dict(inputs, pixel_values=torch.cat([pixels, pixels[:1]]))
    grid = inputs["image_grid_thw"]
    patches = _patches(case)[0]
    return dict(
        inputs, pixel_values=torch.cat([pixels, pixels[:patches]]), image_grid_thw=torch.cat([grid, grid[:1]])
    )


def one_image_fewer(case: Case, inputs: dict) -> dict:
    """``inputs`` without the batch's last image's pixels (and on Qwen its grid); None when it was the only one."""
    if inputs["pixel_values"] is None:
        return inputs
    if not case.host.is_qwen:
        pixels = inputs["pixel_values"]
        return dict(inputs, pixel_values=pixels[:-1] if pixels.shape[0] > 1 else None)
    patches, grid = _patches(case), inputs["image_grid_thw"]
    if len(patches) == 1:
        return dict(inputs, pixel_values=None, image_grid_thw=None)
    return dict(inputs, pixel_values=inputs["pixel_values"][: -patches[-1]], image_grid_thw=grid[:-1])


def _patches(case: Case) -> list[int]:
    """Qwen: the pixel rows (14-px patches) of every image of the batch, in batch order."""
    return [gh * gw for g in case.layout._grids() for gh, gw in g]


def _image_rows(case: Case, b: int) -> tuple[slice, slice]:
    """Sample ``b``'s rows of ``pixel_values`` and of ``image_grid_thw`` (LLaVA: one pixel row per image)."""
    images = case.layout.images
    first, count = sum(images[:b]), images[b]
    if not case.host.is_qwen:
        return slice(first, first + count), slice(first, first + count)
    patches = _patches(case)
    start = sum(patches[:first])
    return slice(start, start + sum(patches[first : first + count])), slice(first, first + count)


def sample_inputs(
    case: Case, b: int, extra_tokens: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """Sample ``b`` of ``case``'s batch alone and unpadded (CPU), optionally followed by ``extra_tokens``."""
    inputs = case.inputs()
    mask = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][mask]
    if extra_tokens is not None:
        ids = torch.cat([ids, extra_tokens.to(ids.dtype)])
    pixels, has_images = inputs["pixel_values"], case.layout.images[b] > 0
    rows, grid_rows = _image_rows(case, b)
    out = {
        "input_ids": ids[None],
        "attention_mask": torch.ones_like(ids)[None],
        "pixel_values": pixels[rows] if pixels is not None and has_images else None,
    }
    if case.host.is_qwen:
        grid = inputs["image_grid_thw"]
        out["image_grid_thw"] = grid[grid_rows] if grid is not None and has_images else None
    return out
