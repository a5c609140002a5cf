"""The CLSE scorer: spectral evolution gate x attention, per image on its own grid (spec/clse.md).

Per image: the per-channel 2-D FFT high-pass magnitude at the reference and decision states, the relative
change of its channel mean, standardised and gated; the gates of all images times the attention probe's
scores give the ``[N]`` scores of one top-k. Literally as the rules say, one image at a time.

Notation: n = H·W an image's tokens, C hidden channels, N visual tokens, T_b the sample's valid tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .host import ImageSpan
from .schedule import ClseParams, RoutingError
from .scoring import DecisionContext, attention_scores, register_scorer


def high_pass_mask(rows: int, cols: int, cutoff: float, dtype: torch.dtype) -> torch.Tensor:
    """[clse.spectral] The centred Gaussian high-pass ``[H, W]``: ``1 - exp(-d² / (2σ²))``, the limit at σ = 0."""
    y = torch.arange(rows, dtype=dtype)[:, None] - rows // 2
    x = torch.arange(cols, dtype=dtype)[None, :] - cols // 2
    d2 = y**2 + x**2  # [H, W]: squared distance from the shifted centre
    sigma = cutoff * min(rows // 2, cols // 2)
    if sigma == 0:  # a grid side below 2: only the mean is removed
        return (d2 > 0).to(dtype)
    return 1 - torch.exp(-d2 / (2 * sigma**2))


def spectral_scores(states: torch.Tensor, grid: tuple[int, int], cutoff: float) -> torch.Tensor:
    """[clse.spectral] Spectral score ``[n]`` of one image's states ``[n, C]`` on its grid ``(H, W)``.

    fft2 per channel over the grid (float32, float64 for float64 states), fftshift, the high-pass, ifftshift,
    ifft2, magnitude, mean over channels.
    """
    rows, cols = grid
    real = torch.float64 if states.dtype == torch.float64 else torch.float32
    z = states.to(real).T.reshape(-1, rows, cols)  # [C, H, W]: row-major grid per channel
    spectrum = torch.fft.fftshift(torch.fft.fft2(z), dim=(-2, -1))  # [C, H, W] complex
    filtered = spectrum * high_pass_mask(rows, cols, cutoff, real)
    residual = torch.fft.ifft2(torch.fft.ifftshift(filtered, dim=(-2, -1))).abs()  # [C, H, W]
    return residual.mean(dim=0).reshape(rows * cols)  # [n]


def evolution(s_ref: torch.Tensor, s_dec: torch.Tensor, eps: float) -> torch.Tensor:
    """[clse.evolution] ``min(1, |s(d) - s(L)| / (mean s(L) + s(L) + eps))`` over one image's tokens ``[n]``."""
    return torch.clamp((s_dec - s_ref).abs() / (s_ref.mean() + s_ref + eps), max=1)


def gate(e: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """[clse.gate] ``sigmoid(((e - mean e) / (std e + eps)) / tau)``, unbiased std; ``z = 0`` for one token."""
    if e.numel() < 2:
        return torch.sigmoid(torch.zeros_like(e))
    z = (e - e.mean()) / (e.std() + eps)
    return torch.sigmoid(z / tau)


def checked_grids(images: Sequence[ImageSpan], num_visual: int) -> tuple[tuple[int, int], ...]:
    """[clse.grid] Every image's grid, checked against its span; the spans must cover the visual set."""
    grids, covered = [], 0
    for image in images:
        size = image.stop - image.start
        if image.grid is None:
            raise RoutingError(
                "clse.grid", f"image at visual indices {image.start}..{image.stop - 1} has no token grid"
            )
        rows, cols = image.grid
        if rows * cols != size or image.start != covered:
            raise RoutingError(
                "clse.grid",
                f"image span {image.start}..{image.stop - 1} ({size} tokens) does not hold its grid {rows}x{cols}",
            )
        grids.append((rows, cols))
        covered = image.stop
    if covered != num_visual:
        raise RoutingError(
            "clse.grid", f"the image spans cover {covered} of the sample's {num_visual} visual tokens"
        )
    return tuple(grids)


def clse_gates(
    reference: torch.Tensor,
    decision: torch.Tensor,
    images: Sequence[ImageSpan],
    params: ClseParams,
) -> torch.Tensor:
    """[clse.images] [clse.gate] The gate ``[N]`` of every visual token, each image on its own grid.

    Args:
        reference: ``[N, C]`` the visual tokens' states entering the reference layer, in visual-index order.
        decision: ``[N, C]`` their states entering the decision layer (deferred rows stale).
    """
    grids = checked_grids(images, reference.shape[0])
    real = torch.float64 if reference.dtype == torch.float64 else torch.float32
    gates = torch.empty(reference.shape[0], dtype=real)
    for image, grid in zip(images, grids):
        span = slice(image.start, image.stop)
        s_ref = spectral_scores(reference[span], grid, params.cutoff)
        s_dec = spectral_scores(decision[span], grid, params.cutoff)
        gates[span] = gate(evolution(s_ref, s_dec, params.eps), params.tau, params.eps)
    return gates


def attention_term(context: DecisionContext) -> torch.Tensor:
    """[clse.variants] The attention probe's scores ``[N]`` with the scorer's probe_layer and query options."""
    host = context.host
    if context.scorer.probe_layer == "previous":
        layer, states = host.layers[context.layer - 1], context.previous_states
    else:
        layer, states = host.layers[context.layer], context.states
    return attention_scores(
        host, layer, states, context.keys, context.queries, context.visual, context.score_dtype
    )


@register_scorer("clse")
class ClseScorer:
    """[clse.scorer] [clse.variants] [clse.stages] CLSE: gate x attention, gate only, or attention only."""

    probes = True  # the `clse` variant runs none: scoring.runs_probe

    def __call__(self, context: DecisionContext) -> torch.Tensor:
        params = context.scorer.clse
        if not params.spectral_at(context.stage):
            return attention_term(context)
        if context.reference_states is None:
            raise RoutingError(
                "clse.reference-layer", "the decision context carries no reference-layer states"
            )
        visual = list(context.visual)
        gates = clse_gates(
            context.reference_states[visual], context.states[visual], context.images, params
        ).to(context.score_dtype)
        if params.variant == "clse":
            return gates
        return gates * attention_term(context)
