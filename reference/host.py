"""Host adapters: the parts of a real Hugging Face VLM that routing drives (spec/layout.md).

The adapter never re-implements the model: embeddings come from the model's own vision tower and
projector, every decoder layer is the model's own ``nn.Module``, and the final norm, rotary
embedding and head are the model's own. Only the loop over layers is ours.

``Host`` is the protocol a model family implements (DESIGN.md §7); ``register_host`` maps Hugging Face
model class names to an adapter class and ``host_for(model)`` picks one. ``LlavaHost`` is the first.

Notation: B batch, T padded length, D hidden size, V vocabulary, N visual tokens, n positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .schedule import RoutingError


@dataclass(frozen=True)
class ImageSpan:
    """[layout.visual-set] One image of a sample: visual indices ``start .. stop-1`` and its token grid.

    Attributes:
        grid: ``(rows, cols)`` of the image's tokens, or None where the host cannot tell.
    """

    start: int
    stop: int
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class SampleLayout:
    """[layout.sequence] One sample's valid tokens.

    Attributes:
        valid: ``[T_b]`` long, the padded-batch columns of the sample's valid tokens, ascending.
        visual: visual positions (indices into ``valid``), ascending ([layout.visual-set]).
        text: text positions, ascending ([layout.text-set]).
        images: every image's span of visual indices, in order (empty where the host gives none).
        rotary: ``[R, T_b]`` long, the position ids of the valid tokens by position ([layout.rotary-ids]);
            None for a 1-D RoPE host, whose position id is the position.
        delta: the rope delta ``δ_b`` (0 for 1-D RoPE): decoded position ``p >= T_b`` has id ``p + δ_b``.
    """

    valid: torch.Tensor
    visual: tuple[int, ...]
    text: tuple[int, ...]
    images: tuple[ImageSpan, ...] = ()
    rotary: torch.Tensor | None = None
    delta: int = 0

    @property
    def length(self) -> int:
        return int(self.valid.numel())


@dataclass(frozen=True)
class RotaryIds:
    """[layout.rotary-ids] A batch's position ids by position: ``ids[:, b, p]`` for ``p < T_b``, ``p + δ_b`` after.

    Positions (ranks) drive everything else; only the rotary embedding reads ids, through ``lookup``.

    Attributes:
        ids: ``[R, B, W]`` long, ``W >= max_b T_b`` (columns past ``T_b`` unused).
        lengths: ``[B]`` long, ``T_b``.
        deltas: ``[B]`` long, ``δ_b``.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    deltas: torch.Tensor

    @classmethod
    def from_layouts(cls, layouts: Sequence[SampleLayout]) -> RotaryIds | None:
        """The table of a batch's layouts; None when the host has 1-D RoPE (no layout carries ids)."""
        if all(layout.rotary is None for layout in layouts):
            return None
        R = next(layout.rotary for layout in layouts if layout.rotary is not None).shape[0]
        width = max((layout.length for layout in layouts), default=0) + 1
        ids = torch.zeros(R, len(layouts), width, dtype=torch.long)
        for b, layout in enumerate(layouts):
            ids[:, b, : layout.length] = layout.rotary
        lengths = torch.tensor([layout.length for layout in layouts], dtype=torch.long)
        deltas = torch.tensor([layout.delta for layout in layouts], dtype=torch.long)
        return cls(ids, lengths, deltas)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """Ids ``[R, B, n]`` of positions ``[B, n]`` (decoded positions ``>= T_b``: ``p + δ_b`` on every axis)."""
        device = positions.device
        ids, lengths, deltas = self.ids.to(device), self.lengths.to(device), self.deltas.to(device)
        R, _, width = ids.shape
        inside = positions < lengths[:, None]  # [B, n]
        gathered = ids.gather(2, positions.clamp(max=width - 1)[None].expand(R, -1, -1))  # [R, B, n]
        return torch.where(inside[None], gathered, (positions + deltas[:, None])[None])

    def select(self, index: torch.Tensor) -> RotaryIds:
        """The rows ``index`` of the batch (one sample: ``index = [b]``; beams: repeated rows)."""
        index = index.to(self.ids.device)
        return RotaryIds(self.ids[:, index], self.lengths[index], self.deltas[index])


@dataclass(frozen=True)
class AttentionParts:
    """[scoring.probe.projection] What the probe replicates of one decoder layer: norm, q/k projections.

    Attributes:
        q_norm, k_norm: per-head norms over ``head_dim`` applied after the projection and before RoPE
            (Qwen3-VL, Qwen3.5; [hosts.qk-norm]); None where the layer has none.
        query_gate: ``q_proj`` gives ``[query, gate]`` per head (``2·head_dim``); the probe reads the query half
            ([hosts.gated-query]).
    """

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    query_gate: bool = False


