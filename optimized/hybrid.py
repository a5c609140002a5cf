"""The optimized path's layers that are not plain softmax attention (spec/hosts.md).

A mixin of the prefill (``routing._Prefill``): linear-attention layers ([hosts.linear.semantics]) and DeepStack
injections ([hosts.deepstack]). Which tokens a linear layer runs on comes from the reference
(``reference.hybrid.layer_visual``); here only the batching:

- a linear layer's recurrence must start from a zero state for every sample, so its rows are LEFT-aligned
  (padding first, masked to zero by the layer itself, which keeps the state zero) for the call and turned
  back to the compact batch's right padding after it: two row gathers;
- ``dense`` under ``reroute`` runs the layer over every valid token: the compact rows are scattered into the
  buffer, the buffer's valid rows run, and the stage's compact rows are gathered again;
- a DeepStack level is added to the visual rows of the dense prefix's batch (rows = positions).

Notation: B batch, n rows, Tv = max_b T_b, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from rerouting.reference.compat import call_linear_layer

from .packing import Packing, gather_rows, scatter_rows_


def shifts(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``[B]`` long: how far sample b's ``lengths[b]`` valid rows move to end at row ``n - 1``."""
    return n - lengths


def left_aligned(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded ``x`` ``[B, n, D]`` with its valid rows moved to the end; the ``[B, n]`` padding mask
    (1 valid), None when no sample is padded. Padding rows repeat row 0 (the layer zeroes them)."""
    n = x.shape[1]
    shift = shifts(lengths, n)  # [B]
    if not bool(shift.any()):
        return x, None
    rows = torch.arange(n, device=x.device)[None, :]  # [1, n]
    source = (rows - shift[:, None]).clamp(min=0)  # [B, n]
    mask = (rows >= shift[:, None]).long()  # [B, n]
    return gather_rows(x, source), mask


def right_aligned(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`left_aligned`: valid rows back at ``0 .. n_b-1`` (later rows unspecified)."""
    n = x.shape[1]
    shift = shifts(lengths, n)
    if not bool(shift.any()):
        return x
    rows = torch.arange(n, device=x.device)[None, :]
    return gather_rows(x, (rows + shift[:, None]).clamp(max=n - 1))


def run_linear_packed(layer: nn.Module, x: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
    """[hosts.linear.dense] [hosts.linear.bypass] A linear-attention layer on a right-padded compact batch."""
    rows, mask = left_aligned(x, lengths)
    return right_aligned(call_linear_layer(layer, rows, padding_mask=mask, cache=cache), lengths)


class HybridLayers:
    """Linear-attention layers and DeepStack injections of ``routing._Prefill`` (its state: packing, x, buffer)."""

    def _run_linear(self, index: int, layer: nn.Module) -> None:
        """[hosts.linear.semantics] Layer ``index`` (linear attention) on the tokens the semantics names."""
        config = self.config
        wide = (
            config.policy == "reroute"
            and config.linear_attention == "dense"
            and self.packing is not self.dense
        )
        packing: Packing = self.dense if wide else self.packing
        if self.cache is not None:
            self.cache.record(index, packing)
        if not wide:
            self.x = run_linear_packed(layer, self.x, packing.lengths, self.cache)
            self.synced = False
            return
        self._sync()  # every valid token's state in the buffer, deferred rows stale
        out = run_linear_packed(layer, self.buffer[:, : self.Tv], packing.lengths, self.cache)  # [B, Tv, D]
        scatter_rows_(self.buffer, packing.index, out)  # deferred tokens updated too ([hosts.linear.dense])
        self.x = gather_rows(self.buffer, self.packing.index)  # the stage's compact rows again
        self.synced = True

    def _inject(self, index: int) -> None:
        """[hosts.deepstack] Add DeepStack level ``index`` to the visual rows (dense prefix: rows = positions)."""
        level = self.levels[index]  # [B, Tv, D], zero off the visual rows
        visual = self.is_visual[..., None]  # [B, Tv, 1]
        self.x = torch.where(visual, self.x + level.to(self.x.dtype), self.x)
        self.synced = False
