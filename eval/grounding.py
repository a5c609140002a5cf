"""[eval.grounding.protocol] The grounding protocols of the Reroute release: prompt styles and box parsers.

A protocol is a prompt style and a box parser, each a named option (docs/eval-protocol.md):

| protocol | prompt style | box parsers, in order | release backbone |
|---|---|---|---|
| ``lmms`` | ``lmms-eval``: the task's own prompt, unchanged | none here: the task parses (normalised ``[x0, y0, x1, y1]``) | LLaVA-1.5 |
| ``qwen`` | ``nuwa-json``: "Locate {expr} in this image and output the bbox coordinates in JSON format." | ``pixel-json``, then ``pixel-parenthesis``; pixels divided by the image size | Qwen2.5-VL |

``auto`` picks ``lmms`` on LLaVA and ``qwen`` on Qwen2.5-VL, as the release does. Under ``qwen`` the model
rewrites a grounding request (recognised by lmms-eval's canonical RefCOCO prompt) to the Nüwa prompt and
hands the task the parsed box in the task's own normalised form, so lmms-eval's RefCOCO tasks score it
unchanged. Nothing here imports lmms-eval.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from rerouting.reference import RoutingError

# lmms-eval's RefCOCO rec prompt (lmms_eval/tasks/refcoco*/utils_rec.py, refcoco_bbox_rec_doc_to_text),
# followed there by the referring expression.
LMMS_REC_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
    "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
    "bounding box coordinate of the region this sentence describes: "
)
# The Nüwa / Reroute-release prompt for Qwen2.5-VL (research/reroute.md §6.4).
NUWA_JSON_PROMPT = "Locate {expr} in this image and output the bbox coordinates in JSON format."

Box = tuple[float, float, float, float]
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_BRACKETS = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")
_PARENS = re.compile(
    r"\(\s*"
    + _NUMBER
    + r"\s*,\s*"
    + _NUMBER
    + r"\s*\)\s*,?\s*(?:to|-)?\s*\(\s*"
    + _NUMBER
    + r"\s*,\s*"
    + _NUMBER
    + r"\s*\)"
)
_PARENS_FLAT = re.compile(r"\(\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\)")


def parse_normalised_brackets(text: str) -> Box | None:
    """[eval.grounding.box-normalised] The first ``[x0, y0, x1, y1]`` in ``text``, as written (already in [0, 1]).

    The form lmms-eval's RefCOCO tasks parse (``parse_float_sequence_within``); None when there is none.
    """
    match = _BRACKETS.search(text)
    return None if match is None else tuple(float(g) for g in match.groups())  # type: ignore[return-value]


def parse_pixel_json(text: str) -> Box | None:
    """[eval.grounding.box-pixels] Qwen's JSON box in pixels: ``bbox_2d`` (or ``bbox``) of the first object.

    Reads ``[{"bbox_2d": [x0, y0, x1, y1], "label": ...}]`` or one such object, inside a fenced
    ```` ```json ```` block or bare; a JSON list of four numbers counts too. When no JSON parses, the first
    bracketed four numbers are taken (Qwen often writes the list without valid JSON around it). None when
    there is no box.
    """
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    candidates += [text[m.start() :] for m in re.finditer(r"[\[{]", text)][:8]
    for candidate in candidates:
        try:
            value, _ = json.JSONDecoder().raw_decode(candidate.strip())
        except ValueError:
            continue
        box = _box_in(value)
        if box is not None:
            return box
    return parse_normalised_brackets(text)  # the same bracket form, read here as pixels


def _box_in(value) -> Box | None:
    if isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, dict):
        for key in ("bbox_2d", "bbox", "box"):
            if key in value:
                return _box_in(value[key])
        return None
    if isinstance(value, list):
        for item in value:
            box = _box_in(item)
            if box is not None:
                return box
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_pixel_parenthesis(text: str) -> Box | None:
    """[eval.grounding.box-parenthesis] The parenthesis form in pixels: ``(x0, y0), (x1, y1)`` or ``(x0, y0, x1, y1)``.

    None when neither form is in ``text``.
    """
    match = _PARENS.search(text) or _PARENS_FLAT.search(text)
    return None if match is None else tuple(float(g) for g in match.groups())  # type: ignore[return-value]


#: Box parsers by name ([eval.grounding.protocol]): name -> (parser, the frame its numbers are in).
BOX_PARSERS: dict[str, tuple[Callable[[str], Box | None], str]] = {
    "normalised-brackets": (parse_normalised_brackets, "normalised"),
    "pixel-json": (parse_pixel_json, "pixels"),
    "pixel-parenthesis": (parse_pixel_parenthesis, "pixels"),
}
#: Prompt styles by name: how a grounding request's text is written for the model.
PROMPT_STYLES: tuple[str, ...] = ("lmms-eval", "nuwa-json")
#: Protocols by name: (prompt style, box parsers tried in order); ``lmms`` leaves parsing to the task.
PROTOCOLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lmms": ("lmms-eval", ()),
    "qwen": ("nuwa-json", ("pixel-json", "pixel-parenthesis")),
}
GROUNDING_CHOICES: tuple[str, ...] = ("auto", *PROTOCOLS)


def protocol_for(name: str, family: str) -> str:
    """[eval.grounding.protocol] The protocol ``name`` means on a ``family`` host (``auto``: the release's choice)."""
    if name == "auto":
        return "qwen" if family == "qwen2.5-vl" else "lmms"
    if name not in PROTOCOLS:
        raise RoutingError(
            "eval.model-args", f"grounding={name!r} is not one of {', '.join(GROUNDING_CHOICES)}"
        )
    return name


def referring_expression(context: str) -> str | None:
    """The expression of an lmms-eval RefCOCO rec prompt, or None when ``context`` is not one."""
    at = context.find(LMMS_REC_PROMPT)
    return None if at < 0 else context[at + len(LMMS_REC_PROMPT) :].strip()


def rewrite_prompt(context: str, style: str) -> str:
    """[eval.grounding.protocol] ``context`` in prompt ``style``: a grounding request is rewritten, others kept."""
    if style not in PROMPT_STYLES:
        raise RoutingError("eval.grounding.protocol", f"prompt style {style!r} is not one of {PROMPT_STYLES}")
    expr = referring_expression(context)
    if style == "lmms-eval" or expr is None:
        return context
    return NUWA_JSON_PROMPT.format(expr=expr)


def parse_box(text: str, parsers: Sequence[str], image_size: tuple[int, int]) -> Box | None:
    """[eval.grounding.box-pixels] The first box the named ``parsers`` find, normalised to [0, 1].

    A parser in pixels is divided by the image's ``(width, height)`` (the document's image, as the release
    does); a normalised one is taken as is. None when no parser finds a box.
    """
    width, height = image_size
    for name in parsers:
        if name not in BOX_PARSERS:
            raise RoutingError(
                "eval.grounding.protocol", f"box parser {name!r} is not one of {list(BOX_PARSERS)}"
            )
        parse, frame = BOX_PARSERS[name]
        box = parse(text)
        if box is None:
            continue
        if frame == "pixels":
            box = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        return box
    return None


def task_answer(box: Box | None) -> str:
    """The box in the form lmms-eval's RefCOCO tasks parse: ``[x0, y0, x1, y1]``, or "" when none was found."""
    return "" if box is None else "[" + ", ".join(f"{v:.4f}" for v in box) + "]"
