"""An outside implementation of visual-token routing, written from spec/ and the public contract only.

Minimal, slow and per sample: every sample of the batch is routed on its own, every decoder layer is the
host's own ``transformers`` module called on the sample's active tokens, and the probe is recomputed from
the decision layer's own norm and projections. It imports nothing of ``rerouting`` but the contract
(``rerouting.conformance.protocol``), so it is what an implementer starts from::

    rerouting conform --impl outside_impl:OutsideRouter      # with docs/examples on PYTHONPATH

Each step names the rule it implements (spec/*.md); docs/conformance.md walks through it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration

from rerouting.conformance.protocol import (
    SUPPORTED_ATTENTION,
    Decision,
    DecodeOutput,
    LayerKV,
    PrefillOutput,
    SampleTrace,
    Trace,
)


def _error(rule: str, message: str) -> ValueError:
    """[routing.errors.ids] Any exception type will do; the message names the value and the rule."""
    return ValueError(f"{message} [rule {rule}]")


@dataclass
class _Sample:
    """One sample's layout (positions are ranks among its valid tokens) and its live cache."""

    text: tuple[int, ...]
    visual: tuple[int, ...]
    length: int  # T_b
    cache: DynamicCache = field(default_factory=DynamicCache)
    positions: list[torch.Tensor] = field(default_factory=list)  # per layer, the entries' positions


class OutsideRouter:
    """The ``Implementation`` protocol, per sample, on a ``LlavaForConditionalGeneration``."""

    name = "outside-example"
    hosts = ("LlavaForConditionalGeneration",)  # the suite skips its Qwen2.5-VL checks, saying so
    reducers = ("identity",)  # no Nüwa stage 1: the suite skips conformance/test_nuwa.py, saying so
    scorers = ("attention", "random")  # no CLSE scorer: its checks are skipped, saying so
    cache_policies = ("per-layer",)  # no retroactive cache policy: likewise

    # ---- prefill ---------------------------------------------------------------------------
    def prefill(self, model, config, input_ids, attention_mask, pixel_values, *, forced_selection=None):
        parts = _host_parts(model, config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)  # [layout.sequence]
        B, T = input_ids.shape
        if forced_selection is not None and len(forced_selection) != B:
            raise _error(
                "selection.forced", f"forced_selection has {len(forced_selection)} samples, the batch {B}"
            )
        with torch.no_grad():
            embeds = _embed(model, input_ids, pixel_values)  # [B, T, D]
            logits = torch.zeros(B, T, model.lm_head.out_features, dtype=embeds.dtype, device=embeds.device)
            samples, kv, traces = [], [], []
            for b in range(B):
                valid = attention_mask[b].nonzero().flatten()  # [T_b] slots of the valid tokens
                is_visual = (input_ids[b, valid] == model.config.image_token_id).tolist()
                sample = _Sample(
                    text=tuple(p for p, v in enumerate(is_visual) if not v),
                    visual=tuple(p for p, v in enumerate(is_visual) if v),
                    length=len(is_visual),
                )
                forced = None if forced_selection is None else forced_selection[b]
                hidden, trace = self._route(parts, config, sample, embeds[b, valid], forced)
                logits[b, valid] = model.lm_head(parts.norm(hidden))  # [routing.output]
                samples.append(sample)
                traces.append(trace)
                kv.append(_snapshot(sample))
        trace = Trace(policy=config.policy, num_layers=len(parts.layers), samples=tuple(traces))
        return PrefillOutput(logits=logits, kv=kv, trace=trace, state=samples)

    def _route(self, parts, config, sample, hidden, forced):
        """[routing.active-set] [routing.bypass] [schedule.stages] One sample through every layer."""
        schedule, N = config.schedule, len(sample.visual)
        if forced is not None and N and len(forced) != len(schedule.layers):
            raise _error(
                "selection.forced", f"{len(forced)} forced selections for {len(schedule.layers)} decisions"
            )
        generator = torch.Generator().manual_seed(config.scorer.seed)  # [scoring.scorer.random]
        selected, previous_input = None, hidden
        decisions, active_visual = [], []
        for index, layer in enumerate(parts.layers):
            if N and index in schedule.layers:  # [layout.text-only]: no decision without visual tokens
                stage = schedule.layers.index(index)
                decision = _decide(parts, config, sample, stage, hidden, previous_input, selected, generator)
                if forced is not None:
                    decision = _force(decision, forced[stage])
                decisions.append(decision)
                selected = decision.selected
            chosen = tuple(range(N)) if selected is None else selected  # [schedule.dense-prefix]
            active = sorted(sample.text + tuple(sample.visual[i] for i in chosen))
            previous_input = hidden
            hidden = _run_layer(parts, layer, hidden, active, sample.cache)
            sample.positions.append(torch.tensor(active))
            active_visual.append(chosen)
        trace = SampleTrace(
            num_text=len(sample.text),
            visual_positions=sample.visual,
            decisions=tuple(decisions),
            active_visual=tuple(active_visual),
        )
        return hidden, trace

    # ---- decode ----------------------------------------------------------------------------
    def decode_step(self, model, config, prefill, tokens, step):
        """[cache.decode.unrouted] [cache.decode.positions] One token per sample against each layer's cache."""
        parts = _host_parts(model, config)
        out, kv = [], []
        with torch.no_grad():
            for b, sample in enumerate(prefill.state):
                h = model.get_input_embeddings()(tokens[b].view(1, 1))  # [1, 1, D]
                position = torch.tensor([[sample.length + step]], device=h.device)
                cos_sin = parts.rotary(h, position)
                for index, layer in enumerate(parts.layers):
                    n = sample.cache.layers[index].keys.shape[-2]
                    mask = torch.zeros(
                        1, 1, 1, n + 1, dtype=h.dtype, device=h.device
                    )  # sees its whole layer cache
                    h = _call(parts, layer, h, mask, position, cos_sin, sample.cache)
                    sample.positions[index] = torch.cat([sample.positions[index], position[0].cpu()])
                out.append(model.lm_head(parts.norm(h))[0, -1])
                kv.append(_snapshot(sample))
        return DecodeOutput(logits=torch.stack(out), kv=kv)


