"""The routed KV cache: per-layer, per-sample lengths in padded storage (spec/cache.md).

After a routed prefill, layer l holds the K/V of exactly its active tokens ([cache.contents]): their number
differs per layer and per sample. Storage is one ``DynamicLayer`` per decoder layer holding the compact batch
``[B, H_kv, n_l, hd]`` (right-padded to the widest sample); decoded tokens are appended behind that padding,
one column per step for every sample. The per-sample valid prefix lengths make the decode masks.

Notation used for tensor shapes:
    B batch, L layers, H_kv key/value heads, hd head dim, n_l padded prefill entries of layer l,
    q new tokens, C = n_l + steps + q cache columns seen by a decode step, T padded prompt length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rerouting.reference import RotaryIds, RoutingError, SampleCache
from rerouting.reference.compat import new_cache

from .packing import Packing


class RoutedCache(Cache):
    """[cache.contents] A ``transformers.Cache`` whose layers hold different numbers of entries per sample.

    Attributes:
        prefill_lengths: ``[B]`` long, T_b; decoded tokens take positions T_b, T_b + 1, ...
            ([cache.decode.positions]).
        columns: T, the padded prompt length (what ``get_seq_length`` counts, like the host's own cache).
        steps: tokens decoded so far per sample.
        entries: per layer, ``[B]`` long, the valid prefill entries of each sample (text + active visual).
        positions: per layer, ``[B, n_l]`` long, the original position of each entry (padding entries hold
            Tv, the buffer's trash row, and are never visible).
        rotary: the batch's position-id table for an mRoPE host (decoded position p has ids ``p + δ_b``,
            [cache.decode.positions]); None for 1-D RoPE.
        kinds: per layer ``"softmax"`` (a ``DynamicLayer`` of K/V) or ``"linear"`` (a ``LinearAttentionLayer``
            of per-sample conv and recurrent states, [hosts.linear.cache]); None: every layer softmax.
    """

    def __init__(
        self,
        num_layers: int,
        prefill_lengths: torch.Tensor,
        columns: int,
        rotary: RotaryIds | None = None,
        *,
        kinds: tuple[str, ...] | None = None,
    ):
        self.kinds = ("softmax",) * num_layers if kinds is None else tuple(kinds)
        super().__init__(layers=[_layer(kind) for kind in self.kinds])
        self.prefill_lengths = prefill_lengths
        self.columns = columns
        self.steps = 0
        self.entries: list[torch.Tensor | None] = [None] * num_layers
        self.positions: list[torch.Tensor | None] = [None] * num_layers
        self.rotary = rotary

    # --- prefill ---------------------------------------------------------------------------------
    def record(self, layer_idx: int, packing: Packing) -> None:
        """[cache.contents] Note which tokens layer ``layer_idx`` is about to store (its compact packing)."""
        self.entries[layer_idx] = packing.lengths
        self.positions[layer_idx] = packing.index

    def retroactive_cut(self, keep: torch.Tensor) -> None:
        """[cache.policy.retroactive] Keep, in every layer, only the entries whose position ``keep`` marks.

        ``keep`` ``[B, Tv + 1]`` bool by position (the trash row Tv False). Entries stay in cache order, right
        padded to the widest sample again; called once, after prefill and before any decode step.
        """
        for index, layer in enumerate(self.layers):
            positions, entries = self.positions[index], self.entries[index]  # [B, n_l], [B]
            valid = torch.arange(positions.shape[1], device=positions.device)[None, :] < entries[:, None]
            kept = keep.gather(1, positions) & valid  # [B, n_l]
            order = torch.sort(
                (~kept).to(torch.int8), dim=1, stable=True
            ).indices  # kept entries first, in order
            counts = kept.sum(dim=1)  # [B]
            width = int(counts.max()) if counts.numel() else 0
            order = order[:, :width]  # [B, n']
            pad = torch.arange(width, device=positions.device)[None, :] >= counts[:, None]  # [B, n']
            self.positions[index] = positions.gather(1, order).masked_fill(pad, keep.shape[1] - 1)
            self.entries[index] = counts
            rows = order.to(layer.keys.device)[:, None, :, None]  # [B, 1, n', 1]
            layer.keys = layer.keys.gather(2, rows.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(
                2, rows.expand(-1, layer.values.shape[1], -1, layer.values.shape[3])
            )

    # --- the Cache interface ---------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Padded-batch columns seen so far (T + steps), matching the caller's growing attention mask."""
        return self.columns + self.steps if self.entries[0] is not None else 0

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise RoutingError("cache.decode.unrouted", "a routed cache cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.prefill_lengths.shape[0], device=self.prefill_lengths.device)
        self._select(index.repeat_interleave(repeats))

    def _select(self, index: torch.Tensor) -> None:
        for layer, kind in zip(self.layers, self.kinds):
            if kind == "linear":  # [hosts.linear.cache]: the states follow their samples
                layer.reorder_cache(index)
                continue
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
            layer.values = layer.values.index_select(0, index.to(layer.values.device))
        index = index.to(self.prefill_lengths.device)
        self.prefill_lengths = self.prefill_lengths.index_select(0, index)
        self.entries = [e.index_select(0, index) for e in self.entries]
        self.positions = [p.index_select(0, index) for p in self.positions]
        if self.rotary is not None:
            self.rotary = self.rotary.select(index)

    # --- decode ----------------------------------------------------------------------------------
    def width(self, layer_idx: int) -> int:
        """n_l, the padded prefill entries of layer ``layer_idx``."""
        return int(self.positions[layer_idx].shape[1])

    def decode_positions(self, num_new: int) -> torch.Tensor:
        """[cache.decode.positions] Positions ``[B, q]`` of the next ``q`` tokens: T_b + steps + i."""
        new = torch.arange(num_new, device=self.prefill_lengths.device)
        return self.prefill_lengths[:, None] + self.steps + new[None, :]  # [B, q]

    def decode_mask(
        self, layer_idx: int, num_new: int, implementation: str, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """[cache.decode.unrouted] Mask ``[B, 1, q, C]`` of ``q`` new tokens over layer ``layer_idx``'s cache.

        Visible: the sample's valid prefill entries of this layer, every decoded token, and the new tokens
        causally. None where SDPA needs no mask at all (one new token, no padded entry).
        """
        entries, width = self.entries[layer_idx], self.width(layer_idx)
        if implementation == "sdpa" and num_new == 1 and bool((entries == width).all()):
            return None
        B, device = entries.shape[0], entries.device
        prefix = torch.arange(width, device=device)[None, :] < entries[:, None]  # [B, n_l]
        prefix = prefix[:, None, :].expand(B, num_new, width)  # [B, q, n_l]
        decoded = torch.ones(B, num_new, self.steps, dtype=torch.bool, device=device)  # [B, q, steps]
        new = torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril()  # [q, q]
        visible = torch.cat([prefix, decoded, new.expand(B, num_new, num_new)], dim=-1)[
            :, None
        ]  # [B, 1, q, C]
        if implementation == "sdpa":
            return visible
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)

    def advance(self, num_new: int) -> None:
        """Count ``num_new`` decoded tokens once every layer has stored them."""
        self.steps += num_new

    # --- views for tests and audits --------------------------------------------------------------
    def layer_lengths(self, layer_idx: int) -> torch.Tensor:
        """[budget.kv.entries] ``[B]`` long, entries of every sample in layer ``layer_idx`` (prefill + decoded)."""
        return self.entries[layer_idx] + self.steps

    def layer_kv(self, layer_idx: int, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, n, hd]`` of one sample in one layer, padding dropped, in cache order."""
        layer = self.layers[layer_idx]
        n, width = int(self.entries[layer_idx][sample]), self.width(layer_idx)
        keep = torch.cat([torch.arange(n), torch.arange(width, width + self.steps)]).to(layer.keys.device)
        return layer.keys[sample].index_select(1, keep), layer.values[sample].index_select(1, keep)

    def layer_state(self, layer_idx: int, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[hosts.linear.cache] Conv state ``[C, K]`` and recurrent state ``[H_v, d_k, d_v]`` of one sample in a
        linear-attention layer."""
        if self.kinds[layer_idx] != "linear":
            raise RoutingError(
                "hosts.linear.cache", f"layer {layer_idx} is a softmax layer: it holds K/V, not states"
            )
        layer = self.layers[layer_idx]
        return layer.conv_states[0][sample], layer.recurrent_states[0][sample]

    def sample_cache(self, sample: int) -> SampleCache:
        """One sample's cache in the reference's form (a batch-1 ``DynamicCache``), for comparisons."""
        cache, positions = new_cache(self.kinds), []
        for layer_idx in range(len(self.layers)):
            n = int(self.entries[layer_idx][sample])
            if self.kinds[layer_idx] == "linear":
                conv, state = self.layer_state(layer_idx, sample)
                cache.update_conv_state(conv[None], layer_idx)  # [1, C, K]
                cache.update_recurrent_state(state[None], layer_idx)
                positions.append(self.positions[layer_idx][sample, :n].cpu())
                continue
            keys, values = self.layer_kv(layer_idx, sample)
            cache.update(keys[None], values[None], layer_idx)  # [1, H_kv, n, hd] each
            positions.append(self.positions[layer_idx][sample, :n].cpu())
        rotary = None if self.rotary is None else self.rotary.select(torch.tensor([sample]))
        return SampleCache(cache, positions, int(self.prefill_lengths[sample]), rotary)


def _layer(kind: str):
    """An empty cache layer of ``kind``: K/V entries (softmax) or conv/recurrent states (linear)."""
    if kind == "linear":
        from transformers.cache_utils import LinearAttentionLayer

        return LinearAttentionLayer()
    return DynamicLayer()
