"""The Qwen2.5-VL host adapter (spec/layout.md: ``layout.rotary-ids``, ``layout.image-grid``).

Qwen2.5-VL is LLaVA's structure with three differences routing sees: images have a grid
(``image_grid_thw``; the number of visual tokens differs per image), the rotary embedding is mRoPE over
``(t, h, w)`` ids from the model's own ``get_rope_index``, and q/k/v projections have biases (the probe
calls the modules, so nothing changes there). Positions (ranks) and ids are kept apart: the host turns
ranks into ids only inside ``rotary_embeddings``, through a ``RotaryIds`` table built from the layouts.

Notation: B batch, T padded length, T_b valid length, D hidden, n positions, R = 3 rotary axes.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

import torch
from packaging.version import Version
from torch import nn

from .host import (
    DecoderHost,
    ImageSpan,
    RotaryIds,
    SampleLayout,
    register_host,
    scatter_features,
)
from .schedule import RoutingError

#: transformers releases before this one compute wrong mRoPE ids for still images ([layout.rotary-ids]).
MROPE_FIXED = Version("5.6")
MROPE_ISSUE = "huggingface/transformers#45325 (fixed by #45330)"


def mrope_release_ok(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) computes Qwen2.5-VL's mRoPE ids correctly."""
    installed = importlib.metadata.version("transformers") if version is None else version
    return Version(installed) >= MROPE_FIXED


