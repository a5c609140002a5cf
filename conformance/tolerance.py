"""Derived tolerances (flash-attention's rule), never picked by feel.

An implementation's output ``out`` is compared with the reference in float64 (``truth``). The allowed
error is twice the error the reference itself makes at the implementation's precision
(``yardstick``: the reference run in that dtype), plus the rounding noise of doing any arithmetic at
the output's magnitude in that dtype:

    max|out - truth| <= 2 * max|yardstick - truth| + floor,
    floor = 2 * max|(truth + 0.3 - 0.3) - truth|   evaluated in the implementation's dtype.

Only valid (non-padded) rows are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RTOL_FACTOR = 2.0  # flash-attention: "at most twice the numerical error of a PyTorch implementation"


def rounding_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """2·max|(x + 0.3 − 0.3) − x| with the arithmetic in ``dtype``: the noise of one add at x's magnitude."""
    x = truth.to(dtype)
    return 2.0 * float(((x + 0.3) - 0.3).double().sub(x.double()).abs().max()) if x.numel() else 0.0


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
    out: torch.Tensor, truth: torch.Tensor, yardstick: torch.Tensor, dtype: torch.dtype
) -> Comparison:
    """Compare ``out`` with the float64 ``truth`` under the derived tolerance for ``dtype``."""
    truth = truth.double()
    return Comparison(
        error=float((out.double() - truth).abs().max()) if out.numel() else 0.0,
        yardstick_error=float((yardstick.double() - truth).abs().max()) if truth.numel() else 0.0,
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
