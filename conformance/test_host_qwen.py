"""Conformance on a Qwen2.5-VL host (spec/layout.md ``layout.rotary-ids``, ``layout.image-grid``).

A fixed tiny random Qwen2.5-VL (reference/tiny_qwen.py: GQA, q/k biases, mRoPE) and a left-padded batch of
two samples with two images of different grids each. The implementation gets ``image_grid_thw`` as an extra
keyword of ``prefill`` (``Checked.prefill`` reports ``image_grid_thw`` as a missing capability when its
``prefill`` does not take it). Truth: the unrouted host forward in float64 (keep-all) and the reference in
float64 (routed), each with its float32 yardstick.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata

import pytest
import torch

from rerouting.conformance.oracle import expect_error
from rerouting.conformance.oracle.tolerance import compare
from rerouting.conformance.protocol import check
from rerouting.reference import Reference, RoutingConfig, Schedule
from rerouting.reference.host_qwen import mrope_release_ok
from rerouting.reference.tiny_qwen import IMAGE_TOKEN_ID, TWO_SAMPLES, make_qwen_batch, tiny_qwen

MULTI = Schedule((1, 3, 4), (0.5, 0.5, 0.25))
KEEP_ALL = Schedule((1, 3, 5), (1.0, 1.0, 1.0))


QWEN = "Qwen2_5_VLForConditionalGeneration"


@pytest.fixture
def impl(impl):
    """The implementation under test, on this module's host only if it takes it (its ``hosts`` attribute)."""
    if not impl.supports_host(QWEN):
        pytest.skip(f"{impl.name} declares hosts {list(impl.impl.hosts)}, not {QWEN}")
    if not mrope_release_ok():
        pytest.skip(
            f"transformers {importlib.metadata.version('transformers')} has the Qwen mRoPE bug (#45325)"
        )
    return impl


@functools.cache
def _case() -> tuple[torch.nn.Module, dict]:
    return tiny_qwen(seed=0), make_qwen_batch(TWO_SAMPLES, padding="left", seed=0)


def _rows(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    return logits.detach().cpu()[batch["attention_mask"].bool()]


def _close(rule: str, name: str, out: torch.Tensor, truth: torch.Tensor, yardstick: torch.Tensor) -> None:
    result = compare(out, truth, yardstick, torch.float32)
    check(result.ok, rule, result.describe(name, rule), observed=result.error, allowed=result.allowed)


def _unrouted(model: torch.nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    model = copy.deepcopy(model).to(dtype)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        return model(**inputs, mm_token_type_ids=(batch["input_ids"] == IMAGE_TOKEN_ID).int()).logits


def check_rotary_ids(impl) -> None:
    """Keep-all equals the unrouted mRoPE forward; a routed batch equals the float64 reference, decisions exact."""
    model, batch = _case()
    out = impl.prefill(model, RoutingConfig(KEEP_ALL), **batch)
    truth, yardstick = _unrouted(model, batch, torch.float64), _unrouted(model, batch, torch.float32)
    _close(
        "layout.rotary-ids",
        "keep-all logits vs the unrouted Qwen2.5-VL forward",
        _rows(out.logits, batch),
        _rows(truth, batch),
        _rows(yardstick, batch),
    )
    config = RoutingConfig(MULTI)
    out = impl.prefill(model, config, **batch)
    truth = Reference(model, config, compute_dtype=torch.float64).prefill(**batch)
    yardstick = Reference(model, config).prefill(**batch)
    got = [[d.selected for d in s.decisions] for s in out.trace.samples]
    want = [[d.selected for d in s.decisions] for s in truth.trace.samples]
    check(got == want, "routing.active.positions", f"decisions {got} differ from the reference's {want}")
    _close(
        "routing.active.positions",
        "routed logits vs the float64 reference",
        _rows(out.logits, batch),
        _rows(truth.logits, batch),
        _rows(yardstick.logits, batch),
    )


@pytest.mark.spec("layout.rotary-ids", "routing.active.positions")
def test_rotary_ids(impl):
    check_rotary_ids(impl)


def check_image_grid(impl) -> None:
    """Per-image N and per-sample keep counts; grids that do not match the placeholder runs are an error."""
    model, batch = _case()
    out = impl.prefill(model, RoutingConfig(MULTI), **batch)
    n = [len(s.visual_positions) for s in out.trace.samples]
    k = [[d.k for d in s.decisions] for s in out.trace.samples]
    check(
        n == [10, 5], "layout.image-grid", f"N per sample {n}, expected [10, 5] (grids 4x4 + 4x6, 2x2 + 4x4)"
    )
    check(
        k == [[5, 5, 2], [2, 2, 1]], "layout.image-grid", f"keep counts {k} are not from each sample's own N"
    )
    wrong = dict(batch, image_grid_thw=batch["image_grid_thw"].flip(0))
    expect_error(
        "layout.image-grid",
        "image grids in the wrong order (a run of 6 tokens given a grid of 1 token)",
        lambda: impl.prefill(model, RoutingConfig(MULTI), **wrong),
        must_mention=("layout.image-grid", "layout.visual-set"),
    )


@pytest.mark.spec("layout.image-grid", "layout.batch-independence")
def test_image_grid(impl):
    check_image_grid(impl)
