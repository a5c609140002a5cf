"""Host adapters: the parts of a real Hugging Face VLM that routing drives (spec/layout.md).

The adapter never re-implements the model: embeddings come from the model's own vision tower and
projector, every decoder layer is the model's own ``nn.Module``, and the final norm, rotary
embedding and head are the model's own. Only the loop over layers is ours.

Notation: B batch, T padded length, D hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .schedule import RoutingError

SUPPORTED_MODELS = ("LlavaForConditionalGeneration",)


@dataclass(frozen=True)
class SampleLayout:
    """[layout.sequence] One sample's valid tokens.

    Attributes:
        valid: ``[T_b]`` long, the padded-batch columns of the sample's valid tokens, ascending.
        visual: visual positions (indices into ``valid``), ascending ([layout.visual-set]).
        text: text positions, ascending ([layout.text-set]).
    """

    valid: torch.Tensor
    visual: tuple[int, ...]
    text: tuple[int, ...]

    @property
    def length(self) -> int:
        return int(self.valid.numel())


class LlavaHost:
    """Adapter for ``transformers.LlavaForConditionalGeneration`` (LLaMA decoder, 1-D RoPE)."""

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        if name not in SUPPORTED_MODELS:
            raise RoutingError(
                "routing.errors",
                f"model class {name} is not supported; supported classes: {', '.join(SUPPORTED_MODELS)}",
            )
        self.model = model
        self.config = model.config
        text = model.model.language_model
        self.layers: nn.ModuleList = text.layers
        self.norm: nn.Module = text.norm
        self.rotary: nn.Module = text.rotary_emb
        self.lm_head: nn.Module = model.lm_head
        self.image_token_id: int = self.config.image_token_id

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def layouts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[SampleLayout]:
        """[layout.sequence] [layout.visual-set] [layout.text-set] Valid, visual and text positions per sample."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            valid = mask.nonzero().flatten()
            is_visual = (ids[valid] == self.image_token_id).tolist()
            visual = tuple(i for i, v in enumerate(is_visual) if v)
            text = tuple(i for i, v in enumerate(is_visual) if not v)
            out.append(SampleLayout(valid=valid, visual=visual, text=text))
        return out

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """[layout.visual-set] Merged input embeddings ``[B, T, D]``: token embeddings with image features scattered in.

        Uses the model's own ``get_image_features`` (vision tower, feature layer, projector).
        """
        inner = self.model.model
        embeds = inner.get_input_embeddings()(input_ids)  # [B, T, D]
        placeholders = input_ids == self.image_token_id  # [B, T]
        n_tokens = int(placeholders.sum())
        if pixel_values is None:
            if n_tokens:
                raise RoutingError(
                    "layout.visual-set", f"input has {n_tokens} image placeholder tokens but no pixel_values"
                )
            return embeds
        features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.dtype)  # [n_features, D]
        if features.shape[0] != n_tokens:
            raise RoutingError(
                "layout.visual-set",
                f"{n_tokens} image placeholder tokens (id {self.image_token_id}) but the vision tower gave "
                f"{features.shape[0]} image features",
            )
        return embeds.masked_scatter(placeholders.unsqueeze(-1), features)

    def rotary_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, n, head_dim]`` at the given position ids ``[B, n]`` ([routing.active.positions])."""
        return self.rotary(hidden, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[routing.output] The host's final norm and head: ``[..., D] -> [..., V]``."""
        return self.lm_head(self.norm(hidden))


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` under attention implementation ``name`` and restore the previous one on exit."""
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    model.set_attn_implementation({"text_config": name})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": previous})


def causal_mask(positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[routing.active.causal] Additive mask ``[1, 1, q, k]``: 0 where key position <= query position, else min.

    Built from the ORIGINAL positions, so it is exactly causal in original order over any subset.
    """
    visible = key_positions[None, :] <= positions[:, None]  # [q, k]
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask = mask.masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None]