# ---- the host ------------------------------------------------------------------------------


@dataclass
class _Parts:
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary: torch.nn.Module
    cache_argument: str
    score_dtype: torch.dtype


def _host_parts(model, config) -> _Parts:
    """[routing.errors] [routing.kernels] [schedule.decision-layers] What routing drives, or an error."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise _error("routing.errors", f"model class {type(model).__name__} is not supported (LLaVA only)")
    kernel = model.config.get_text_config()._attn_implementation
    if kernel not in SUPPORTED_ATTENTION:
        raise _error(
            "routing.errors", f"attention implementation {kernel!r} is not one of {SUPPORTED_ATTENTION}"
        )
    text = model.model.language_model
    bad = [d for d in config.schedule.layers if d >= len(text.layers)]
    if bad:
        raise _error(
            "schedule.decision-layers", f"decision layers {bad} in a decoder of {len(text.layers)} layers"
        )
    parameters = inspect.signature(type(text.layers[0]).forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.24
    score_dtype = torch.float64 if model.dtype == torch.float64 else torch.float32  # [scoring.probe.dtype]
    return _Parts(text.layers, text.norm, text.rotary_emb, cache_argument, score_dtype)


def _embed(model, input_ids, pixel_values):
    """[layout.visual-set] [layout.pixel-values] Token embeddings with the batch's image features scattered in."""
    embeds = model.get_input_embeddings()(input_ids)
    placeholders = input_ids == model.config.image_token_id
    count = int(placeholders.sum())
    if pixel_values is None:
        if count:
            raise _error("layout.visual-set", f"{count} image placeholder tokens but no pixel_values")
        return embeds
    pixels = pixel_values.to(model.dtype)
    features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)  # [features, D], the batch's images in order
    if features.shape[0] != count:
        raise _error(
            "layout.visual-set", f"{count} image placeholder tokens but {features.shape[0]} image features"
        )
    return embeds.masked_scatter(placeholders.unsqueeze(-1), features)


