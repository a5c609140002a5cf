"""Tiny random Qwen2.5-VL models and inputs built from a real ``transformers`` config (no download).

The Qwen counterpart of ``tiny.py`` (research/qwen-host.md §6): a 265k-parameter model with GQA, biased
q/k/v, chunked mRoPE and a windowed vision tower. Images have grids ``(1, gh, gw)`` in 14-px patches;
each gives ``gh·gw/4`` visual tokens. Pixels are seeded per image (by its index in the sample and its
grid), so a sample built alone gets the same pixels as inside a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .tiny import seeded_model

PAD_TOKEN_ID = 0
IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID, VIDEO_TOKEN_ID = 250, 251, 252, 253
_RESERVED = 4  # ids 0..3 are never drawn as text
_VOCAB = 256
PATCH_COLUMNS = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch = 1176


def tiny_qwen_config(
    *,
    num_layers: int = 6,
    attn_implementation: str = "sdpa",
    vocab_size: int = _VOCAB,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 512,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config with a 2-block, hidden-32 vision tower; the defaults are small enough for CPU tests
    (head_dim 16, GQA 4/2, mrope_section [2, 3, 3]), the benchmark passes a mid-size decoder."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": list(mrope_section),
            "rope_theta": rope_theta,
        },
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAD_TOKEN_ID,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "out_hidden_size": hidden_size,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        attn_implementation=attn_implementation,
    )


def tiny_qwen(config: Qwen2_5_VLConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` in eval mode, q/k weights widened."""
    config = config if config is not None else tiny_qwen_config()
    return seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed, dtype)


@dataclass(frozen=True)
class QwenSample:
    """One sample: text runs around its images, ``grids[i] = (gh, gw)`` in 14-px patches (even numbers).

    ``len(text_runs) == len(grids) + 1``; each image is ``<|vision_start|> <|image_pad|> x gh·gw/4
    <|vision_end|>``, so images are never adjacent.
    """

    text_runs: tuple[int, ...]
    grids: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return sum(gh * gw // 4 for gh, gw in self.grids)


def _key(seed: int, *parts: tuple[int, ...]) -> int:
    """A stable seed from ``seed`` and small tuples of ints (Python's ``hash`` is not used)."""
    key = seed
    for part in parts:
        for x in (len(part), *part):
            key = (key * 131 + x + 1) % (2**31 - 1)
    return key


def make_qwen_batch(
    samples: Sequence[QwenSample], *, padding: str = "left", seed: int = 0, patch_columns: int = PATCH_COLUMNS
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` ``[B, T]``; with images, ``pixel_values`` and ``image_grid_thw``.

    Every sample's text and every image's pixels come from generators seeded by ``seed`` and the sample's
    own layout (not its index), so that a sample built alone equals itself inside a batch.
    ``patch_columns``: the tower's flattened patch width (1176 for 14-px patches, 1536 for Qwen3's 16-px).
    """
    if padding not in ("left", "right"):
        raise ValueError(f"padding={padding!r} is not 'left' or 'right'")
    rows, pixels, grids = [], [], []
    for spec in samples:
        gen = torch.Generator().manual_seed(_key(seed, spec.text_runs, *spec.grids))
        ids: list[int] = []
        for i, run in enumerate(spec.text_runs):
            ids += torch.randint(_RESERVED, IMAGE_TOKEN_ID, (run,), generator=gen).tolist()
            if i < len(spec.grids):
                gh, gw = spec.grids[i]
                ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (gh * gw // 4) + [VISION_END_ID]
                image_gen = torch.Generator().manual_seed(_key(seed, (i, gh, gw)))
                pixels.append(torch.randn(gh * gw, patch_columns, generator=image_gen))
                grids.append((1, gh, gw))
        rows.append(ids)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, ids in enumerate(rows):
        cols = slice(T - len(ids), T) if padding == "left" else slice(0, len(ids))
        input_ids[b, cols] = torch.tensor(ids)
        attention_mask[b, cols] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if grids:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return batch


#: The digest's batch: sample 0 has images 4x4 and 4x6 patches (N = 4 + 6), sample 1 images 2x2 and 4x4 (N = 1 + 4).
TWO_SAMPLES = (QwenSample((3, 2, 3), ((4, 4), (4, 6))), QwenSample((1, 1, 2), ((2, 2), (4, 4))))