def check_mrope_release(version: str | None = None) -> None:
    """[layout.rotary-ids] Refuse a transformers whose ``get_rope_index`` scales image ``t`` ids (before 5.6)."""
    installed = importlib.metadata.version("transformers") if version is None else version
    if Version(installed) < MROPE_FIXED:
        raise RoutingError(
            "layout.rotary-ids",
            f"transformers {installed} computes wrong mRoPE position ids for Qwen2.5-VL images "
            f"({MROPE_ISSUE}); install transformers>={MROPE_FIXED},<6",
        )


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``(start, stop)`` of every maximal run of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate((*flags, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _grid_from_ids(span: ImageSpan, visual: Sequence[int], rotary: torch.Tensor) -> ImageSpan:
    """[layout.image-grid] A span without a grid (no ``image_grid_thw``) gets the one its mRoPE h/w ids fill."""
    if span.grid is not None or span.stop <= span.start:
        return span
    at = torch.tensor(visual[span.start : span.stop])
    h, w = rotary[1, at], rotary[2, at]
    grid = (int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1)
    cells = set(zip((h - h.min()).tolist(), (w - w.min()).tolist()))
    if grid[0] * grid[1] != span.stop - span.start or len(cells) != span.stop - span.start:
        return span
    return ImageSpan(span.start, span.stop, grid)


@register_host("Qwen2_5_VLForConditionalGeneration")
class Qwen2_5_VLHost(DecoderHost):
    """Adapter for ``transformers.Qwen2_5_VLForConditionalGeneration`` (Qwen2 decoder, mRoPE, GQA, q/k biases)."""

    rotary_axes = 3  # (t, h, w) ids ([layout.rotary-ids])

    def __init__(self, model: nn.Module):
        super().__init__(model)  # the class check first, as for every host
        check_mrope_release()
        text_config = self.config.get_text_config()
        kinds = tuple(getattr(text_config, "layer_types", None) or ("full_attention",) * len(self.layers))
        if getattr(text_config, "use_sliding_window", False) or set(kinds) != {"full_attention"}:
            raise RoutingError(
                "routing.errors",
                f"Qwen2.5-VL decoder layer types {sorted(set(kinds))} (use_sliding_window="
                f"{getattr(text_config, 'use_sliding_window', False)}): routing supports full_attention layers only",
            )
        self.video_token_id: int = self.config.video_token_id
        self.merge: int = self.config.vision_config.spatial_merge_size

    # --- inputs ----------------------------------------------------------------------------------------
    def check_no_video(self, input_ids: torch.Tensor, **inputs) -> None:
        """[layout.image-grid] Video inputs are refused (video tokens are not defined as visual yet)."""
        given = [name for name, value in inputs.items() if value is not None]
        if given:
            raise RoutingError("layout.image-grid", f"video inputs {given} are not supported (images only)")
        count = int((input_ids == self.video_token_id).sum())
        if count:
            raise RoutingError(
                "layout.image-grid",
                f"input has {count} video placeholder tokens (id {self.video_token_id}); video is not supported",
            )

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[layout.rotary-ids] ``[B, T]`` int: 1 at every image placeholder, 0 elsewhere (markers are text)."""
        return (input_ids == self.image_token_id).int()

    def tokens_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        """[layout.image-grid] ``t·gh·gw / m²`` visual tokens of every image of ``image_grid_thw`` ``[I, 3]``."""
        return [int(t * h * w) // self.merge**2 for t, h, w in image_grid_thw.tolist()]

    def rope_index(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[layout.rotary-ids] The model's own ``get_rope_index``: ids ``[3, B, T]`` (padding 0) and deltas ``[B]``."""
        placeholders = int((input_ids == self.image_token_id).sum())
        if placeholders and image_grid_thw is None:
            raise RoutingError(
                "layout.image-grid",
                f"input has {placeholders} image placeholder tokens but no image_grid_thw: the mRoPE ids "
                "cannot be computed (routing never falls back to 1-D positions)",
            )
        ids, deltas = self.model.model.get_rope_index(
            input_ids,
            self.mm_token_type_ids(input_ids),
            image_grid_thw=image_grid_thw if placeholders else None,
            attention_mask=attention_mask,
        )
        return ids, deltas.reshape(-1)

    # --- the Host protocol ------------------------------------------------------------------------------
    def layouts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[SampleLayout]:
        """[layout.sequence] [layout.rotary-ids] [layout.image-grid] Positions, visual set, images and mRoPE ids.

        ``position_ids``: ``[3, B, T]`` mRoPE ids the caller already has (``generate`` passes them, after the
        grids are gone); otherwise they come from ``get_rope_index`` with ``image_grid_thw``.
        """
        self.check_no_video(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        spans = self._spans(
            input_ids, attention_mask, image_grid_thw
        )  # before get_rope_index reads the grids
        if position_ids is None:
            ids, _ = self.rope_index(input_ids, attention_mask, image_grid_thw)
        else:
            if position_ids.dim() != 3 or position_ids.shape[0] != 3:
                raise RoutingError(
                    "layout.rotary-ids",
                    f"Qwen2.5-VL position ids must be [3, B, T] (t, h, w), got shape {tuple(position_ids.shape)}",
                )
            ids = position_ids
            if image_grid_thw is not None or not bool((input_ids == self.image_token_id).any()):
                own, _ = self.rope_index(input_ids, attention_mask, image_grid_thw)
                differs = (ids.to(own.device) != own) & attention_mask.bool().to(own.device)[None]
                if bool(differs.any()):
                    raise RoutingError(
                        "layout.rotary-ids",
                        f"position ids {ids.tolist()} differ from the host's own mRoPE ids {own.tolist()} "
                        "on valid tokens",
                    )
        out = []
        for b, mask in enumerate(attention_mask):
            valid = mask.nonzero().flatten()
            is_visual = (input_ids[b, valid] == self.image_token_id).tolist()
            visual = tuple(i for i, v in enumerate(is_visual) if v)
            text = tuple(i for i, v in enumerate(is_visual) if not v)
            rotary = ids[:, b, valid.to(ids.device)].cpu().long()  # [3, T_b]
            delta = int(rotary.max()) + 1 - len(valid) if len(valid) else 0
            images = tuple(_grid_from_ids(span, visual, rotary) for span in spans[b])
            out.append(SampleLayout(valid, visual, text, images, rotary, delta))
        return out

    def _spans(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None
    ) -> list[tuple[ImageSpan, ...]]:
        """[layout.image-grid] Every sample's image spans (visual indices) with their token grids, checked."""
        counts = None if image_grid_thw is None else self.tokens_per_image(image_grid_thw)
        out, image = [], 0
        for b, (row, mask) in enumerate(zip(input_ids, attention_mask)):
            is_visual = (row[mask.bool()] == self.image_token_id).tolist()
            spans = []
            for start, stop in _runs(is_visual):
                first = sum(is_visual[:start])  # visual index of the run's first token
                grid = None
                if counts is not None:
                    if image >= len(counts) or counts[image] != stop - start:
                        got = "no grid" if image >= len(counts) else f"grid {image_grid_thw[image].tolist()}"
                        raise RoutingError(
                            "layout.image-grid",
                            f"sample {b}: an image run of {stop - start} placeholder tokens but {got} "
                            f"({len(counts)} grids give {counts} tokens)",
                        )
                    _, gh, gw = image_grid_thw[image].tolist()
                    grid = (gh // self.merge, gw // self.merge)
                    image += 1
                spans.append(ImageSpan(first, first + stop - start, grid))
            out.append(tuple(spans))
        if counts is not None and image != len(counts):
            raise RoutingError(
                "layout.image-grid",
                f"image_grid_thw has {len(counts)} images but the input has {image} image runs",
            )
        return out

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[layout.visual-set] [layout.image-grid] Token embeddings with the vision tower's per-image features scattered in.

        Features come from the model's own ``get_image_features(pixel_values, image_grid_thw)`` or are the
        per-image ``image_features`` ``generate`` computed with it; placeholders are filled in batch order.
        """
        self.check_no_video(input_ids)
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        placeholders = input_ids == self.image_token_id  # [B, T]
        n_tokens = int(placeholders.sum())
        if image_features is not None:
            if pixel_values is not None:
                raise RoutingError("layout.visual-set", "give pixel_values or image features, not both")
            source, features = "", image_features
        elif pixel_values is None:
            if n_tokens:
                raise RoutingError(
                    "layout.visual-set", f"input has {n_tokens} image placeholder tokens but no pixel_values"
                )
            return embeds
        else:
            if image_grid_thw is None:
                raise RoutingError(
                    "layout.image-grid",
                    f"pixel_values of shape {tuple(pixel_values.shape)} without image_grid_thw",
                )
            source = "the vision tower gave "
            pixel_values = pixel_values.to(self.dtype)
            features = self.model.model.get_image_features(
                pixel_values=pixel_values, image_grid_thw=image_grid_thw, return_dict=True
            ).pooler_output
        return scatter_features(embeds, placeholders, features, self.image_token_id, source)

    def rotary_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor, ids: RotaryIds | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[routing.active.positions] [layout.rotary-ids] cos, sin ``[B, n, hd]`` at the mRoPE ids of positions ``[B, n]``.

        The ids come from ``ids`` (the batch's table); without one this is an error, never 1-D RoPE.
        """
        if ids is None:
            raise RoutingError(
                "layout.rotary-ids",
                "Qwen2.5-VL rotary embeddings need the batch's mRoPE ids; positions alone would be 1-D RoPE",
            )
        return self.rotary(hidden, ids.lookup(positions))  # ids: [3, B, n]
