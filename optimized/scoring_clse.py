"""The CLSE gate, batched over images (spec/clse.md).

Every image of the batch with the same grid goes through one batched FFT: reference and decision states are
stacked ``[2·I, C, H, W]``, high-passed, reduced to spectral scores, and the evolution, standardisation and gate
run per image along one axis. The grids and spans come from the reference's checked bookkeeping
(``checked_grids``); the arithmetic is the reference's rules, vectorised.

Notation: B batch, N visual tokens (padded), C hidden, I images of one grid shape, n = H·W.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from rerouting.reference import ImageSpan
from rerouting.reference.schedule import ClseParams
from rerouting.reference.scoring_clse import checked_grids, high_pass_mask


def clse_gates_batched(
    reference: torch.Tensor,
    decision: torch.Tensor,
    images: Sequence[Sequence[ImageSpan]],
    num_visual: Sequence[int],
    params: ClseParams,
) -> torch.Tensor:
    """[clse.images] [clse.spectral] [clse.evolution] [clse.gate] The gates ``[B, N]`` of every sample.

    Args:
        reference: ``[B, N, C]`` the visual tokens' states entering the reference layer (visual-index order).
        decision: ``[B, N, C]`` those entering the decision layer (deferred rows stale).
        images: per sample its image spans with grids.
        num_visual: per sample its N (rows past it are padding, gate 0).
    """
    real = torch.float64 if reference.dtype == torch.float64 else torch.float32
    B, N, C = reference.shape
    gates = torch.zeros(B, N, dtype=real, device=reference.device)
    groups: dict[tuple[int, int], list[tuple[int, ImageSpan]]] = defaultdict(list)
    for b, (spans, count) in enumerate(zip(images, num_visual)):
        if count:
            for span, grid in zip(spans, checked_grids(spans, count)):
                groups[grid].append((b, span))
    for (rows, cols), members in groups.items():
        n = rows * cols
        index = torch.tensor([[b, span.start] for b, span in members], device=reference.device)  # [I, 2]
        token = index[:, 1:] + torch.arange(n, device=reference.device)  # [I, n]: visual indices
        sample = index[:, :1].expand(-1, n)  # [I, n]
        z = torch.stack([reference[sample, token], decision[sample, token]]).to(real)  # [2, I, n, C]
        z = z.transpose(-1, -2).reshape(2, len(members), C, rows, cols)
        mask = high_pass_mask(rows, cols, params.cutoff, real).to(reference.device)
        spectrum = torch.fft.fftshift(torch.fft.fft2(z), dim=(-2, -1)) * mask
        s = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).abs().mean(dim=2).reshape(2, -1, n)
        s_ref, s_dec = s[0], s[1]  # [I, n]
        e = torch.clamp((s_dec - s_ref).abs() / (s_ref.mean(dim=1, keepdim=True) + s_ref + params.eps), max=1)
        if n < 2:
            z_score = torch.zeros_like(e)
        else:
            z_score = (e - e.mean(dim=1, keepdim=True)) / (e.std(dim=1, keepdim=True) + params.eps)
        gates[sample, token] = torch.sigmoid(z_score / params.tau)
    return gates
