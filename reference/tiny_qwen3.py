"""Tiny random Qwen3-VL and Qwen3.5 models built from real ``transformers`` configs (no download).

The Qwen3-family counterparts of ``tiny_qwen.py`` (research/qwen-host.md §6, §7): the same 64-wide
decoder with GQA 4/2 and head dim 16, and a 2-block, 32-wide vision tower with 16-px patches
(``num_position_embeddings`` 64). Qwen3-VL adds q/k norms, interleaved mRoPE ``[2, 3, 3]`` and two
DeepStack levels (``deepstack_visual_indexes`` [0, 1]: features added to the visual rows after decoder
layers 0 and 1). Qwen3.5 is hybrid: every ``full_attention_interval``-th layer is softmax attention (gated
query, zero-centred q/k norms, partial rotary 0.25 with ``mrope_section`` [1, 1, 0]), the others Gated
DeltaNet linear attention (2 key / 4 value heads of 8).

Batches come from ``tiny_qwen.make_qwen_batch`` with ``patch_columns=PATCH_COLUMNS_16`` (grids in 16-px
patches; ``gh·gw/4`` visual tokens per image, as for Qwen2.5-VL).
"""

from __future__ import annotations

import torch

from .tiny import seeded_model
from .tiny_qwen import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID

PATCH_COLUMNS_16 = 3 * 2 * 16 * 16  # channels x temporal patch x patch x patch = 1536
_VOCAB = 256


def _text(num_layers: int, attn_implementation: str, **extra) -> dict:
    return {
        "vocab_size": _VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAD_TOKEN_ID,
        **extra,
    }


def _vision(**extra) -> dict:
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        **extra,
    }


_IDS = {
    "image_token_id": IMAGE_TOKEN_ID,
    "video_token_id": VIDEO_TOKEN_ID,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
}


def tiny_qwen3vl_config(
    *, num_layers: int = 6, attn_implementation: str = "sdpa", deepstack: tuple[int, ...] = (0, 1)
):
    """A Qwen3-VL config: head dim 16, GQA 4/2, q/k norms, interleaved mRoPE [2, 3, 3], DeepStack levels ``deepstack``."""
    from transformers import Qwen3VLConfig

    rope = {
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "rope_theta": 10000.0,
        "mrope_interleaved": True,
    }
    return Qwen3VLConfig(
        text_config=_text(num_layers, attn_implementation, rope_parameters=rope),
        vision_config=_vision(deepstack_visual_indexes=list(deepstack)),
        attn_implementation=attn_implementation,
        **_IDS,
    )


def tiny_qwen35_config(
    *, num_layers: int = 8, attn_implementation: str = "sdpa", full_attention_interval: int = 2
):
    """A Qwen3.5 config: layers ``interval-1, 2·interval-1, ...`` softmax attention (gated q, head dim 16,
    partial rotary 0.25: 4 rotary dims, ``mrope_section`` [1, 1, 0]), the others Gated DeltaNet."""
    from transformers import Qwen3_5Config

    rope = {
        "rope_type": "default",
        "mrope_section": [1, 1, 0],
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_interleaved": True,
    }
    kinds = [
        "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
        for i in range(num_layers)
    ]
    text = _text(
        num_layers,
        attn_implementation,
        rope_parameters=rope,
        layer_types=kinds,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    return Qwen3_5Config(
        text_config=text, vision_config=_vision(), attn_implementation=attn_implementation, **_IDS
    )


def _widen_norms(model, seed: int, zero_centred: bool) -> None:
    """q/k norm weights drawn away from their init, so a probe that skips them scores differently."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                centre = 0.0 if zero_centred else 1.0
                param.copy_(centre + 0.5 * torch.randn(param.shape, generator=gen))


def tiny_qwen3vl(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``Qwen3VLForConditionalGeneration`` in eval mode (q/k weights and norms widened)."""
    from transformers import Qwen3VLForConditionalGeneration

    model = seeded_model(
        Qwen3VLForConditionalGeneration, config or tiny_qwen3vl_config(), seed, torch.float32
    )
    _widen_norms(model, seed, zero_centred=False)
    return model.to(dtype)


def tiny_qwen35(config=None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``Qwen3_5ForConditionalGeneration`` in eval mode (q/k weights and norms widened)."""
    from transformers import Qwen3_5ForConditionalGeneration

    model = seeded_model(Qwen3_5ForConditionalGeneration, config or tiny_qwen35_config(), seed, torch.float32)
    _widen_norms(model, seed, zero_centred=True)
    return model.to(dtype)