@runtime_checkable
class Host(Protocol):
    """Everything routing needs from a model family (DESIGN.md §7; spec/layout.md, spec/routing.md).

    Positions here are ranks among a sample's valid tokens; ``rotary_embeddings`` and ``decode_positions``
    turn them into what the host's own rotary takes. ``layer_kinds[l]`` is ``"softmax"`` or ``"linear"``
    attention (a hybrid host's linear layers follow spec/hosts.md).
    """

    model: nn.Module
    config: Any
    layers: nn.ModuleList
    layer_kinds: tuple[str, ...]
    norm: nn.Module
    lm_head: nn.Module
    image_token_id: int

    @property
    def num_layers(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def layouts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[SampleLayout]: ...

    def rotary_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor, ids: RotaryIds | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_positions(self, lengths: torch.Tensor, step: int, count: int) -> torch.Tensor: ...

    def attention_parts(self, layer: nn.Module) -> AttentionParts: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


HOSTS: dict[str, type] = {}  # Hugging Face model class name -> host adapter class


def register_host(*model_classes: str) -> Callable[[type], type]:
    """Class decorator: ``cls`` becomes the host adapter of every named Hugging Face model class."""

    def register(cls: type) -> type:
        for name in model_classes:
            HOSTS[name] = cls
        return cls

    return register


def _unsupported(name: str) -> RoutingError:
    return RoutingError(
        "routing.errors",
        f"model class {name} is not supported; supported classes: {', '.join(HOSTS)}",
    )


def host_for(model: nn.Module) -> Host:
    """[routing.errors] The registered host adapter of ``model``'s class, or an error listing the supported ones."""
    name = type(model).__name__
    if name not in HOSTS:
        raise _unsupported(name)
    return HOSTS[name](model)


class DecoderHost:
    """What every host shares: the model's text decoder (``model.model.language_model``: layers, norm, rotary),
    its LM head and image token, the token embedding, decode continuation, the probe's parts and the logits.

    A host family subclasses it with its layouts, embedding of images and rotary ids.
    """

    rotary_axes: int = 1  # ids per token the rotary takes: 1 (RoPE) or 3 (mRoPE)
    query_gate: bool = False  # q_proj gives [query, gate] per head ([hosts.gated-query])
    deepstack_levels: int = 0  # visual features added after layers 0 .. levels-1 ([hosts.deepstack])

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        if HOSTS.get(name) is not type(self):
            raise _unsupported(name)
        self.model = model
        self.config = model.config
        text = model.model.language_model
        self.layers: nn.ModuleList = text.layers
        self.layer_kinds: tuple[str, ...] = ("softmax",) * len(text.layers)
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

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[..., D]`` (no image features): what decoding feeds."""
        return self.model.model.get_input_embeddings()(input_ids)

    def decode_positions(self, lengths: torch.Tensor, step: int, count: int) -> torch.Tensor:
        """[cache.decode.positions] Positions ``[B, count]`` of the next tokens: ``T_b + step + j``.

        These are ranks; a host with rotary ids maps them through its ``RotaryIds`` (``rank + δ_b``).
        """
        return lengths[:, None] + step + torch.arange(count, device=lengths.device)[None, :]

    def attention_parts(self, layer: nn.Module) -> AttentionParts:
        """[scoring.probe.projection] The layer's input norm, q/k projections (with their biases, if any), head
        dim and scaling; its q/k norms where it has them ([hosts.qk-norm])."""
        attn = layer.self_attn
        return AttentionParts(
            layer.input_layernorm,
            attn.q_proj,
            attn.k_proj,
            attn.head_dim,
            attn.scaling,
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            query_gate=self.query_gate,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[routing.output] The host's final norm and head: ``[..., D] -> [..., V]``."""
        return self.lm_head(self.norm(hidden))


@register_host("LlavaForConditionalGeneration")
class LlavaHost(DecoderHost):
    """Adapter for ``transformers.LlavaForConditionalGeneration`` (LLaMA decoder, 1-D RoPE)."""

    rotary_axes = 1  # 1-D RoPE: the position id is the position ([layout.sequence])

    def layouts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        image_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[SampleLayout]:
        """[layout.sequence] [layout.visual-set] [layout.text-set] Valid, visual and text positions per sample.

        LLaVA has 1-D RoPE: no ids to carry (``position_ids`` are checked against positions by the caller).
        """
        _no_grid(image_grid_thw)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            valid = mask.nonzero().flatten()
            is_visual = (ids[valid] == self.image_token_id).tolist()
            visual = tuple(i for i, v in enumerate(is_visual) if v)
            text = tuple(i for i, v in enumerate(is_visual) if not v)
            out.append(SampleLayout(valid=valid, visual=visual, text=text, images=self._images(len(visual))))
        return out

    def _images(self, num_visual: int) -> tuple[ImageSpan, ...]:
        """[layout.visual-set] LLaVA-1.5: every image has ``image_seq_length`` tokens on a square grid."""
        per = getattr(self.config, "image_seq_length", 0)
        if not per or num_visual % per:
            return ()
        side = int(per**0.5)
        grid = (side, side) if side * side == per else None
        return tuple(ImageSpan(start, start + per, grid) for start in range(0, num_visual, per))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[layout.visual-set] Merged input embeddings ``[B, T, D]``: token embeddings with image features scattered in.

        The features come from the model's own ``get_image_features`` (vision tower, feature layer, projector)
        on ``pixel_values`` (cast to the host's dtype), or are ``image_features``, the per-image ``[n_i, D]``
        the caller already computed with it (what ``generate`` does); never both.
        """
        _no_grid(image_grid_thw)
        inner = self.model.model
        embeds = self.embed_tokens(input_ids)  # [B, T, D]
        placeholders = input_ids == self.image_token_id  # [B, T]
        n_tokens = int(placeholders.sum())
        if image_features is not None:
            if pixel_values is not None:
                raise RoutingError("layout.visual-set", "give pixel_values or image features, not both")
            source = ""
            features = image_features
        elif pixel_values is None:
            if n_tokens:
                raise RoutingError(
                    "layout.visual-set", f"input has {n_tokens} image placeholder tokens but no pixel_values"
                )
            return embeds
        else:
            source = "the vision tower gave "
            pixel_values = pixel_values.to(self.dtype)
            features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        return scatter_features(embeds, placeholders, features, self.image_token_id, source)

    def rotary_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor, ids: RotaryIds | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[routing.active.positions] cos, sin ``[B, n, head_dim]`` at positions ``[B, n]`` (1-D RoPE: id = position)."""
        return self.rotary(hidden, positions if ids is None else ids.lookup(positions)[0])


class _BoundHost:
    """A host whose ``rotary_embeddings`` reads one batch's ``RotaryIds`` (everything else is the host's)."""

    def __init__(self, host: Host, ids: RotaryIds):
        self.host, self.ids = host, ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self.host, name)

    def rotary_embeddings(
        self, hidden: torch.Tensor, positions: torch.Tensor, ids: RotaryIds | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.host.rotary_embeddings(hidden, positions, self.ids if ids is None else ids)


def bind_ids(host: Host, ids: RotaryIds | None) -> Host:
    """[layout.rotary-ids] ``host`` with a batch's position-id table bound, so that callers pass positions only.

    With ``ids`` None (a 1-D RoPE host) it is ``host`` itself. Routing code passes positions (ranks)
    everywhere; the bound host maps them to ids inside ``rotary_embeddings`` and nowhere else.
    """
    if ids is None:
        return host
    if isinstance(host, _BoundHost):
        host = host.host
    return _BoundHost(host, ids)  # type: ignore[return-value]


def _no_grid(image_grid_thw: torch.Tensor | None) -> None:
    if image_grid_thw is not None:
        raise RoutingError(
            "layout.image-grid", "image_grid_thw was given to a host whose images have no grid input (LLaVA)"
        )


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


def scatter_features(
    embeds: torch.Tensor, placeholders: torch.Tensor, features, image_token_id: int, source: str
) -> torch.Tensor:
    """[layout.visual-set] Image features (per image, or one tensor) into the placeholder slots of ``embeds``.

    ``embeds`` ``[B, T, D]``, ``placeholders`` ``[B, T]`` bool; the features fill the slots in batch and
    position order ([layout.pixel-values]); their count must equal the placeholders' (``source`` says where
    the features came from, for the error).
    """
    n_tokens = int(placeholders.sum())
    features = torch.cat(list(features), dim=0).to(embeds.dtype)  # [n_features, D]
    if features.shape[0] != n_tokens:
        raise RoutingError(
            "layout.visual-set",
            f"{n_tokens} image placeholder tokens (id {image_token_id}) but {source}"
            f"{features.shape[0]} image features",
        )
    return embeds.masked_scatter(placeholders.unsqueeze(-1), features)
