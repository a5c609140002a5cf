"""The Qwen3-VL and Qwen3.5 host adapters (spec/hosts.md).

Both keep Qwen2.5-VL's inputs (``image_grid_thw``, mRoPE ids from the model's own ``get_rope_index``,
positions and ids kept apart; reference/host_qwen.py) and differ in the decoder:

- **Qwen3-VL**: q/k norms over ``head_dim`` before RoPE ([hosts.qk-norm]), ``head_dim`` its own config
  field, interleaved mRoPE (the model's own rotary, so nothing changes here), and DeepStack: the vision
  tower's extra feature levels are added to the visual rows right after decoder layers ``0 .. L_ds-1``
  ([hosts.deepstack]).
- **Qwen3.5**: hybrid; most layers are Gated DeltaNet linear attention, every ``full_attention_interval``-th
  layer softmax attention with a gated query projection ([hosts.gated-query]), zero-centred q/k norms and
  partial rotary ([hosts.partial-rotary]). Decisions and probes only at softmax layers
  ([hosts.linear.decisions]); what a deferred token does at a linear layer is [hosts.linear.semantics].

Notation: B batch, T padded length, D hidden, L_ds DeepStack levels.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

import torch
from packaging.version import Version
from torch import nn

from .compat import linear_cache_protocol
from .host import DecoderHost, register_host, scatter_features
from .host_qwen import MROPE_FIXED, Qwen2_5_VLHost
from .schedule import RoutingError

#: Linear-attention layer type names of ``layer_types`` -> the host's layer kind.
LAYER_KINDS = {"full_attention": "softmax", "linear_attention": "linear"}


def qwen3_release_refusal(family: str, version: str | None = None) -> str | None:
    """Why the installed transformers (or ``version``) cannot serve ``family`` ("qwen3-vl", "qwen3.5"); None if it can."""
    installed = importlib.metadata.version("transformers") if version is None else version
    if Version(installed) < MROPE_FIXED:
        return (
            f"transformers {installed}: rerouting's Qwen hosts need transformers>={MROPE_FIXED},<6 (the release "
            "with the fixed mRoPE ids, huggingface/transformers#45330, that the Qwen hosts are tested from)"
        )
    if family == "qwen3.5" and version is None:
        return linear_cache_protocol()
    return None


def _check_release(family: str) -> None:
    """[routing.errors] Refuse a transformers that cannot serve ``family``."""
    reason = qwen3_release_refusal(family)
    if reason is not None:
        raise RoutingError("routing.errors", f"{family} host refused: {reason}")


class _Qwen3Host(Qwen2_5_VLHost):
    """What Qwen3-VL and Qwen3.5 share: Qwen2.5-VL's inputs and rotary ids, a release check of their own."""

    family = ""

    def __init__(self, model: nn.Module):
        DecoderHost.__init__(self, model)  # the class check first, as for every host
        _check_release(self.family)
        self.video_token_id: int = self.config.video_token_id
        self.merge: int = self.config.vision_config.spatial_merge_size


@register_host("Qwen3VLForConditionalGeneration")
class Qwen3VLHost(_Qwen3Host):
    """Adapter for ``transformers.Qwen3VLForConditionalGeneration`` (q/k norms, interleaved mRoPE, DeepStack)."""

    family = "qwen3-vl"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        text_config = self.config.get_text_config()
        kinds = set(getattr(text_config, "layer_types", None) or ("full_attention",))
        if kinds != {"full_attention"}:
            raise RoutingError(
                "routing.errors",
                f"Qwen3-VL decoder layer types {sorted(kinds)}: routing supports full_attention layers only",
            )
        self.deepstack_levels: int = len(self.config.vision_config.deepstack_visual_indexes)

    def embed_deepstack(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: Sequence[torch.Tensor] | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        deepstack_features: Sequence[Sequence[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[hosts.deepstack] [layout.visual-set] Token embeddings with image features, and the DeepStack levels.

        One pass of the model's own ``get_image_features(pixel_values, image_grid_thw)`` gives both the
        merged features and ``deepstack_features`` (per level, per image); or the caller gives both
        (``generate``'s ``mm_encoder_outputs``). Each level is scattered into the placeholder slots of a
        zero ``[B, T, D]``. Without images there is no injection (as in the model: ``()``).
        """
        self.check_no_video(input_ids)
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        placeholders = input_ids == self.image_token_id  # [B, T]
        n_tokens = int(placeholders.sum())
        if image_features is not None:
            if pixel_values is not None:
                raise RoutingError("layout.visual-set", "give pixel_values or image features, not both")
            if deepstack_features is None:
                raise RoutingError(
                    "hosts.deepstack",
                    "image features without their DeepStack features: Qwen3-VL adds "
                    f"{self.deepstack_levels} feature levels to the visual rows (pass deepstack_features)",
                )
            source, features, levels = "", image_features, deepstack_features
        elif pixel_values is None:
            if n_tokens:
                raise RoutingError(
                    "layout.visual-set", f"input has {n_tokens} image placeholder tokens but no pixel_values"
                )
            return embeds, ()
        else:
            if image_grid_thw is None:
                raise RoutingError(
                    "layout.image-grid",
                    f"pixel_values of shape {tuple(pixel_values.shape)} without image_grid_thw",
                )
            source = "the vision tower gave "
            encoded = self.model.model.get_image_features(
                pixel_values=pixel_values.to(self.dtype), image_grid_thw=image_grid_thw, return_dict=True
            )
            features, levels = encoded.pooler_output, encoded.deepstack_features
        if len(levels) != self.deepstack_levels:
            raise RoutingError(
                "hosts.deepstack",
                f"{len(levels)} DeepStack feature levels, but the vision tower has {self.deepstack_levels}",
            )
        embeds = scatter_features(embeds, placeholders, features, self.image_token_id, source)
        zeros = torch.zeros_like(embeds)
        injected = tuple(
            scatter_features(zeros, placeholders, level, self.image_token_id, source) for level in levels
        )
        return embeds, injected


@register_host("Qwen3_5ForConditionalGeneration")
class Qwen3_5Host(_Qwen3Host):
    """Adapter for ``transformers.Qwen3_5ForConditionalGeneration`` (hybrid: Gated DeltaNet + gated softmax layers)."""

    family = "qwen3.5"
    query_gate = True  # q_proj gives [query, gate] per head ([hosts.gated-query])

    def __init__(self, model: nn.Module):
        super().__init__(model)
        types = tuple(self.config.get_text_config().layer_types)
        unknown = sorted(set(types) - set(LAYER_KINDS))
        if unknown:
            raise RoutingError(
                "routing.errors",
                f"Qwen3.5 decoder layer types {unknown}: routing supports {sorted(LAYER_KINDS)} layers only",
            )
        self.layer_kinds = tuple(LAYER_KINDS[t] for t in types)
