"""Derived tolerances (flash-attention's rule), never picked by feel.

An implementation's output ``out`` is compared with the reference in float64 (``truth``). The allowed
error is twice the error the reference itself makes at the implementation's precision
(``yardstick``: the reference run in that dtype), plus the rounding noise of doing any arithmetic at
the output's magnitude in that dtype:

    max|out - truth| <= 2 * max|yardstick - truth| + floor,
    floor = 2 * max|(truth + s - s) - truth|   evaluated in the implementation's dtype,
    s = max(0.3, max|truth|).

flash-attention adds 0.3 because its outputs are O(1); ``s`` keeps that and grows with the output's
own magnitude, so the floor is the noise of one add at the output's scale (logits are O(1..10)).

The yardstick's error estimates what any plain implementation errs by; on the tiny tensors of the
conformance suite a single tensor's max error is a noisy estimate (a few elements can all round
luckily). ``family_error`` lets a caller pass the yardstick's max error over the whole family of
outputs of one example (e.g. the keys of every layer and sample), a steadier estimate; the larger of
the two is used.

Only valid (non-padded) rows are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RTOL_FACTOR = 2.0  # flash-attention: "at most twice the numerical error of a PyTorch implementation"


def rounding_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """2·max|(x + s − s) − x|, s = max(0.3, max|x|), arithmetic in ``dtype``: the noise of one add at x's scale."""
    if not truth.numel():
        return 0.0
    x = truth.to(dtype)
    shift = max(0.3, float(truth.double().abs().max()))
    return 2.0 * float(((x + shift) - shift).double().sub(x.double()).abs().max())


@dataclass(frozen=True)
class Comparison:
    """The observed and the allowed error of one comparison."""

    error: float
    yardstick_error: float
    floor: float

    @property
    def allowed(self) -> float:
        return RTOL_FACTOR * self.yardstick_error + self.floor

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    def describe(self, name: str, rule: str) -> str:
        return (
            f"[rule {rule}] {name}: max error {self.error:.3e} > allowed {self.allowed:.3e} "
            f"(= {RTOL_FACTOR:g} x reference's own error {self.yardstick_error:.3e} + rounding floor {self.floor:.3e})"
        )


def compare(
    out: torch.Tensor,
    truth: torch.Tensor,
    yardstick: torch.Tensor,
    dtype: torch.dtype,
    *,
    family_error: float = 0.0,
) -> Comparison:
    """Compare ``out`` with the float64 ``truth`` under the derived tolerance for ``dtype``.

    ``family_error``: the yardstick's max error over the family of outputs this one belongs to
    (module docstring); the larger of it and this tensor's own yardstick error is used.
    """
    truth = truth.double()
    own = float((yardstick.double() - truth).abs().max()) if truth.numel() else 0.0
    return Comparison(
        error=float((out.double() - truth).abs().max()) if out.numel() else 0.0,
        yardstick_error=max(own, family_error),
        floor=rounding_floor(truth, dtype),
    )


def assert_close(
    name: str,
    out: torch.Tensor,
    truth: torch.Tensor,
    yardstick: torch.Tensor,
    dtype: torch.dtype,
    *,
    rule: str,
) -> Comparison:
    """Assert ``out`` is within the derived tolerance; the message names the rule and both errors."""
    result = compare(out, truth, yardstick, dtype)
    assert result.ok, result.describe(name, rule)
    return result
