"""Decode benchmark for ``rerouting bench``: tokens/s of routed decode from a ``RoutedCache`` vs dense decode.

Both decode the same greedy continuation length from the same prompt: ``dense`` is the host's own forward
with its own ``DynamicCache`` (every layer holds all T prompt entries), ``reroute`` is
``optimized.decode_step`` from the routed prefill's ``RoutedCache`` (layer l holds text + that layer's active
visual tokens, [cache.contents]; decode itself is unrouted, [cache.decode.unrouted]). The prefill is built
once per method and each timed run decodes from a fresh copy of its cache, so only decode is timed.

The bound is the KV ratio, dense entries / routed entries summed over layers and samples
([budget.kv.entries]): the most a decode step can gain when reading the cache is all it does. Weight reads
(the projections and MLP of one token per sample) do not shrink, so at small batch and short prompts the
measured speed-up sits well under the bound; it approaches it as batch x prompt length grows.

Notation: B batch, T prompt length, S decoded steps, L layers, k kept visual tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from rerouting.reference import RoutingConfig
from rerouting.reference.compat import layer_cache_argument, output_cache

from .bench_timing import timed
from .decode import decode_step
from .routing import routed_prefill


def _dense_state(model: nn.Module, batch: dict) -> dict:
    """The dense prefill: its cache, next tokens ``[B, 1]``, mask ``[B, T]`` and next positions ``[B, 1]``."""
    with torch.no_grad():
        out = model(**batch, use_cache=True, logits_to_keep=1)
    mask = batch["attention_mask"]
    positions = mask.long().sum(-1, keepdim=True)  # [B, 1]: T_b, the first decoded position
    deltas = getattr(getattr(model, "model", None), "rope_deltas", None)  # an mRoPE host's δ_b, [B, 1]
    if deltas is not None:  # [cache.decode.positions] ids T_b + δ_b + step on all three axes: [3, B, 1]
        positions = (positions + deltas.to(positions)).unsqueeze(0).expand(3, -1, -1)
    return {"cache": output_cache(out), "token": out.logits[:, -1].argmax(-1, keepdim=True), "mask": mask,
            "positions": positions}  # fmt: skip


def dense_decode(model: nn.Module, steps: int) -> Callable[[dict], torch.Tensor]:
    """Decode ``steps`` greedy tokens with the host's own forward and cache; returns the tokens ``[B, S]``."""
    name = layer_cache_argument(type(model))  # `cache` from transformers 5.24 on, `past_key_values` before

    def run(state: dict) -> torch.Tensor:
        token, mask, cache, positions, out = (
            state["token"],
            state["mask"],
            state["cache"],
            state["positions"],
            [],
        )
        with torch.no_grad():
            for step in range(steps):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)  # [B, T + step + 1]
                logits = model(
                    input_ids=token, attention_mask=mask, position_ids=positions + step, use_cache=True,
                    **{name: cache},
                ).logits  # fmt: skip
                token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
                out.append(token)
        return torch.cat(out, dim=-1)

    return run


def routed_decode(model: nn.Module, steps: int) -> Callable[[dict], torch.Tensor]:
    """Decode ``steps`` greedy tokens from the ``RoutedCache``; returns the tokens ``[B, S]``."""

    def run(state: dict) -> torch.Tensor:
        token, cache, out = state["token"], state["cache"], []
        for _ in range(steps):
            token = decode_step(model, cache, token)[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            out.append(token)
        return torch.cat(out, dim=-1)

    return run


def kv_entries(cache, num_layers: int) -> int:
    """[budget.kv.entries] Valid cache entries summed over layers and samples (dense: a ``DynamicCache``)."""
    if hasattr(cache, "layer_lengths"):  # RoutedCache: per-layer, per-sample lengths
        return sum(int(cache.layer_lengths(layer).sum()) for layer in range(num_layers))
    raise TypeError(type(cache).__name__)


def decode_row(
    model: nn.Module,
    config: RoutingConfig,
    batch: dict,
    steps: int,
    timing: dict,
    dense_batch: dict | None = None,
) -> dict:
    """One (batch, k) row: tokens/s of both methods, their ratio and the KV bound.

    ``dense_batch``: the host's own forward's inputs when they differ from ``batch`` (Qwen's ``mm_token_type_ids``).
    """
    dense = _dense_state(model, batch if dense_batch is None else dense_batch)
    result = routed_prefill(model, config, **batch, logits_to_keep=1)
    routed = {"cache": result.cache, "token": result.logits[:, -1].argmax(-1, keepdim=True)}
    fns = {"dense": dense_decode(model, steps), "reroute": routed_decode(model, steps)}
    setups = {"dense": lambda: copy.deepcopy(dense), "reroute": lambda: copy.deepcopy(routed)}
    times = timed(fns, setups=setups, **timing)
    B, T = batch["input_ids"].shape
    num_layers = len(result.cache.layers)
    dense_entries = int(batch["attention_mask"].sum()) * num_layers
    routed_entries = kv_entries(result.cache, num_layers)
    per_s = {name: B * steps / times[name]["median_s"] for name in fns}
    return {
        "batch": B,
        "k": config.schedule.keep[-1],
        "prompt_length": T,
        "steps": steps,
        "times": times,
        "tokens_per_s": per_s,
        "kv_entries": {"dense": dense_entries, "reroute": routed_entries},
        "ratios": {
            "reroute_over_dense_tokens_per_s": per_s["reroute"] / per_s["dense"],
            "kv_bound": dense_entries / routed_entries,
        },
    }


def decode_table(rows: list[dict]) -> str:
    """A plain-text table of the decode rows."""
    lines = [
        f"{'B':>2} {'k':>4} {'T':>5} {'S':>3} {'dense tok/s':>11} {'reroute tok/s':>13} {'ratio':>6} {'KV bound':>8}"
    ]
    for row in rows:
        per_s, r = row["tokens_per_s"], row["ratios"]
        lines.append(
            f"{row['batch']:>2} {row['k']:>4} {row['prompt_length']:>5} {row['steps']:>3} {per_s['dense']:11.1f} "
            f"{per_s['reroute']:13.1f} {r['reroute_over_dense_tokens_per_s']:6.2f} {r['kv_bound']:8.2f}"
        )
    return "\n".join(lines)
