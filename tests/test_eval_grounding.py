"""The release's grounding protocols on hand-written model outputs (docs/eval-protocol.md; rerouting.eval.grounding)."""

from __future__ import annotations

import pytest

from rerouting.eval.grounding import (
    LMMS_REC_PROMPT,
    parse_box,
    parse_normalised_brackets,
    parse_pixel_json,
    parse_pixel_parenthesis,
    protocol_for,
    referring_expression,
    rewrite_prompt,
    task_answer,
)
from rerouting.reference import RoutingError

QWEN = ("pixel-json", "pixel-parenthesis")


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("[0.12, 0.3, 0.5, 0.91]", (0.12, 0.3, 0.5, 0.91)),
        ("The box is [0.1,0.2,0.3,0.4] and [0.5, 0.5, 0.6, 0.6].", (0.1, 0.2, 0.3, 0.4)),
        ("[ 0 , 1 , 0.25 , 1 ]", (0.0, 1.0, 0.25, 1.0)),
        ("[0.1, 0.2, 0.3]", None),
        ("no box here", None),
    ],
)
def test_normalised_brackets(text, box):
    assert parse_normalised_brackets(text) == box


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ('```json\n[\n\t{"bbox_2d": [12, 34, 156, 278], "label": "the dog"}\n]\n```', (12, 34, 156, 278)),
        ('[{"bbox_2d": [1.5, 2, 3, 4]}]', (1.5, 2, 3, 4)),
        ('{"bbox": [10, 20, 30, 40]}', (10, 20, 30, 40)),
        ('Here: {"label": "cat", "bbox_2d": [5, 6, 7, 8]} done', (5, 6, 7, 8)),
        ("[100, 50, 200, 150]", (100, 50, 200, 150)),
        ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "x"  \n```', (10, 20, 30, 40)),  # broken JSON
        ('[{"label": "nothing"}]', None),
        ("I cannot find it.", None),
    ],
)
def test_pixel_json(text, box):
    assert parse_pixel_json(text) == (None if box is None else tuple(float(v) for v in box))


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("(10, 20), (110, 220)", (10, 20, 110, 220)),
        ("from (10,20) to (30,40)", (10, 20, 30, 40)),
        ("(1.5, 2.5, 3.5, 4.5)", (1.5, 2.5, 3.5, 4.5)),
        ("(10, 20)", None),
    ],
)
def test_pixel_parenthesis(text, box):
    assert parse_pixel_parenthesis(text) == (None if box is None else tuple(float(v) for v in box))


def test_qwen_boxes_are_divided_by_the_image_size():
    size = (200, 100)  # width, height
    assert parse_box('[{"bbox_2d": [20, 10, 100, 50]}]', QWEN, size) == (0.1, 0.1, 0.5, 0.5)
    assert parse_box("(50, 25), (150, 75)", QWEN, size) == (0.25, 0.25, 0.75, 0.75)
    assert parse_box("nothing", QWEN, size) is None
    assert parse_box("[0.1, 0.2, 0.3, 0.4]", ("normalised-brackets",), size) == (0.1, 0.2, 0.3, 0.4)
    assert task_answer((0.1, 0.1, 0.5, 0.5)) == "[0.1000, 0.1000, 0.5000, 0.5000]"
    assert task_answer(None) == ""
    assert parse_normalised_brackets(task_answer((0.1, 0.25, 0.5, 1.0))) == (0.1, 0.25, 0.5, 1.0)


def test_prompt_styles_and_protocols():
    context = LMMS_REC_PROMPT + "the man in the red shirt"
    assert referring_expression(context) == "the man in the red shirt"
    assert rewrite_prompt(context, "lmms-eval") == context
    assert rewrite_prompt(context, "nuwa-json") == (
        "Locate the man in the red shirt in this image and output the bbox coordinates in JSON format."
    )
    vqa = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert referring_expression(vqa) is None
    assert rewrite_prompt(vqa, "nuwa-json") == vqa  # only grounding requests are rewritten
    assert protocol_for("auto", "llava-1.5") == "lmms"
    assert protocol_for("auto", "qwen2.5-vl") == "qwen"
    assert protocol_for("lmms", "qwen2.5-vl") == "lmms"
    with pytest.raises(RoutingError, match="grounding='json'.*auto, lmms, qwen"):
        protocol_for("json", "llava-1.5")
    with pytest.raises(RoutingError, match="prompt style 'plain'"):
        rewrite_prompt(context, "plain")
    with pytest.raises(RoutingError, match="box parser 'pixels'"):
        parse_box("[1, 2, 3, 4]", ("pixels",), (10, 10))
