"""Tiny hosts of the conformance cases: :class:`HostSpec`, the cached models, and the host strategy.

Two host families are drawn (one labelled draw, ``family``):

- ``llava``: a tiny ``LlavaForConditionalGeneration`` (LLaMA decoder with GQA, CLIP tower), 1-D RoPE,
  ``grid**2`` visual tokens per image (reference/tiny.py);
- ``qwen2.5-vl``: a tiny ``Qwen2_5_VLForConditionalGeneration`` (Qwen2 decoder, GQA over 1, 2 or 4 KV
  heads, biased q/k/v, 3-D mRoPE with ``mrope_section`` [2, 3, 3], windowed vision tower;
  reference/tiny_qwen.py). Its images have their own grids (drawn with the layout, see
  ``strategies.Layout.grids``), so N differs per image and per sample.

``ties`` makes ties on purpose: ``"exact"`` zeroes every ``q_proj`` (weight and, on Qwen, bias): each probe
logit is exactly 0 and all visual tokens tie bit for bit; ``"near-e"`` scales it by ``10**-e``.
``attention`` is the decoder's attention kernel (``eager`` or ``sdpa``).

Models are built once per ``(HostSpec, dtype, device)`` (``functools.lru_cache``), so examples are cheap;
implementations must not modify the model they are given.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from transformers import LlavaConfig

from rerouting.reference.host_qwen import MROPE_ISSUE, mrope_release_ok
from rerouting.reference.host_qwen3 import qwen3_release_refusal
from rerouting.reference.tiny import tiny_llava, tiny_llava_config
from rerouting.reference.tiny_qwen import IMAGE_TOKEN_ID as QWEN_IMAGE_TOKEN_ID
from rerouting.reference.tiny_qwen import PATCH_COLUMNS, tiny_qwen, tiny_qwen_config
from rerouting.reference.tiny_qwen2 import tiny_qwen2, tiny_qwen2_config
from rerouting.reference.tiny_qwen3 import (
    PATCH_COLUMNS_16,
    tiny_qwen3vl,
    tiny_qwen3vl_config,
    tiny_qwen35,
    tiny_qwen35_config,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
PATCH = 2  # CLIP patch size; an image of grid x grid patches gives grid**2 visual tokens
VOCAB = 64
TIE_MODES = ("none", "exact", "near-3", "near-5", "near-7")
FAMILIES = ("llava", "qwen2.5-vl")
#: The Qwen3-family hosts (spec/hosts.md): drawn by the properties of conformance/test_hosts_qwen3.py only,
#: whose cases respect their schedule rules (``d_0 >= L_ds`` on Qwen3-VL; decisions at softmax layers on Qwen3.5).
QWEN3_FAMILIES = ("qwen3-vl", "qwen3.5")
#: Qwen2-VL (the Qwen2.5-VL host's rules on ``Qwen2VLForConditionalGeneration``) is not in the family draw;
#: properties that want it (the CLSE scorer's, published on Qwen2-VL) turn a drawn Qwen2.5-VL host into it.
QWEN_FAMILIES = ("qwen2.5-vl", "qwen2-vl")


def release_refuses(family: str) -> str | None:
    """Why the installed transformers cannot serve ``family`` at all (the Qwen host refuses the mRoPE bug)."""
    if family in QWEN_FAMILIES and not mrope_release_ok():
        return f"transformers {importlib.metadata.version('transformers')} has the Qwen mRoPE bug ({MROPE_ISSUE})"
    if family in QWEN3_FAMILIES:
        return qwen3_release_refusal(family)
    return None


#: The families the installed transformers serves: what is drawn unless the implementation takes fewer.
SERVED = tuple(family for family in FAMILIES if release_refuses(family) is None)
#: The Hugging Face model class of each family (what an implementation's ``hosts`` attribute names).
HOST_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
    "qwen3.5": "Qwen3_5ForConditionalGeneration",
}
#: The Qwen3 families the installed transformers serves.
QWEN3_SERVED = tuple(family for family in QWEN3_FAMILIES if release_refuses(family) is None)
#: Qwen image grids ``(gh, gw)`` in 14-px patches; each gives ``gh·gw/4`` visual tokens (1, 2, 2, 3, 4).
QWEN_GRIDS = ((2, 2), (2, 4), (4, 2), (2, 6), (4, 4))


@dataclass(frozen=True)
class HostSpec:
    """A tiny host. LLaVA: ``grid**2`` visual tokens per image. Qwen2.5-VL (``family="qwen2.5-vl"``): the
    decoder is 64 wide with 4 heads of 16 (``hidden_size``/``num_heads``/``head_dim`` fixed), GQA over
    ``num_kv_heads`` in {1, 2, 4}; ``grid`` is unused (the layout's grids decide N)."""

    num_layers: int = 4
    hidden_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 48
    grid: int = 2
    seed: int = 0
    ties: str = "none"
    attention: str = "sdpa"
    family: str = "llava"
    vision_layers: int = 2  # CLIP layers (a Nüwa case draws more: its feature layers, spec/nuwa.md)

    @property
    def is_qwen(self) -> bool:
        """Any Qwen family: images with grids, mRoPE ids (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Qwen3.5)."""
        return self.family != "llava"

    @property
    def patch_columns(self) -> int:
        """Flattened patch width of a Qwen vision tower (14-px patches on Qwen2.5-VL, 16-px on Qwen3)."""
        return PATCH_COLUMNS if self.family in QWEN_FAMILIES else PATCH_COLUMNS_16

    @property
    def softmax_layers(self) -> tuple[int, ...]:
        """The layers a decision may use: every layer, on Qwen3.5 the full-attention ones (odd layers)."""
        if self.family == "qwen3.5":
            return tuple(range(1, self.num_layers, 2))
        return tuple(range(self.num_layers))

    @property
    def model_class(self) -> str:
        return HOST_CLASSES[self.family]

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2

    @property
    def image_token_id(self) -> int:
        return QWEN_IMAGE_TOKEN_ID if self.is_qwen else self.llava_config().image_token_id

    @property
    def text_ids(self) -> tuple[int, int]:
        """``[low, high)`` of the ids that are plain text tokens (decode feeds these)."""
        return (4, QWEN_IMAGE_TOKEN_ID) if self.is_qwen else (4, VOCAB)

    def llava_config(self) -> LlavaConfig:
        config = tiny_llava_config(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=VOCAB,
            image_size=self.grid * PATCH,
            patch_size=PATCH,
            vision_layers=self.vision_layers,
        )
        config.text_config.head_dim = self.head_dim  # independent of hidden_size / num_heads
        return config

    def qwen_config(self):
        if self.family == "qwen3-vl":
            config = tiny_qwen3vl_config(num_layers=self.num_layers, attn_implementation=self.attention)
        elif self.family == "qwen3.5":
            config = tiny_qwen35_config(num_layers=self.num_layers, attn_implementation=self.attention)
        else:
            config = tiny_qwen_config(num_layers=self.num_layers, attn_implementation=self.attention)
        config.text_config.num_key_value_heads = self.num_kv_heads
        config.text_config.intermediate_size = self.intermediate_size
        return config

    def qwen2_config(self):
        config = tiny_qwen2_config(num_layers=self.num_layers, attn_implementation=self.attention)
        config.text_config.num_key_value_heads = self.num_kv_heads
        config.text_config.intermediate_size = self.intermediate_size
        return config


def _make_ties(model, ties: str) -> None:
    if ties == "none":
        return
    factor = 0.0 if ties == "exact" else 10.0 ** -int(ties.split("-")[1])
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if not hasattr(layer, "self_attn"):  # a linear-attention layer (Qwen3.5): nothing is probed there
                continue
            layer.self_attn.q_proj.weight.mul_(factor)
            if layer.self_attn.q_proj.bias is not None:  # Qwen's q bias: q = 0 needs it zeroed too
                layer.self_attn.q_proj.bias.mul_(factor)


@functools.lru_cache(maxsize=64)
def build_model(host: HostSpec, dtype: str = "float32", device: str = "cpu"):
    """The model of ``host`` in ``dtype`` on ``device`` (cached; the weights are the float32 ones, cast)."""
    if dtype != "float32" or device != "cpu":
        return copy.deepcopy(build_model(host)).to(device=device, dtype=DTYPES[dtype])
    if host.family == "qwen2-vl":
        model = tiny_qwen2(host.qwen2_config(), seed=host.seed)
    elif host.family in QWEN3_FAMILIES:
        build = tiny_qwen3vl if host.family == "qwen3-vl" else tiny_qwen35
        model = build(host.qwen_config(), seed=host.seed)
    elif host.is_qwen:
        model = tiny_qwen(host.qwen_config(), seed=host.seed)
    else:
        model = tiny_llava(host.llava_config(), seed=host.seed)
    model.set_attn_implementation({"text_config": host.attention})
    _make_ties(model, host.ties)
    return model


@functools.lru_cache(maxsize=64)
def build_model64(host: HostSpec, dtype: str = "float32"):
    """The float64 copy of the ``dtype`` model on the CPU: the truth sees exactly the weights under test."""
    return copy.deepcopy(build_model(host, dtype)).to(torch.float64)


def as_qwen(host: HostSpec, family: str = "qwen2.5-vl") -> HostSpec:
    """The Qwen host (``family``) drawn from ``host``'s draws: its layers, KV heads, MLP width, seed, ties, kernel."""
    return HostSpec(
        num_layers=host.num_layers,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=host.num_kv_heads,
        head_dim=16,
        intermediate_size=host.intermediate_size,
        grid=0,
        seed=host.seed,
        ties=host.ties,
        attention=host.attention,
        family=family,
    )


def hosts(
    *, min_layers: int = 2, max_layers: int = 5, ties: st.SearchStrategy[str] | None = None, max_grid: int = 3
) -> st.SearchStrategy[HostSpec]:
    """Tiny LLaVA hosts: 1-4 KV heads, GQA groups of 1-3, head dim 4 or 8 (independent of hidden / heads), 1-9 visual tokens per image.

    ``draw_case`` turns one into a Qwen2.5-VL host (:func:`as_qwen`) when the ``family`` draw says so.
    """
    ties = ties if ties is not None else st.one_of(st.just("none"), st.sampled_from(TIE_MODES))

    @st.composite
    def build(draw) -> HostSpec:
        kv = draw(st.sampled_from([1, 2, 4]))
        heads = kv * draw(st.integers(1, 3))
        return HostSpec(
            num_layers=draw(st.integers(min_layers, max_layers)),
            hidden_size=heads * draw(st.sampled_from([4, 8])),  # transformers wants a multiple of the heads
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=draw(st.sampled_from([4, 8])),
            intermediate_size=draw(st.sampled_from([16, 40])),
            grid=draw(st.integers(1, max_grid)),
            seed=draw(st.integers(0, 2)),
            ties=draw(ties),
        )

    return build()
