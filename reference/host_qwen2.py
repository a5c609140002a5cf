"""The Qwen2-VL host adapter: the Qwen2.5-VL host for ``Qwen2VLForConditionalGeneration`` (spec/layout.md).

For routing, Qwen2-VL differs from Qwen2.5-VL only inside its vision tower (no window attention, a different
MLP); the decoder (Qwen2 layers, GQA, biased q/k/v, mRoPE over ``(t, h, w)``), ``get_rope_index``,
``get_image_features``, the 2x2 merge and the token ids are the same. So this is the Qwen2.5-VL adapter
registered for the Qwen2-VL class, with its own name. CLSE was published on Qwen2-VL-7B (spec/clse.md).
"""

from __future__ import annotations

from .host import register_host
from .host_qwen import Qwen2_5_VLHost


@register_host("Qwen2VLForConditionalGeneration")
class Qwen2VLHost(Qwen2_5_VLHost):
    """Adapter for ``transformers.Qwen2VLForConditionalGeneration``: every rule as the Qwen2.5-VL host's."""
