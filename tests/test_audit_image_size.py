"""``rerouting audit --image-size WxH``: Qwen's smart-resize rule decides N; LLaVA's fixed crop; errors.

Also the Qwen ``release`` group (``--schedule release`` and the default audit on a Qwen model).
"""

from __future__ import annotations

import json

import pytest

from rerouting.conformance import audit
from rerouting.conformance.audit.image_size import (
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    image_layout,
    smart_resize,
)
from rerouting.conformance.audit.inputs import QWEN_RELEASE_SCHEDULES, RELEASE_SCHEDULES

FAST = ["-q", "--no-trace", "--no-plots"]
QWEN = {"rule": "smart_resize", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


def _transformers_smart_resize():
    """transformers' own function (the torchvision module, else its PIL twin: same code, "Copied from")."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as theirs
    except ImportError:  # torchvision missing: the PIL backend holds the same function
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs
    return theirs


def _processor_size() -> dict:
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as cls
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    return dict(cls.size)


def run_cli(tmp_path, *argv, name="out"):
    out = tmp_path / name
    status = audit.main([*argv, "--out", str(out)])
    return status, (json.loads((out / "report.json").read_text()) if status == 0 else None)


# (width, height) → (resized width, resized height, N); research/reroute.md §5.5 gives 391, 345, 247.
SIZES = {
    (640, 480): (644, 476, 17 * 23),
    (640, 427): (644, 420, 15 * 23),
    (369, 520): (364, 532, 13 * 19),
    (336, 336): (336, 336, 144),
    (20, 20): (56, 56, 4),  # below min_pixels: scaled up
    (4000, 3000): (1148, 840, 41 * 30),  # above max_pixels: scaled down
    (1, 150): (28, 700, 25),  # 28 x 140 is below min_pixels: scaled up
}


@pytest.mark.spec("layout.image-grid")
@pytest.mark.parametrize("size", sorted(SIZES))
def test_smart_resize_matches_transformers(size):
    width, height = size
    theirs = _transformers_smart_resize()
    assert smart_resize(height, width) == theirs(height, width) == SIZES[size][1::-1]
    for low, high in ((QWEN_MIN_PIXELS, 451584), (28 * 28 * 4, 28 * 28 * 64)):
        assert smart_resize(height, width, 28, low, high) == theirs(height, width, 28, low, high)
    image = image_layout(QWEN, "qwen2_5_vl", size)
    resized_w, resized_h, n = SIZES[size]
    assert image["resized"] == [resized_w, resized_h] and image["num_visual"] == n
    assert image["grid_thw"] == [1, resized_h // 14, resized_w // 14]
    assert image["merged_grid"] == [resized_h // 28, resized_w // 28]


@pytest.mark.spec("layout.image-grid")
def test_defaults_are_the_processor_defaults():
    assert _processor_size() == {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    with pytest.raises(ValueError, match="aspect ratio"):
        _transformers_smart_resize()(1, 300)
    with pytest.raises(ValueError, match=r"--image-size 300x1: .*aspect ratio"):
        image_layout(QWEN, "qwen2_5_vl", (300, 1))


@pytest.mark.spec("layout.image-grid", "budget.avg-tokens", "schedule.presets")
def test_qwen_image_size_sets_n_in_every_output(tmp_path, capsys):
    argv = [
        "--model",
        "qwen2.5-vl-7b",
        "--image-size",
        "640x480",
        "--schedule",
        "qwen25vl_ours_vs_fastv_avg64",
    ]
    status, report = run_cli(tmp_path, *argv, "--policy", "both", "-q", "--no-plots")
    printed = capsys.readouterr().out
    assert status == 0
    layout = report["layout"]
    assert layout["num_visual"] == 391 and layout["num_visual_source"] == "--image-size 640x480"
    assert {"num_text", "visual_start", "batch"} <= set(layout)  # the existing keys stay
    image = layout["image"]
    assert (
        image["resized"] == [644, 476]
        and image["grid_thw"] == [1, 34, 46]
        and image["merged_grid"] == [17, 23]
    )
    assert (image["min_pixels"], image["max_pixels"]) == (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    assert report["dense"]["avg_visual_tokens"]["realized"] == 391
    assert [r["policy"] for r in report["schedules"][0]["runs"]] == ["remove", "reroute"]
    assert "N=391" in printed and "644x476" in printed and "(1, 34, 46)" in printed
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "N = 391" in markdown and "644×476" in markdown and "smart_resize" in markdown
    # the release's max_pixels = 576·28² caps N at 576
    status, report = run_cli(
        tmp_path, "--model", "qwen2.5-vl-7b", "--image-size", "1280x960", "--max-pixels", "451584", *FAST,
        "--schedule", "qwen25vl_fastv_K3_avg64", name="capped",
    )  # fmt: skip
    assert status == 0 and report["layout"]["image"]["num_visual"] == 20 * 27 <= 576
    assert report["layout"]["image"]["pixels_source"]["max_pixels"] == "--max-pixels"


@pytest.mark.spec("layout.image-grid")
def test_llava_image_size_is_the_fixed_crop(tmp_path):
    status, report = run_cli(tmp_path, "--image-size", "640x480", "--schedule", "fastv_K3_avg64", *FAST)
    assert status == 0 and report["layout"]["num_visual"] == 576
    image = report["layout"]["image"]
    assert (
        image["rule"] == "fixed"
        and image["resized"] == [336, 336]
        and "whatever the image size" in image["note"]
    )
    assert report["notes"] == []  # N = 576 on 32 layers: the LLaVA labels hold


@pytest.mark.spec("schedule.presets", "budget.avg-tokens")
def test_release_group_follows_the_model(tmp_path):
    status, report = run_cli(tmp_path, "--model", "qwen2.5-vl-7b", "--image-size", "640x480", *FAST)
    assert status == 0
    assert [s["name"] for s in report["schedules"]] == list(QWEN_RELEASE_SCHEDULES)
    assert all(s["family"].startswith("qwen25vl_") for s in report["solver"] if s["kind"] == "matched")
    assert any("qwen25vl presets" in note for note in report["notes"])
    status, report = run_cli(tmp_path, "--model", "qwen2.5-vl-7b", "--schedule", "release", *FAST, name="r")
    assert [s["name"] for s in report["schedules"]] == list(QWEN_RELEASE_SCHEDULES)
    status, report = run_cli(
        tmp_path, "--schedule", "qwen25vl_release", "--schedule", "release", *FAST, name="l"
    )
    assert [s["name"] for s in report["schedules"]] == [*QWEN_RELEASE_SCHEDULES, *RELEASE_SCHEDULES]


BAD = [
    (["--image-size", "640"], ["--image-size", "'640'", "WIDTHxHEIGHT"]),
    (["--image-size", "0x480"], ["--image-size", "'0x480'", "at least 1"]),
    (["--image-size", "axb"], ["--image-size", "'axb'"]),
    (["--image-size", "1x300"], ["--image-size 1x300", "aspect ratio"]),
    (["--image-size", "64x64", "--visual-tokens", "9"], ["--image-size 64x64", "--visual-tokens 9"]),
    (["--max-pixels", "451584"], ["--max-pixels", "--image-size"]),
    (["--image-size", "64x64", "--min-pixels", "9000", "--max-pixels", "3000"], ["9000", "3000"]),
]


@pytest.mark.spec("layout.image-grid")
@pytest.mark.parametrize("argv,expected", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_image_sizes_exit_2_naming_the_value(tmp_path, capsys, argv, expected):
    status = audit.main(["--model", "qwen2.5-vl-7b", *argv, *FAST, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)


@pytest.mark.spec("layout.image-grid")
def test_image_size_on_a_model_without_a_rule(tmp_path, capsys):
    from transformers import LlavaNextConfig

    folder = tmp_path / "next"
    LlavaNextConfig().save_pretrained(folder)
    status = audit.main(
        ["--model", str(folder), "--image-size", "640x480", *FAST, "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert status == 2 and "'llava_next'" in err and "--visual-tokens" in err
