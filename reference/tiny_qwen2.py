"""A tiny random Qwen2-VL from a real ``transformers`` config (no download); inputs as ``tiny_qwen``'s.

The decoder is ``tiny_qwen_config``'s; the vision tower is Qwen2-VL's own (2 blocks, embed 32, 14-px patches,
2x2 merge), so ``make_qwen_batch`` builds its inputs unchanged.
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from .tiny import seeded_model
from .tiny_qwen import tiny_qwen_config


def tiny_qwen2_config(**text_options) -> Qwen2VLConfig:
    """A Qwen2-VL config: ``tiny_qwen_config``'s text part and ids (``text_options`` go to it), Qwen2-VL's vision."""
    base = tiny_qwen_config(**text_options)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": base.text_config.hidden_size,  # the merger's output: the decoder's width
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
    }
    return Qwen2VLConfig(
        text_config=base.text_config.to_dict(),
        vision_config=vision,
        image_token_id=base.image_token_id,
        video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id,
        attn_implementation=base._attn_implementation,
    )


def tiny_qwen2(config: Qwen2VLConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` in eval mode, q/k weights widened."""
    return seeded_model(
        Qwen2VLForConditionalGeneration, config if config is not None else tiny_qwen2_config(), seed, dtype
    )
