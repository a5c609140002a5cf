"""Tiny saved checkpoints and a tiny local lmms-eval task: the harness end to end without a hub.

``save_tiny_llava(folder)`` / ``save_tiny_qwen(folder)`` write a random tiny model (``reference.tiny``,
``reference.tiny_qwen``) with a character-level tokenizer, its image processor and a chat template, in
the transformers format, so that ``--model_args pretrained=folder`` loads it like a real checkpoint.
``write_tiny_task(folder)`` writes generated images (a coloured rectangle on a plain background), a
RefCOCO-style grounding split and a POPE-style VQA split as parquet files, and two task YAMLs that use
lmms-eval's own RefCOCO and POPE task functions on them (``--include_path folder``).
"""

from __future__ import annotations

import string
from pathlib import Path

from PIL import Image, ImageDraw

TASKS = ("rerouting_tiny_rec", "rerouting_tiny_pope")
_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
_QWEN_SPECIAL = {
    "<|im_start|>": 248,
    "<|im_end|>": 249,
    "<|image_pad|>": 250,
    "<|vision_start|>": 251,
    "<|vision_end|>": 252,
    "<|video_pad|>": 253,
}
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(special: dict[str, int], first_char: int, eos: str):
    """A character-level fast tokenizer: ids 0..2 pad/bos/eos-or-unk, characters from ``first_char``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": first_char - 1, **special}
    vocab.update({c: first_char + i for i, c in enumerate(_CHARS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in special if t not in ("<s>", "</s>")],
        padding_side="left",
    )


def save_tiny_llava(folder: str | Path, *, num_layers: int = 32, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5-shaped checkpoint (``num_layers`` LLaMA layers, 16 visual tokens) in ``folder``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from rerouting.reference.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_config

    folder = Path(folder)
    tokenizer = _tokenizer({"<image>": IMAGE_TOKEN_ID}, first_char=5, eos="</s>")
    config = tiny_llava_config(num_layers=num_layers, vocab_size=128)
    size = config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    tiny_llava(config, seed=seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_qwen(folder: str | Path, *, num_layers: int = 28, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL checkpoint (``num_layers`` layers; images of at most 16 visual tokens) in ``folder``."""
    from transformers import Qwen2VLImageProcessor

    from rerouting.reference.tiny_qwen import tiny_qwen, tiny_qwen_config

    folder = Path(folder)
    tokenizer = _tokenizer(_QWEN_SPECIAL, first_char=4, eos="<|im_end|>")
    model = tiny_qwen(tiny_qwen_config(num_layers=num_layers), seed=seed)
    model.generation_config.eos_token_id = [_QWEN_SPECIAL["<|im_end|>"]]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    images = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    images.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(_QWEN_TEMPLATE, encoding="utf-8")
    return folder


# (background, colour name, rectangle colour, box x, y, w, h in pixels) on 112 x 84 images
_SCENES = (
    ((250, 250, 250), "red", (220, 30, 30), 10, 8, 40, 30),
    ((20, 20, 20), "green", (30, 200, 60), 60, 30, 44, 46),
    ((200, 220, 250), "blue", (30, 60, 220), 30, 20, 56, 40),
    ((240, 240, 200), "black", (0, 0, 0), 70, 4, 36, 24),
)


def _image(background, colour, x, y, w, h) -> Image.Image:
    image = Image.new("RGB", (112, 84), background)
    ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
    return image


def write_tiny_task(folder: str | Path) -> Path:
    """The tiny task in ``folder``: ``data/*.parquet`` and the YAMLs of ``TASKS`` (4 + 4 documents)."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rec = {"question_id": [], "image": [], "answer": [], "bbox": []}
    pope = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for i, (background, name, colour, x, y, w, h) in enumerate(_SCENES):
        image = _image(background, colour, x, y, w, h)
        rec["question_id"].append(f"rec-{i}")
        rec["image"].append(image)
        rec["answer"].append([f"the {name} rectangle"])
        rec["bbox"].append([float(x), float(y), float(w), float(h)])
        other = _SCENES[(i + 1) % len(_SCENES)][1]
        pope["question_id"].append(f"pope-{i}")
        pope["image"].append(image)
        pope["question"].append(f"Is there a {name if i % 2 == 0 else other} rectangle in the image?")
        pope["answer"].append("yes" if i % 2 == 0 else "no")
        pope["category"].append("adversarial")
    rec_features = Features(
        question_id=Value("string"),
        image=ImageFeature(),
        answer=Sequence(Value("string")),
        bbox=Sequence(Value("float32")),
    )
    pope_features = Features(
        question_id=Value("string"), image=ImageFeature(), question=Value("string"), answer=Value("string"),
        category=Value("string"),
    )  # fmt: skip
    Dataset.from_dict(rec, features=rec_features).to_parquet(folder / "data" / "rec.parquet")
    Dataset.from_dict(pope, features=pope_features).to_parquet(folder / "data" / "pope.parquet")
    (folder / "tiny_utils.py").write_text(_UTILS, encoding="utf-8")
    for task, data, body in (
        ("rerouting_tiny_rec", "rec", _REC_YAML),
        ("rerouting_tiny_pope", "pope", _POPE_YAML),
    ):
        header = f"task: {task}\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data' / data}.parquet\n"
        (folder / f"{task}.yaml").write_text(header + body, encoding="utf-8")
    return folder


_UTILS = '''"""The tiny task's functions: lmms-eval's own RefCOCO rec and POPE task functions."""

from lmms_eval.tasks.pope.utils import *  # noqa: F403
from lmms_eval.tasks.refcoco.utils_rec import *  # noqa: F403
'''
_REC_YAML = """test_split: test
output_type: generate_until
process_docs: !function tiny_utils.refcoco_bbox_rec_preprocess_dataset
doc_to_visual: !function tiny_utils.refcoco_bbox_rec_doc_to_visual
doc_to_text: !function tiny_utils.refcoco_bbox_rec_doc_to_text
doc_to_target: "bbox"
generation_kwargs:
  until:
    - "ASSISTANT:"
  max_new_tokens: 12
process_results: !function tiny_utils.refcoco_bbox_rec_process_result
metric_list:
  - metric: refcoco_IoU
    aggregation: !function tiny_utils.refcoco_bbox_rec_iou
    higher_is_better: true
  - metric: refcoco_ACC@0.5
    aggregation: !function tiny_utils.refcoco_bbox_rec_acc05
    higher_is_better: true
  - metric: refcoco_Center_ACC
    aggregation: !function tiny_utils.refcoco_bbox_rec_center_acc
    higher_is_better: true
metadata:
  version: 0.0
"""
_POPE_YAML = """test_split: test
output_type: generate_until
doc_to_visual: !function tiny_utils.pope_doc_to_visual
doc_to_text: !function tiny_utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function tiny_utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function tiny_utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function tiny_utils.pope_aggregate_f1_score
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  version: 0.0
"""
