"""The reference routed prefill: one sample at a time, literally as spec/routing.md says.

At each decision layer the probe scores every visual token, the pool is formed and the top-k is
selected; then every layer runs the host's own decoder layer on the gathered active set (explicit
causal mask over it, original positions) and scatters the result back. Deferred rows are never
touched. Slow on purpose: the full-length hidden state is copied at every layer.

Notation: B batch, T padded length, T_b a sample's valid length, D hidden, V vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import DynamicCache

from .cache_policy import check_cache_policy, check_recompute, generated_mask, retained, retroactive_cut
from .compat import call_layer, new_cache
from .hooks import VisionInputs, reducer_for
from .host import (
    Host,
    RotaryIds,
    SampleLayout,
    attention_implementation,
    bind_ids,
    causal_mask,
    host_for,
)
from .hybrid import check_host_config, embed_inputs, inject, layer_visual, run_linear_block
from .schedule import RoutingConfig, RoutingError
from .scoring import DecisionContext, probe_size, query_rows, reference_layer, runs_probe, scoring_method
from .selection import ForcedSelection, candidate_pool, capped_k, check_forced, forced_choice, select_topk
from .trace import Decision, SampleTrace, Trace
from .twig import Twig, check_twig


@dataclass
class SampleCache:
    """[cache.contents] One sample's KV cache after prefill.

    Attributes:
        cache: a ``transformers.DynamicCache`` of batch 1 whose layers have different lengths.
        positions: per layer, ``[n_l]`` original positions of the entries, in cache order.
        length: T_b, the prefill length; decode positions continue from here ([cache.decode.positions]).
        rotary: the sample's position-id table for an mRoPE host ([layout.rotary-ids]); None for 1-D RoPE.
    """

    cache: DynamicCache
    positions: list[torch.Tensor]
    length: int
    rotary: RotaryIds | None = None

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer``: ``[H_kv, n_l, hd]`` each."""
        entry = self.cache.layers[layer]
        return entry.keys[0], entry.values[0]


