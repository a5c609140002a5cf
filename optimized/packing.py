"""Packed layouts and the index gathers between them (spec/layout.md, spec/routing.md).

Three layouts hold a batch's tokens; every move between them is one gather or one scatter:

- *padded batch* ``[B, T, ...]``: the caller's columns, padding anywhere (left, right, both);
- *buffer* ``[B, Tv + 1, D]``: sample b's valid tokens at rows ``0..T_b-1``, so a row index IS the token's
  position ([layout.sequence]); rows ``T_b..Tv-1`` are unused and row ``Tv`` is a trash row that padding
  entries of a packing point at, so scatters never touch a real row;
- *compact* ``[B, n, D]``: each sample's active tokens at rows ``0..n_b-1`` in ascending position, then
  right padding up to ``n = max_b n_b``.

Notation used for tensor shapes:
    B batch, T padded length, T_b valid length of sample b, Tv = max_b T_b, n compact length,
    D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Packing:
    """Which buffer rows make up a compact batch.

    Attributes:
        index: ``[B, n]`` long, the buffer row (= original position) of every compact row, ascending within a
            sample; padding rows hold ``Tv`` (the trash row).
        lengths: ``[B]`` long, ``n_b``.
        valid: ``[B, n]`` bool, ``index < Tv`` (row ``i < n_b``).
        exact: no sample is padded (every ``n_b == n``).
    """

    index: torch.Tensor
    lengths: torch.Tensor
    valid: torch.Tensor
    exact: bool


def valid_columns(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[layout.sequence] The padded-batch column of every valid token, in order.

    Returns ``cols`` ``[B, Tv]`` long (rows past ``T_b`` hold a padding column, never read as a token) and
    ``lengths`` ``[B]`` long.
    """
    valid = attention_mask.bool()  # [B, T]
    lengths = valid.sum(dim=1)  # [B]
    # A stable sort of "is padding" puts the valid columns first, in their order.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # [B, T]
    return order[:, : int(lengths.max())], lengths


def pack(keep: torch.Tensor) -> Packing:
    """[routing.active-set] The compact packing of the buffer rows where ``keep`` (``[B, Tv]`` bool) is set."""
    B, Tv = keep.shape
    lengths = keep.sum(dim=1)  # [B]
    n = int(lengths.max()) if B else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # [B, Tv]: kept rows first, ascending
    order = order[:, :n]  # [B, n]
    valid = torch.arange(n, device=keep.device)[None, :] < lengths[:, None]  # [B, n]
    index = torch.where(valid, order, Tv)  # [B, n]: padding rows -> trash row
    return Packing(index=index, lengths=lengths, valid=valid, exact=bool((lengths == n).all()))


def _flat(index: torch.Tensor, rows: int) -> torch.Tensor:
    """Row indices ``[B * n]`` into a ``[B * rows, D]`` view of a ``[B, rows, D]`` tensor."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * rows  # [B, 1]
    return (index + offsets).reshape(-1)  # [B * n]


def gather_rows(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``[B, n]``) of ``buffer`` (``[B, R, D]``): ``[B, n, D]``, a copy.

    One ``index_select`` of whole rows over the flattened batch (a row copy each), not an element gather.
    """
    B, R, D = buffer.shape
    flat = buffer.reshape(B * R, D)  # [B * R, D] (a view when contiguous)
    return flat.index_select(0, _flat(index, R)).view(B, index.shape[1], D)  # [B, n, D]


def scatter_rows_(buffer: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write ``rows`` (``[B, n, D]``) into ``buffer`` (``[B, R, D]``, contiguous) at ``index`` (``[B, n]``), in place.

    Padding entries all point at the trash row; which of them lands there is unspecified and never read.
    """
    B, R, D = buffer.shape
    flat = buffer.view(B * R, D)  # [B * R, D]: a view, so the copy lands in ``buffer``
    flat.index_copy_(0, _flat(index, R), rows.reshape(B * index.shape[1], D))  # rows: [B * n, D]
    return buffer


def inverse(index: torch.Tensor, rows: int) -> torch.Tensor:
    """``inv`` ``[B, rows]`` long: ``inv[b, index[b, i]] = i``; -1 for buffer rows not in the packing.

    The trash row gets one of the padding rows: callers mask padding before reading through ``inv``.
    """
    inv = torch.full((index.shape[0], rows), -1, dtype=torch.long, device=index.device)
    return inv.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))


def block_mask(
    positions: torch.Tensor, valid: torch.Tensor, implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """[routing.active.causal] Attention mask ``[B, 1, n, n]`` of a compact batch from ORIGINAL positions.

    A key is visible to a query iff both are valid rows and the key's position is <= the query's. A padding
    query row sees only its own column, so that no row is empty (SDPA returns NaN or zeros for empty rows,
    depending on the backend); padding rows are never read. ``sdpa`` gets a bool mask (True = attend),
    ``eager`` an additive float mask in ``dtype``.

    Args:
        positions: ``[B, n]`` long, original positions of the rows.
        valid: ``[B, n]`` bool, which rows are tokens (not padding).
    """
    causal = positions[:, None, :] <= positions[:, :, None]  # [B, n, n]: key position <= query position
    visible = causal & valid[:, None, :] & valid[:, :, None]  # [B, n, n]
    visible |= torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
    visible = visible[:, None]  # [B, 1, n, n]
    if implementation == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min
    )


def stage_mask(packing: Packing, implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """[routing.active.causal] The mask of a compact batch, or None where an explicit ``is_causal`` is exact.

    SDPA's ``is_causal`` (its own lower-triangular mask) is exact when no sample is padded: compact rows are
    in ascending original position, so "key row <= query row" is "key position <= query position". A None
    mask is passed together with ``is_causal=True`` (``compat.call_layer`` refuses it otherwise), never left
    for the host to read as causal. Eager attention has no causal request: always an explicit mask.
    """
    if implementation == "sdpa" and packing.exact:
        return None
    return block_mask(packing.index, packing.valid, implementation, dtype)