def _causal_mask(positions: torch.Tensor, dtype, device) -> torch.Tensor:
    """[routing.active.causal] An explicit additive mask over the given ORIGINAL positions."""
    visible = positions[None, :] <= positions[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def _call(parts, layer, x, mask, position_ids, cos_sin, cache):
    kwargs = {parts.cache_argument: cache}
    return layer(
        x,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        position_embeddings=cos_sin,
        **kwargs,
    )


def _run_layer(parts, layer, hidden, active, cache):
    """[routing.active.positions] [routing.bypass] The host's layer on the active rows; every other row unchanged."""
    idx = torch.tensor(active, device=hidden.device)
    x = hidden[idx][None]  # [1, n, D]
    positions = idx[None]  # the position of a valid token is its rank: no renumbering
    out = _call(
        parts,
        layer,
        x,
        _causal_mask(idx.cpu(), x.dtype, x.device),
        positions,
        parts.rotary(x, positions),
        cache,
    )
    result = hidden.clone()
    result[idx] = out[0]
    return result


def _snapshot(sample: _Sample) -> list[LayerKV]:
    """[cache.snapshot] Copies: what the prefill (or a step) reports never changes afterwards."""
    return [
        LayerKV(entry.keys[0].clone(), entry.values[0].clone(), sample.positions[layer].clone())
        for layer, entry in enumerate(sample.cache.layers)
    ]


# ---- decisions -----------------------------------------------------------------------------


def _decide(parts, config, sample, stage, hidden, previous_input, selected, generator) -> Decision:
    """[selection.pool] [selection.pool-cap] [selection.topk] [selection.tiebreak] [selection.order]"""
    schedule, N = config.schedule, len(sample.visual)
    layer_index = schedule.layers[stage]
    pool = tuple(range(N)) if config.policy == "reroute" or selected is None else selected
    target = schedule.keep[stage]
    if schedule.unit == "count" and target > N:
        raise _error("schedule.keep-count", f"keep count {target} at layer {layer_index} exceeds N={N}")
    k = min(int(target) if schedule.unit == "count" else max(1, math.floor(N * target)), len(pool))
    if k == 0:  # [schedule.keep-zero]: the final wipe selects nothing and runs no scorer
        return Decision(layer_index, stage, pool, torch.zeros(N), 0, (), 0, 0)
    if config.scorer.kind == "random":  # [scoring.scorer.random]: no probe
        scores = torch.rand(N, generator=generator, dtype=torch.float64).to(torch.float32)
        probe_keys = probe_queries = 0
    elif config.scorer.kind == "attention":
        keys = (
            range(sample.length)
            if config.policy == "reroute"
            else sorted(sample.text + tuple(sample.visual[i] for i in pool))
        )
        queries = _query_rows(config.scorer.query, sample)
        previous = config.scorer.probe_layer == "previous"  # [scoring.probe.variant-layer]
        layer = parts.layers[layer_index - 1 if previous else layer_index]
        states = previous_input if previous else hidden
        scores = _probe(parts, layer, states, tuple(keys), queries, sample.visual)
        probe_keys, probe_queries = len(keys), len(queries)
    else:
        raise _error("scoring.scorer", f"scorer kind {config.scorer.kind!r} is not implemented here")
    values = scores.tolist()
    chosen = tuple(sorted(sorted(pool, key=lambda i: (-values[i], i))[:k]))
    return Decision(layer_index, stage, pool, scores, k, chosen, probe_keys, probe_queries)


def _force(decision: Decision, forced) -> Decision:
    """[selection.forced] The forced tokens instead of the top-k: exactly k distinct tokens of the pool."""
    chosen = tuple(sorted(int(i) for i in forced))
    if len(set(chosen)) != decision.k or not set(chosen) <= set(decision.pool):
        raise _error(
            "selection.forced", f"forced {list(chosen)} is not {decision.k} distinct tokens of the pool"
        )
    return dataclasses.replace(decision, selected=chosen)


def _query_rows(variant: str, sample: _Sample) -> tuple[int, ...]:
    """[scoring.probe.query-row] [scoring.probe.variant-query]"""
    if not sample.text:
        raise _error("scoring.probe.query-row", "the sample has no text token for the probe's query row")
    if variant == "last":
        return (sample.text[-1],)
    after = tuple(p for p in sample.text if p > sample.visual[-1])
    if not after:
        raise _error("scoring.probe.variant-query", "no text token follows the last visual token")
    return after


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _probe(parts, layer, hidden, keys, queries, visual) -> torch.Tensor:
    """[scoring.probe.projection] [scoring.probe.softmax] [scoring.probe.head-mean] [scoring.probe.dtype]"""
    attn, dtype = layer.self_attn, parts.score_dtype
    key_pos = torch.tensor(keys, device=hidden.device)
    rows = [keys.index(p) for p in queries]
    x = layer.input_layernorm(hidden[key_pos])  # [n, D], the model's dtype
    cos, sin = (t[0, :, None, :] for t in parts.rotary(x[None], key_pos[None]))  # [n, 1, hd]
    k = attn.k_proj(x).view(len(keys), -1, attn.head_dim)  # [n, H_kv, hd]
    q = attn.q_proj(x[rows]).view(len(rows), -1, attn.head_dim)  # [q, H, hd]
    k = k * cos + _rotate_half(k) * sin
    q = q * cos[rows] + _rotate_half(q) * sin[rows]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # query head h reads kv head h // group
    logits = torch.einsum("qhd,nhd->hqn", q.to(dtype), k.to(dtype)) * attn.scaling  # [H, q, n]
    visible = key_pos[None, :] <= key_pos[rows][:, None]  # [q, n]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    per_key = probs.mean(dim=0).mean(dim=0).cpu()  # heads first, then query rows
    column = {p: j for j, p in enumerate(keys)}
    scores = torch.zeros(len(visual), dtype=dtype)
    for i, p in enumerate(visual):
        if p in column:  # a removed token is no key: it scores 0
            scores[i] = per_key[column[p]]
    return scores