@dataclass
class PrefillResult:
    """Output of a routed prefill.

    Attributes:
        logits: ``[B, T, V]`` in the compute dtype; rows of padding are zero ([routing.output]).
        hidden: ``[B, T, D]`` last hidden state before the final norm; padding rows zero.
        caches: one ``SampleCache`` per sample.
        trace: the routing record.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    caches: list[SampleCache]
    trace: Trace


def run_block(
    host: Host,
    layer: nn.Module,
    hidden: torch.Tensor,
    active: Sequence[int],
    cache: DynamicCache,
    generated: tuple[int, frozenset[int]] | None = None,
) -> torch.Tensor:
    """[routing.active-set] [routing.active.causal] [routing.active.positions] [routing.bypass] One layer.

    Gathers the active rows of ``hidden`` (``[T_b, D]``), runs the host's layer on them with an explicit
    causal mask over the active set at their original positions, writes their K/V to ``cache``, and
    returns a new ``[T_b, D]`` tensor in which every other row is bit-identical to the input.
    ``generated`` ``(T, hidden)``: rows at positions ``>= T`` are generated tokens that see no key in ``hidden``
    (the recompute of [cache.policy.retroactive]).
    """
    idx = torch.tensor(active)
    x = hidden[idx][None]  # [1, n, D]
    positions = idx[None]  # [1, n]: the position of a valid token is its index
    cos, sin = host.rotary_embeddings(x, positions)
    mask = causal_mask(idx, idx, x.dtype)
    if generated is not None:
        mask = torch.maximum(
            mask + generated_mask(idx, idx, generated[0], generated[1], x.dtype),
            mask.new_tensor(torch.finfo(x.dtype).min),
        )
    out = call_layer(
        layer,
        x,
        attention_mask=mask,
        position_ids=positions,
        position_embeddings=(cos, sin),
        cache=cache,
    )
    result = hidden.clone()
    result[idx] = out[0]
    return result


KERNELS = ("eager", "sdpa")  # the host attention kernels the reference can run its layers under


class Reference:
    """The executable spec for one model and one routing configuration.

    Computes in ``config.compute_dtype`` (float32 or float64) with eager attention, scores in the same
    dtype; when the model is in another dtype a converted deep copy is used, so the caller's model is never
    modified.

    **Yardstick modes** (flash-attention's ``upcast=False`` / ``reorder_ops`` idea): the keyword switches
    run the same obvious code with another rounding, so that a conformance oracle can measure the error a
    plain implementation in that arithmetic makes. They are not the spec's computation; ``yardstick`` says
    whether one is on.

    Args:
        compute_dtype: activations and weights; any floating dtype (bfloat16, float16 only as a yardstick).
            Default: ``config.compute_dtype``.
        score_dtype: the probe's logits and softmax, float32 or float64 ([scoring.probe.softmax]).
            Default: float32 below float32, else ``compute_dtype``.
        attention: the host kernel the decoder layers run under, ``"eager"`` (default) or ``"sdpa"``;
            the masks are explicit either way, so only the rounding order differs.
        reducer: the vision-side reducer applied before the decoder ([layout.vision-reducer]); default (None):
            ``config.reducer``. A name other than the configuration's is an error.
        twig: the twig of a ``kind="twig"`` scorer ([twig.ttp.score]), converted like the model.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RoutingConfig,
        *,
        compute_dtype: torch.dtype | None = None,
        score_dtype: torch.dtype | None = None,
        attention: str = "eager",
        reducer: str | None = None,
        twig: Twig | None = None,
    ):
        compute_dtype = config.compute_dtype if compute_dtype is None else compute_dtype
        if not compute_dtype.is_floating_point:
            raise RoutingError("routing.errors", f"compute_dtype {compute_dtype} is not a floating dtype")
        if score_dtype is None:
            score_dtype = compute_dtype if compute_dtype in (torch.float32, torch.float64) else torch.float32
        if score_dtype not in (torch.float32, torch.float64):
            raise RoutingError(
                "scoring.probe.softmax", f"score_dtype {score_dtype} is not float32 or float64"
            )
        if attention not in KERNELS:
            raise RoutingError("routing.errors", f"attention {attention!r} is not one of {list(KERNELS)}")
        self.host = host_for(model)
        if self.host.dtype != compute_dtype:
            model = copy.deepcopy(model).to(compute_dtype)
            self.host = host_for(model)
        config.schedule.check_layers(self.host.num_layers)
        check_cache_policy(config.cache, self.host.layer_kinds)
        check_twig(config, twig, self.host)  # [twig.ttp.score]
        if twig is not None:  # converted like the model, and reading the (possibly copied) model's config
            twig = copy.deepcopy(twig).to(compute_dtype).bind(model)
        self.twig = twig
        check_host_config(self.host, config)  # [hosts.linear.decisions] [hosts.deepstack]
        self.scoring = scoring_method(config.scorer.kind)
        if reducer is not None and reducer != config.reducer:
            if config.reducer != "identity" or config.reducer_params is not None:
                raise RoutingError(
                    "layout.vision-reducer",
                    f"reducer {reducer!r} given, but the configuration names {config.reducer!r}",
                )
            config = replace(config, reducer=reducer)
        if config.reducer != "identity" and getattr(self.host, "deepstack_levels", 0):
            raise RoutingError(
                "hosts.deepstack",
                f"vision reducer {config.reducer!r} with a DeepStack host: its levels would not be reduced",
            )
        self.reducer = reducer_for(config)
        self.model = model
        self.config = config
        self.compute_dtype, self.score_dtype, self.attention = compute_dtype, score_dtype, attention
        self.yardstick = (compute_dtype, score_dtype, attention) != (
            config.compute_dtype,
            config.compute_dtype,
            "eager",
        )

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        forced_selection: ForcedSelection | None = None,
        image_grid_thw: torch.Tensor | None = None,
        generated_from: int | None = None,
    ) -> PrefillResult:
        """Routed prefill of a batch, one sample at a time ([layout.batch-independence]).

        ``image_grid_thw``: the images' grids, for a host whose images have one (Qwen2.5-VL).
        ``generated_from``: the recompute of decoding under ``cache="retroactive"`` ([cache.policy.retroactive]):
        positions from here on are generated tokens, which see no visual token outside the forced final selection.
        """
        check_recompute(generated_from, self.config.cache, forced_selection)
        self._generated_from = generated_from
        host, dtype = self.host, self.compute_dtype
        if pixel_values is not None:
            pixel_values = pixel_values.to(dtype)
        grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
        with torch.no_grad(), attention_implementation(self.model, self.attention):
            encode = getattr(self.reducer, "encode", None)  # a reducer that reads the vision tower
            outputs = None if encode is None else encode(host, pixel_values)
            levels: tuple = ()
            if outputs is None:
                embeds, levels = embed_inputs(host, input_ids, pixel_values, **grid)  # [B, T, D]; DeepStack
            else:
                embeds = host.embed(input_ids, None, outputs.pooler_output, **grid)
            layouts = host.layouts(input_ids, attention_mask, **grid)
            routed = [bool(layout.visual) for layout in layouts]
            check_forced(forced_selection, len(layouts), self.config.schedule.num_decisions, routed)
            vision = None if encode is None else VisionInputs(host, outputs, self.config.reducer_params)
            embeds, layouts = self.reducer(embeds, layouts, vision)  # [layout.vision-reducer]
            B, T = input_ids.shape
            logits = torch.zeros(B, T, host.lm_head.out_features, dtype=dtype)
            hidden_out = torch.zeros(B, T, embeds.shape[-1], dtype=dtype)
            caches, samples = [], []
            for b, layout in enumerate(layouts):
                forced = None if forced_selection is None else forced_selection[b]
                injected = tuple(level[b, layout.valid] for level in levels)  # [hosts.deepstack]
                hidden, cache, sample = self._route_sample(embeds[b, layout.valid], layout, forced, injected)
                hidden_out[b, layout.valid] = hidden
                logits[b, layout.valid] = host.logits(hidden)
                caches.append(cache)
                samples.append(sample)
        trace = Trace(policy=self.config.policy, num_layers=host.num_layers, samples=tuple(samples))
        return PrefillResult(logits=logits, hidden=hidden_out, caches=caches, trace=trace)

    def _route_sample(
        self,
        hidden: torch.Tensor,
        layout: SampleLayout,
        forced: Sequence[Sequence[int]] | None,
        injected: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, SampleCache, SampleTrace]:
        """Route one sample: ``hidden`` is ``[T_b, D]``, its merged input embeddings; ``injected[j]`` ``[T_b, D]``
        the DeepStack level added to the visual rows after layer ``j`` ([hosts.deepstack])."""
        config, schedule = self.config, self.config.schedule
        text, visual, N = layout.text, layout.visual, len(layout.visual)
        rotary = RotaryIds.from_layouts([layout])
        host = bind_ids(
            self.host, rotary
        )  # [layout.rotary-ids]: positions in, the sample's ids to the rotary
        generator = torch.Generator().manual_seed(config.scorer.seed)
        cache, kv_positions = new_cache(self.host.layer_kinds), []
        decisions: list[Decision] = []
        active_visual: list[tuple[int, ...]] = []
        selected: tuple[int, ...] | None = None
        entering = tuple(range(N)) if layout.entering is None else layout.entering  # [nuwa.entering]
        previous_input = hidden
        ref_layer, self._reference_states = reference_layer(config.scorer), None
        generated = None
        if (
            self._generated_from is not None and N
        ):  # [cache.policy.retroactive]: the recompute's generated tokens
            final = set(forced[-1])
            generated = (self._generated_from, frozenset(v for i, v in enumerate(visual) if i not in final))
        for index, layer in enumerate(host.layers):
            if index == ref_layer:  # [clse.reference-layer]: the states entering it, every token fresh
                self._reference_states = hidden
            if N and index in schedule.layers:  # [layout.text-only]: no decision without visual tokens
                stage = schedule.layers.index(index)
                decision = self._decide(
                    host, stage, hidden, previous_input, layout, selected, forced, generator
                )
                decisions.append(decision)
                selected = decision.selected
            chosen = entering if selected is None else selected  # [schedule.dense-prefix]
            kind = self.host.layer_kinds[index]
            chosen = layer_visual(kind, config.policy, config.linear_attention, N, chosen)
            active = sorted(text + tuple(visual[i] for i in chosen))
            previous_input = hidden
            if kind == "linear":  # [hosts.linear.semantics]
                hidden = run_linear_block(layer, hidden, active, cache)
            else:
                extra = (
                    () if generated is None else (generated,)
                )  # the recompute ([cache.policy.retroactive])
                hidden = run_block(host, layer, hidden, active, cache, *extra)
            if index < len(injected):  # [hosts.deepstack]: inside the dense prefix (check_host_config)
                hidden = inject(hidden, visual, injected[index])
            active_visual.append(chosen)
            kv_positions.append(torch.tensor(active))
        keep = retained(text, visual, selected) if config.cache == "retroactive" else None
        if keep is not None:  # [cache.policy.retroactive]: every layer cut to text + the final selection
            cache, kv_positions = retroactive_cut(cache, kv_positions, keep)
        sample = SampleTrace(
            num_text=len(text),
            visual_positions=visual,
            decisions=tuple(decisions),
            active_visual=tuple(active_visual),
            entering=layout.entering,
        )
        return hidden, SampleCache(cache, kv_positions, layout.length, rotary), sample

    def _decide(
        self,
        host: Host,
        stage: int,
        hidden: torch.Tensor,
        previous_input: torch.Tensor,
        layout: SampleLayout,
        selected: tuple[int, ...] | None,
        forced: Sequence[Sequence[int]] | None,
        generator: torch.Generator,
    ) -> Decision:
        """[selection.pool] [selection.pool-cap] [scoring.probe.input] [scoring.scorer] One decision of one sample."""
        config, schedule = self.config, self.config.schedule
        layer_index = schedule.layers[stage]
        text, visual, N = layout.text, layout.visual, len(layout.visual)
        pool = candidate_pool(config.policy, N, selected, layout.entering)
        k = capped_k(schedule.keep_count(stage, N), pool)
        # The probe sequence: every token in the decoder for reroute (all valid ones unless a vision-side reducer
        # left some out, [nuwa.entering]); removed tokens no longer exist for remove.
        entered = range(N) if layout.entering is None else layout.entering
        length = len(text) + len(entered)  # = T_b without a reducer
        keys = (
            sorted(text + tuple(visual[i] for i in pool))
            if config.policy == "remove"
            else sorted(text + tuple(visual[i] for i in entered))
        )
        if k == 0:  # [schedule.keep-zero]: the final wipe runs no scorer and selects nothing
            return Decision(
                layer=layer_index,
                stage=stage,
                pool=pool,
                scores=torch.zeros(N, dtype=self.score_dtype),
                k=0,
                selected=(),
                probe_keys=0,
                probe_queries=0,
            )
        probing = runs_probe(self.scoring, config.scorer)
        queries = query_rows(text, visual, config.scorer.query) if probing else ()
        context = DecisionContext(
            host=host,
            layer=layer_index,
            states=hidden,
            previous_states=previous_input,
            keys=tuple(keys),
            queries=queries,
            visual=visual,
            generator=generator,
            score_dtype=self.score_dtype,
            scorer=config.scorer,
            twig=self.twig,
            stage=stage,
            reference_states=self._reference_states,
            images=layout.images,
        )
        scores = self.scoring(context)  # [scoring.scorer]: through the registry
        chosen = (
            select_topk(scores, pool, k)
            if forced is None
            else forced_choice(forced[stage], pool, k, layer_index)
        )
        probe_keys, probe_queries = probe_size(config.policy, len(text), len(pool), length, len(queries))
        return Decision(
            layer=layer_index,
            stage=stage,
            pool=pool,
            scores=scores,
            k=k,
            selected=chosen,
            probe_keys=probe_keys,  # the random scorer runs no probe: 0
            probe_queries=probe_queries,
        )
