"""The models and inputs ``rerouting bench`` measures, per host (``--host llava|qwen2.5-vl``).

- ``llava``: a LLaMA-shaped LLaVA, 8 layers (hidden 1024, 16 heads, no GQA, intermediate 2816, vocabulary
  32064), 576 visual tokens (one 336 px image, patch 14) + 60 text tokens; the vision tower is
  ``tiny_llava_config``'s small CLIP (hidden 32, 2 layers).
- ``qwen2.5-vl``: Qwen2.5-VL-7B's text config scaled down the same way: 8 layers, hidden 1024, 16 query /
  2 KV heads (GQA 8, the 7B has 28 / 4), head_dim 64, intermediate 5376 (the 7B's 5.25·hidden ratio),
  q/k/v biases, mRoPE sections [8, 12, 12] (the 7B's [16, 24, 24] for half its head_dim), rope theta 1e6;
  vocabulary 32064 as for LLaVA (so the reference's all-position logits stay comparable). Two images of
  different grids, (1, 32, 32) and (1, 32, 40) patches of 14 px (448×448 and 448×560 px), give 256 + 320 =
  576 merged visual tokens, with 56 text tokens and 4 vision start/end markers around them (60 text, T =
  636); the vision tower is a 2-block windowed tower of hidden 32, so the times are the decoder's. The dense
  forward gets the host's ``mm_token_type_ids`` (without them transformers falls back to 1-D positions,
  research/qwen-host.md §2.3); the routed paths build them themselves.

Both use SDPA attention and random weights (seed 0). ``--quick`` shrinks both to toy sizes (64 visual
tokens, 4 layers), keep tiers scaled by 64/576.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava_config
from rerouting.reference.tiny_qwen import QwenSample, make_qwen_batch, tiny_qwen_config

HOST_NAMES = ("llava", "qwen2.5-vl")


@dataclass(frozen=True)
class Shape:
    """The benchmarked LLaVA and prompt."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    image_size: int
    patch_size: int
    text_runs: tuple[int, int]  # text before and after the image
    tiers: tuple[int, ...]  # kept visual tokens k per tier

    @property
    def num_visual(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prompt_length(self) -> int:
        return self.num_visual + sum(self.text_runs)


@dataclass(frozen=True)
class QwenShape:
    """The benchmarked Qwen2.5-VL and prompt: images of ``grids[i] = (gh, gw)`` 14-px patches (2×2 merged)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    mrope_section: tuple[int, int, int]
    grids: tuple[tuple[int, int], ...]
    text_runs: tuple[int, ...]  # text around the images: len(grids) + 1 runs
    tiers: tuple[int, ...]

    @property
    def num_visual(self) -> int:
        return sum(gh * gw // 4 for gh, gw in self.grids)

    @property
    def prompt_length(self) -> int:  # + a vision start and end marker per image
        return self.num_visual + sum(self.text_runs) + 2 * len(self.grids)


FULL = Shape(8, 1024, 16, 16, 2816, 32064, 336, 14, (35, 25), (192, 128, 64))  # 576 visual + 60 text
QUICK = Shape(4, 128, 4, 4, 352, 1000, 64, 8, (10, 6), (21, 14, 7))  # 64 visual; tiers scaled by 64/576
QWEN_FULL = QwenShape(
    8, 1024, 16, 2, 5376, 32064, (8, 12, 12), ((32, 32), (32, 40)), (33, 1, 22), (192, 128, 64)
)  # 576 visual (256 + 320) + 60 text
QWEN_QUICK = QwenShape(4, 128, 4, 2, 352, 1000, (4, 6, 6), ((8, 16), (8, 16)), (8, 1, 5), (21, 14, 7))


def shapes(host: str, quick: bool) -> Shape | QwenShape:
    if host not in HOST_NAMES:
        raise ValueError(f"--host {host!r} is not one of {', '.join(HOST_NAMES)}")
    if host == "llava":
        return QUICK if quick else FULL
    return QWEN_QUICK if quick else QWEN_FULL


def qwen_config(shape: QwenShape) -> Qwen2_5_VLConfig:
    """A real ``Qwen2_5_VLConfig`` of ``shape``: ``reference.tiny_qwen``'s builder with a mid-size decoder."""
    return tiny_qwen_config(
        num_layers=shape.num_layers,
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        mrope_section=tuple(shape.mrope_section),
        rope_theta=1e6,
        max_position_embeddings=4096,
    )


def build_model(shape: Shape | QwenShape, dtype: torch.dtype, device: str):
    """The host of ``shape`` from a real config with random weights (seed 0), SDPA attention, eval mode."""
    if isinstance(shape, QwenShape):
        config, cls = qwen_config(shape), Qwen2_5_VLForConditionalGeneration
    else:
        config = tiny_llava_config(
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size,
            vocab_size=shape.vocab_size,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
        )
        cls = LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(model, shape: Shape | QwenShape, batch_size: int, device: str, dtype: torch.dtype) -> dict:
    """The routed paths' inputs of ``batch_size`` copies of the benchmark prompt (no padding)."""
    if isinstance(shape, QwenShape):
        batch = make_qwen_batch([QwenSample(shape.text_runs, shape.grids)] * batch_size, seed=batch_size)
    else:
        batch = make_batch(model.config, [SampleSpec(shape.text_runs)] * batch_size, seed=batch_size)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def dense_inputs(model, batch: dict) -> dict:
    """The host's own forward's inputs: Qwen's also get ``mm_token_type_ids`` (1 at image placeholders)."""
    if isinstance(model, Qwen2_5_VLForConditionalGeneration):
        return {**batch, "mm_token_type_ids": (batch["input_ids"] == model.config.image_token_id).long()}
    return batch
