"""Tiny random LLaVA models and inputs built from real ``transformers`` configs (no download).

Used by the tests, the conformance suite, the audit's traced run and the benchmark. Every tensor
comes from an explicit seed: models from ``torch.manual_seed`` inside a fork of the RNG state,
inputs from a local ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
_RESERVED = 4  # ids 0..3 are pad / bos / eos / image: never drawn as text


def tiny_llava_config(
    *,
    num_layers: int = 6,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 48,
    vocab_size: int = 96,
    image_size: int = 16,
    patch_size: int = 4,
    vision_layers: int = 2,
) -> LlavaConfig:
    """A LLaVA config with a LLaMA decoder and a CLIP vision tower, small enough for CPU tests.

    ``(image_size // patch_size) ** 2`` visual tokens per image; ``vision_layers`` CLIP layers (24 for Nüwa's
    default feature layers 16..24, spec/nuwa.md).
    """
    text = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rms_norm_eps": 1e-5,
    }
    vision = {
        "model_type": "clip_vision_model",
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "projection_dim": 32,
    }
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_llava(config: LlavaConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``LlavaForConditionalGeneration`` in eval mode (SDPA attention)."""
    config = config if config is not None else tiny_llava_config()
    return seeded_model(LlavaForConditionalGeneration, config, seed, dtype)


def seeded_model(model_class: type, config, seed: int, dtype: torch.dtype):
    """``model_class(config)`` initialised under ``seed`` (the caller's RNG untouched), eval mode, in ``dtype``.

    Random init gives tiny weights; the q/k projections are widened so attention is far from uniform and
    decisions depend on the input (ties then come only from strategies that make them on purpose).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.normal_(0.0, 0.3, generator=gen)
    return model.to(dtype).eval()


@dataclass(frozen=True)
class SampleSpec:
    """One sample's layout: text runs around its images, e.g. ``(5, 3)`` with one image is T, V, T."""

    text_runs: tuple[int, ...]  # len(text_runs) == num_images + 1

    @property
    def num_images(self) -> int:
        return len(self.text_runs) - 1


def make_batch(
    config: LlavaConfig,
    samples: Sequence[SampleSpec],
    *,
    padding: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` and ``pixel_values`` for ``samples``.

    Text ids are drawn from a ``torch.Generator`` seeded with ``seed``; images from the same generator.
    ``padding`` is ``"left"`` or ``"right"``. ``pixel_values`` is absent when no sample has an image.
    """
    if padding not in ("left", "right"):
        raise ValueError(f"padding={padding!r} is not 'left' or 'right'")
    gen = torch.Generator().manual_seed(seed)
    per_image = config.image_seq_length
    vocab = config.text_config.vocab_size
    rows = []
    for spec in samples:
        ids: list[int] = []
        for i, run in enumerate(spec.text_runs):
            ids += torch.randint(_RESERVED, vocab, (run,), generator=gen).tolist()
            if i < spec.num_images:
                ids += [IMAGE_TOKEN_ID] * per_image
        rows.append(ids)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, ids in enumerate(rows):
        cols = slice(T - len(ids), T) if padding == "left" else slice(0, len(ids))
        input_ids[b, cols] = torch.tensor(ids)
        attention_mask[b, cols] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    num_images = sum(s.num_images for s in samples)
    if num_images:
        size = config.vision_config.image_size
        batch["pixel_values"] = torch.randn(num_images, 3, size, size, generator=gen)
    return batch


def tiny_example(
    num_layers: int = 32, batch: int = 2, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, dict]:
    """A model and inputs to try the API on in seconds: what the README and docs examples run on.

    A random LLaVA-1.5-shaped toy (``num_layers`` LLaMA layers, as many as LLaVA-1.5-7B so that the release
    presets' decision layers exist; hidden size 32) and a left-padded batch (what ``generate`` expects): one
    image of 16 visual tokens per sample between text runs of different lengths. Not a trained model: its
    tokens mean nothing, its routing decisions are real.
    """
    config = tiny_llava_config(num_layers=num_layers)
    specs = [SampleSpec((5 + 2 * b, 3)) for b in range(batch)]
    return tiny_llava(config, seed=seed), make_batch(config, specs, padding="left", seed=seed + 1)
