"""[eval.prompts] Model inputs for a batch of lmms-eval requests, as lmms-eval's own models write them.

- LLaVA-1.5 (``llava_hf``): ``<image>`` tokens before the context when it has none, one user message
  through the tokenizer's chat template (lmms-eval's Vicuna template when the tokenizer has none), the
  checkpoint's ``LlavaProcessor``.
- Qwen2.5-VL (``qwen2_5_vl``): the system prompt "You are a helpful assistant.", a user message with the
  images before the context (``<image>`` removed), the checkpoint's chat template; images resized by the
  image processor's smart resize within ``min_pixels``/``max_pixels``. The inputs are composed from the
  checkpoint's tokenizer and image processor: each ``<|image_pad|>`` becomes ``t·h·w / merge²``
  placeholders, the rule of ``Qwen2_5_VLProcessor``, which transformers 5 cannot build without
  torchvision (it insists on a video processor), and ``mm_token_type_ids`` as that processor returns them.
  The routed host checks placeholders against features and the token types against the placeholders.

Batches are left padded, as ``generate`` needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from .options import model_args_error

# lmms-eval's llava_hf constants (lmms_eval/models/simple/llava_hf.py, which imports decord at the top, so
# it is not imported here; tests/test_eval_lmms.py checks the copies against its source).
DEFAULT_IMAGE_TOKEN = "<image>"
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %} "
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_IMAGE_PAD = "<|image_pad|>"


class LlavaInputs:
    """[eval.prompts] LLaVA-1.5 prompts and tensors, as lmms-eval's ``llava_hf`` builds them (batched)."""

    def __init__(self, path: str):
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE

    def prompt(self, context: str, images: list[Image.Image]) -> str:
        if images and DEFAULT_IMAGE_TOKEN not in context:
            context = " ".join([DEFAULT_IMAGE_TOKEN] * len(images)) + "\n" + context
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def batch(self, contexts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        texts = [self.prompt(c, i) for c, i in zip(contexts, images)]
        flat = [image for sample in images for image in sample]
        return dict(self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt"))


class QwenInputs:
    """[eval.prompts] Qwen2.5-VL prompts and tensors, as lmms-eval's ``qwen2_5_vl`` builds them (batched)."""

    def __init__(self, path: str, min_pixels: int | None, max_pixels: int | None):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.image_processor = AutoImageProcessor.from_pretrained(path, **pixels)
        self.chat_template = _chat_template(Path(path)) or self.tokenizer.chat_template
        if self.chat_template is None:
            raise model_args_error(f"pretrained={path!r} has no chat template (chat_template.jinja/.json)")
        self.merge = int(self.image_processor.merge_size) ** 2
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(QWEN_IMAGE_PAD)

    def prompt(self, context: str, images: list[Image.Image]) -> str:
        content = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": context.replace(DEFAULT_IMAGE_TOKEN, "")})
        messages = [
            {"role": "system", "content": QWEN_SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def batch(self, contexts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        texts = [self.prompt(c, i) for c, i in zip(contexts, images)]
        flat = [image for sample in images for image in sample]
        out: dict[str, torch.Tensor] = {}
        if flat:
            vision = self.image_processor(images=flat, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            counts = iter((out["image_grid_thw"].prod(-1) // self.merge).tolist())
            texts = [_expand(text, QWEN_IMAGE_PAD, counts) for text in texts]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        out["input_ids"], out["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        # what Qwen2_5_VLProcessor returns too (return_mm_token_type_ids): 1 at image placeholders; without
        # them the unrouted generate would give Qwen 1-D positions
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_pad_id).long()
        return out


def _expand(text: str, pad: str, counts) -> str:
    """Each ``pad`` in ``text`` repeated its image's placeholder count (images in order)."""
    parts = text.split(pad)
    return parts[0] + "".join(pad * next(counts) + part for part in parts[1:])


def _chat_template(folder: Path) -> str | None:
    """The processor's chat template saved in ``folder`` (``chat_template.jinja`` or ``.json``), if any."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None
