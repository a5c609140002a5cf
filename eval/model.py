"""[eval.model-args] The ``rerouting`` model for lmms-eval: a local LLaVA-1.5 or Qwen2.5-VL checkpoint, routed.

    lmms-eval --model rerouting \\
        --model_args pretrained=/ckpt/llava-1.5-7b-hf,schedule=ours_vs_pdrop_avg64,policy=reroute \\
        --tasks pope,refcoco_bbox_rec_val --batch_size 8 --log_samples --output_path out/

Model arguments (``--model_args``, comma separated; lists use ``/``):

| argument | values | default |
|---|---|---|
| ``pretrained`` | a local checkpoint folder (LLaVA-1.5 or Qwen2.5-VL, transformers format) | required |
| ``schedule`` | a preset, a ``.yaml``/``.json`` schedule file, ``solve``, ``none`` (unrouted) | required |
| ``policy`` | ``reroute`` or ``remove`` | the preset's / file's own; ``reroute`` for ``solve`` |
| ``target_avg``, ``layers``, ``shape``, ``visual`` | the solver's target avg_T, decision layers (``2/7/15/23``), ``flat``/``geometric``/weights (``1/1/0.5/0.25``), the N the target refers to (Qwen) | ``shape=flat``; LLaVA's N |
| ``grounding`` | ``auto``, ``lmms``, ``qwen`` (rerouting.eval.grounding) | ``auto`` |
| ``dtype`` | ``float32``, ``bfloat16``, ``float16`` | ``float32`` |
| ``device`` | a torch device | ``cpu`` (or ``--device``) |
| ``min_pixels``, ``max_pixels`` | Qwen's resize bounds | the checkpoint's |

``--batch_size N`` batches N requests of equal generation options into one routed ``generate``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from transformers import AutoConfig, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from rerouting.optimized import route
from rerouting.reference.archs import ArchSpec

from .budgets import RoutedCounts, budget_record, dense_sample, log_sample, sample_budget
from .grounding import PROTOCOLS, parse_box, protocol_for, referring_expression, rewrite_prompt, task_answer
from .inputs import LlavaInputs, QwenInputs
from .options import model_args_error, positive_int, resolve_dtype, resolve_routing

# checkpoint model_type -> (model class, family)
MODEL_TYPES = {
    "llava": (LlavaForConditionalGeneration, "llava-1.5"),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, "qwen2.5-vl"),
}
ARGUMENTS = (
    "pretrained", "schedule", "policy", "target_avg", "layers", "shape", "visual", "grounding", "dtype",
    "device", "min_pixels", "max_pixels", "batch_size", "max_batch_size",
)  # fmt: skip


class Rerouting(lmms):
    """[eval.model-args] lmms-eval's ``rerouting`` model: ``generate_until`` through ``route(model, config)``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        schedule: str | None = None,
        policy: str | None = None,
        grounding: str = "auto",
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        target_avg: float | None = None,
        layers: str | None = None,
        shape: str | None = None,
        visual: int | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise model_args_error(
                f"unknown model argument(s) {sorted(unknown)}; valid: {', '.join(ARGUMENTS)}"
            )
        if pretrained is None or not (Path(str(pretrained)) / "config.json").is_file():
            raise model_args_error(
                f"pretrained={pretrained!r} is not a local checkpoint folder (no config.json there)"
            )
        path = str(pretrained)
        check_torchvision()
        self.batch_size = positive_int(
            int(batch_size) if str(batch_size).isdigit() else batch_size, "batch_size"
        )
        hf_config = AutoConfig.from_pretrained(path)
        if hf_config.model_type not in MODEL_TYPES:
            raise model_args_error(
                f"pretrained={path!r} is a {hf_config.model_type!r} checkpoint; supported: {', '.join(MODEL_TYPES)}"
            )
        model_class, self.family = MODEL_TYPES[hf_config.model_type]
        num_layers = hf_config.get_text_config().num_hidden_layers
        if visual is None and self.family == "llava-1.5":
            visual = hf_config.image_seq_length
        self.routing = resolve_routing(
            schedule, policy, num_visual=visual, num_layers=num_layers,
            target_avg=target_avg, layers=layers, shape=shape,
        )  # fmt: skip
        self.protocol = protocol_for(str(grounding), self.family)
        self.dtype = resolve_dtype(str(dtype))
        self.device = torch.device(device or "cpu")
        self.model = model_class.from_pretrained(path, dtype=self.dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self.router = None if self.routing.config is None else route(self.model, self.routing.config)
        self.arch = ArchSpec.from_model(self.model)
        self.num_layers = num_layers
        if self.family == "llava-1.5":
            self.inputs: LlavaInputs | QwenInputs = LlavaInputs(path)
        else:
            self.inputs = QwenInputs(path, min_pixels, max_pixels)
        self.tokenizer = self.inputs.tokenizer
        self.image_token_id = hf_config.image_token_id

    # -- lmms-eval's request types --------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """[eval.budgets] Every request's answer with its budget, batched by equal generation options."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, result in zip(chunk, self._generate([requests[i] for i in chunk])):
                    results[index] = result
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the rerouting model serves generate_until tasks only; loglikelihood (multiple-choice scoring) "
            "would need a routed forward over every continuation"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the rerouting model serves single-round generate_until tasks only")

    # -- one batch ------------------------------------------------------------------------------

    def _generate(self, requests: list[Instance]) -> list[GenerationResult]:
        contexts, images, tasks, grounded = [], [], [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = _images(doc_to_visual(self.task_dict[task][split][doc_id]), task)
            style, _ = PROTOCOLS[self.protocol]
            grounded.append(referring_expression(context) is not None and self.protocol != "lmms")
            contexts.append(rewrite_prompt(context, style))
            images.append(visuals)
            tasks.append(task)
        options, until = _generation_options(dict(requests[0].args[1]))
        batch = self.inputs.batch(contexts, images)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        started = time.perf_counter()
        with torch.inference_mode():
            if self.router is None:
                ids = self.model.generate(**batch, **options, pad_token_id=self.tokenizer.pad_token_id)
                rows = None
            else:
                with self.router:
                    ids = self.model.generate(**batch, **options, pad_token_id=self.tokenizer.pad_token_id)
                rows = self.router.last_trace.samples
        seconds = (time.perf_counter() - started) / len(requests)
        results = []
        for b in range(len(requests)):
            valid = batch["attention_mask"][b].bool()
            num_visual = int((batch["input_ids"][b][valid] == self.image_token_id).sum())
            num_text = int(valid.sum()) - num_visual
            if rows is None:
                row = dense_sample(num_text, num_visual, self.num_layers)
            else:
                row = rows[b * (len(rows) // len(requests))]  # beams / returned sequences repeat each sample
            budget = sample_budget(row, self.num_layers, self.arch, self.dtype, self.routing.config)
            record = budget_record(budget, self.routing.name)
            generated = ids[b, batch["input_ids"].shape[1] :].tolist()
            eos = set(_as_list(self.model.generation_config.eos_token_id)) | {self.tokenizer.pad_token_id}
            count = next((i for i, t in enumerate(generated) if t in eos), len(generated))
            text = _cut(self.tokenizer.decode(generated[:count], skip_special_tokens=True), until)
            if grounded[b]:
                box = parse_box(text, PROTOCOLS[self.protocol][1], images[b][0].size)
                record["grounding"] = {
                    "protocol": self.protocol,
                    "prompt": contexts[b],
                    "raw": text,
                    "box": box,
                }
                text = task_answer(box)
            log_sample(record, tasks[b], seconds, count)
            counts = RoutedCounts(input_tokens=num_text + num_visual, output_tokens=count, routing=record)
            results.append(GenerationResult(text=text, token_counts=counts))
        return results


def check_torchvision() -> None:
    """An installed torchvision that cannot load (a CUDA build beside a CPU-only torch) breaks transformers'
    image processors with an unrelated-looking error; say what it is instead (docs/evaluate.md)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return  # transformers uses its PIL image processors
    try:
        import torchvision  # noqa: F401
    except Exception as error:
        raise ImportError(
            f"torchvision is installed but does not load beside torch {torch.__version__} ({error}); install "
            "the torchvision build matching this torch, or uninstall it (pip uninstall torchvision): "
            "transformers then uses its PIL image processors (docs/evaluate.md, Install)"
        ) from None


def _images(visuals, task: str) -> list[Image.Image]:
    flat = []
    for visual in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if not isinstance(visual, Image.Image):
            raise model_args_error(f"task {task!r} gives a {type(visual).__name__} visual; images only")
        flat.append(visual.convert("RGB"))
    return flat


def _generation_options(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """lmms-eval's generation kwargs as ``generate`` options (as its HF models read them) and the stop strings."""
    until = gen_kwargs.pop("until", [])
    until = [until] if isinstance(until, str) else list(until)
    temperature = gen_kwargs.get("temperature") or 0
    options: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 1024)),
        "num_beams": int(gen_kwargs.get("num_beams", 1)),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        options["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            options["top_p"] = gen_kwargs["top_p"]
    return options, [u for u in until if u]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
