"""The optimized routed prefill: batched, packed, compact within a stage (spec/routing.md).

Every sample keeps its own decisions. The active tokens of all samples are packed with one index gather into
a compact, right-padded batch and run through the host's own decoder layers (their own attention, SDPA or
eager) with one mask per stage built from original positions. Inside a stage the compact batch goes from
layer to layer untouched by any gather or scatter; the deferred rows wait in the buffer and are never copied.
At a decision the compact rows are scattered into the buffer once (the probe input of reroute: every valid
token, deferred ones stale), the probe scores only the query row(s), and the next stage's rows are gathered.

Notation used for tensor shapes:
    B batch, T padded length, T_b valid length of sample b, Tv = max_b T_b, n compact length, D hidden,
    V vocabulary, N visual tokens (padded to the batch's largest N), q query rows, L decoder layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rerouting.reference import (
    Decision,
    Host,
    RotaryIds,
    RoutingConfig,
    RoutingError,
    SampleCache,
    SampleTrace,
    Trace,
    candidate_pool,
    capped_k,
)
from rerouting.reference.compat import call_layer
from rerouting.reference.hooks import VisionInputs, reducer_for
from rerouting.reference.host import bind_ids
from rerouting.reference.hybrid import embed_inputs, layer_visual
from rerouting.reference.scoring import (
    probe_size,
    query_rows,
    random_scores,
    reference_layer,
    runs_probe,
    scoring_method,
)
from rerouting.reference.selection import ForcedSelection, check_forced, forced_choice
from rerouting.reference.twig import check_twig

from .cache import RoutedCache
from .hybrid import HybridLayers
from .nuwa import reduce_batch
from .packing import (
    Packing,
    gather_rows,
    inverse,
    pack,
    scatter_rows_,
    stage_mask,
    valid_columns,
)
from .prefill_checks import FAST_SCORERS, check_attention_implementation, check_host, check_scorer  # noqa: F401
from .scoring import probe_scores
from .scoring_clse import clse_gates_batched
from .scoring_twig import twig_scores
from .selection import select_topk


@dataclass
class PrefillResult:
    """Output of an optimized routed prefill (the reference's ``PrefillResult`` fields, batched cache).

    Attributes:
        logits: ``[B, T, V]`` in the model's dtype, padding rows zero ([routing.output]); with
            ``logits_to_keep=k > 0`` only the last k columns ``[B, k, V]``.
        hidden: ``[B, T, D]`` last hidden state before the final norm; padding rows zero.
        cache: the batched ``RoutedCache`` (None when ``use_cache=False``).
        trace: the routing record, scores in float32 (float64 for a float64 model, [scoring.probe.dtype]).
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    cache: RoutedCache | None
    trace: Trace
    twig_cache: RoutedCache | None = None  # [twig.ssd.rollback]: the twig's group (slots K..K+T-1), TTP only

    @property
    def caches(self) -> list[SampleCache]:
        """Per-sample caches in the reference's form (copies; for comparisons)."""
        if self.cache is None:
            return []
        return [self.cache.sample_cache(b) for b in range(len(self.trace.samples))]


@dataclass
class _Sample:
    """One sample's routing state during a prefill (python-side bookkeeping)."""

    text: tuple[int, ...]
    visual: tuple[int, ...]
    length: int
    generator: torch.Generator
    selected: tuple[int, ...] | None = None
    entering: tuple[int, ...] | None = None  # [nuwa.entering]: None, every visual token
    images: tuple = ()  # ImageSpan per image, with its grid ([clse.grid])

    @property
    def entered(self) -> tuple[int, ...]:
        """The visual indices in the decoder: the reducer's entering set, or all."""
        return tuple(range(len(self.visual))) if self.entering is None else self.entering

    @property
    def routed(self) -> bool:
        return bool(self.visual)  # [layout.text-only]


class _Prefill(HybridLayers):
    """One routed prefill of one batch. State: the buffer, the current compact batch and its packing."""

    def __init__(self, host: Host, implementation: str, config: RoutingConfig, twig=None):
        self.host, self.implementation, self.config = host, implementation, config
        self.twig, self.twig_cache = twig, None

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | Sequence[torch.Tensor] | None,
        forced: ForcedSelection | None,
        use_cache: bool,
        logits_to_keep: int | torch.Tensor,
        host_inputs: dict[str, torch.Tensor],
        deepstack_features=None,
        vision_outputs=None,
    ) -> PrefillResult:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grid = {k: v for k, v in host_inputs.items() if k == "image_grid_thw"}
        reducer = reducer_for(self.config)  # [layout.vision-reducer]
        encode = getattr(reducer, "encode", None)
        levels: tuple = ()
        if encode is None:
            embeds, levels = embed_inputs(
                self.host,
                input_ids,
                pixel_values,
                image_features,
                deepstack_features=deepstack_features,
                **grid,
            )  # [B, T, D]; DeepStack levels [B, T, D] each ([hosts.deepstack])
        else:  # a reducer that reads the vision tower: its outputs, from generate or computed here
            if vision_outputs is None and image_features is not None:
                raise RoutingError(
                    "nuwa.images",
                    "the nuwa reducer needs the vision tower's hidden states, not projected features",
                )
            if vision_outputs is None:
                vision_outputs = encode(self.host, pixel_values)
            features = None if vision_outputs is None else vision_outputs.pooler_output
            embeds = self.host.embed(input_ids, None, features, **grid)
        layouts = self.host.layouts(input_ids, attention_mask, **host_inputs)
        if encode is not None:
            vision = VisionInputs(self.host, vision_outputs, self.config.reducer_params)
            embeds, layouts = reduce_batch(embeds, layouts, vision)  # [nuwa.entering]
        self._start_samples(layouts, input_ids, forced)
        cols = self._start_buffer(input_ids, attention_mask, embeds, use_cache)  # [B, Tv]
        self.levels = tuple(gather_rows(level, cols) for level in levels)  # [B, Tv, D]: buffer rows
        decisions, active_visual = self._run_layers(forced)
        if self.cache is not None and self.config.cache == "retroactive":
            self.cache.retroactive_cut(self._retained())  # [cache.policy.retroactive]
        self._sync()
        hidden, logits = self._outputs(cols, attention_mask, logits_to_keep)
        trace = self._trace(decisions, active_visual)
        return PrefillResult(
            logits=logits, hidden=hidden, cache=self.cache, trace=trace, twig_cache=self.twig_cache
        )

    # --- setup ---------------------------------------------------------------------------------------
    def _start_samples(self, layouts: list, input_ids: torch.Tensor, forced: ForcedSelection | None) -> None:
        """[layout.rotary-ids] Every sample's layout and seeded generator; the batch's position-id table bound."""
        self.rotary_ids = RotaryIds.from_layouts(layouts)  # None for 1-D RoPE
        self.host = bind_ids(self.host, self.rotary_ids)  # positions (ranks) in, ids only inside the rotary
        B = input_ids.shape[0]
        check_forced(forced, B, self.config.schedule.num_decisions, [bool(lay.visual) for lay in layouts])
        seed = self.config.scorer.seed
        self.samples = [
            _Sample(
                lay.text,
                lay.visual,
                lay.length,
                torch.Generator().manual_seed(seed),
                images=lay.images,
                entering=lay.entering,
            )
            for lay in layouts
        ]

    def _start_buffer(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor, use_cache: bool
    ) -> torch.Tensor:
        """The valid and text masks, visual rows, buffer, cache and dense stage; returns the valid columns."""
        host = self.host
        B, T = input_ids.shape
        cols, lengths = valid_columns(attention_mask)  # [B, Tv], [B]
        Tv, device = cols.shape[1], embeds.device
        self.Tv, self.device, self.lengths = Tv, device, lengths
        rows = torch.arange(Tv, device=device)
        self.valid = rows[None, :] < lengths[:, None]  # [B, Tv]
        is_visual = (input_ids.gather(1, cols) == host.image_token_id) & self.valid  # [B, Tv]
        self.is_text, self.is_visual = self.valid & ~is_visual, is_visual  # [B, Tv] each
        N = max((len(s.visual) for s in self.samples), default=0)
        self.visual_rows = torch.full((B, N), -1, dtype=torch.long)  # [B, N]: position of visual index i
        for b, s in enumerate(self.samples):
            if s.visual:
                self.visual_rows[b, : len(s.visual)] = torch.tensor(s.visual, dtype=torch.long)
        self.visual_rows = self.visual_rows.to(device)
        # The buffer: every valid token at row = position, then the trash row Tv.
        trash = embeds.new_zeros(B, 1, embeds.shape[-1])
        self.buffer = torch.cat([gather_rows(embeds, cols), trash], dim=1)  # [B, Tv + 1, D]
        entered = self.valid.clone()  # [nuwa.entering]: visual tokens a reducer kept out never enter
        self.reduced = any(s.entering is not None for s in self.samples)
        for b, s in enumerate(self.samples):
            if s.entering is not None:
                out = sorted(set(range(len(s.visual))) - set(s.entering))
                entered[b, [s.visual[i] for i in out]] = False
        self.dense = pack(entered)  # [schedule.dense-prefix]: every token in the decoder active
        self.cache = (
            RoutedCache(host.num_layers, lengths, T, self.rotary_ids, kinds=host.layer_kinds)
            if use_cache
            else None
        )
        if use_cache and self.twig is not None:  # [twig.ssd.rollback]: the twig's own cache group
            self.twig_cache = RoutedCache(
                self.twig.first_layer + self.twig.num_layers, lengths, T, self.rotary_ids
            )
        first = (
            gather_rows(self.buffer, self.dense.index) if self.reduced else self.buffer[:, :Tv]
        )  # [B, n, D]
        self._enter(self.dense, first, synced=True)
        self.dense_rotary = self.rotary  # reused by every reroute probe (same positions 0..Tv-1)
        return cols

    def _run_layers(
        self, forced: ForcedSelection | None
    ) -> tuple[list[list[Decision]], list[list[tuple[int, ...]]]]:
        """Every decoder layer, a decision before each decision layer: per sample, decisions and active sets."""
        config = self.config
        decisions: list[list[Decision]] = [[] for _ in self.samples]
        active_visual: list[list[tuple[int, ...]]] = [[] for _ in self.samples]
        early: torch.Tensor | None = None  # probe_layer="previous": scores computed before layer d-1
        routed = any(s.routed for s in self.samples)
        previous = (
            routed and config.scorer.kind in ("attention", "clse") and config.scorer.probe_layer == "previous"
        )
        ref_layer, self.reference_visual = reference_layer(config.scorer), None
        for index, layer in enumerate(self.host.layers):
            if routed and index == ref_layer:  # [clse.reference-layer]: dense prefix, compact row = position
                self.reference_visual = gather_rows(self.x, self.visual_rows.clamp(min=0))  # [B, N, D]
            if routed and index in config.schedule.layers:
                stage = config.schedule.layers.index(index)
                for b, decision in enumerate(self._decide(stage, early, forced)):
                    if decision is not None:
                        decisions[b].append(decision)
                early = None
            upcoming = index + 1 in config.schedule.layers
            wipe = upcoming and config.schedule.keep[config.schedule.layers.index(index + 1)] == 0
            if (
                previous and upcoming and not wipe
            ):  # [scoring.probe.variant-layer]; a k = 0 decision scores nothing
                early = self._probe(layer)
            kind = self.host.layer_kinds[index]
            for b, s in enumerate(self.samples):
                chosen = s.entered if s.selected is None else s.selected
                active_visual[b].append(
                    layer_visual(kind, config.policy, config.linear_attention, len(s.visual), chosen)
                )
            self._run_layer(index, layer)
            if index < len(self.levels):  # [hosts.deepstack]: the dense prefix (check_host)
                self._inject(index)
        return decisions, active_visual

    # --- stage state ---------------------------------------------------------------------------------
    def _enter(self, packing: Packing, x: torch.Tensor, *, synced: bool) -> None:
        """[routing.active.positions] [routing.active.causal] Start a stage: its rows, mask and rotary, once."""
        self.packing, self.x, self.synced = packing, x, synced
        self.mask = stage_mask(packing, self.implementation, x.dtype)  # [B, 1, n, n] or None
        positions = packing.index  # [B, n]: original positions (padding rows: Tv, never visible)
        self.rotary = self.host.rotary_embeddings(x, positions)  # cos, sin: [B, n, hd]

    def _sync(self) -> None:
        """Scatter the compact rows into the buffer (once per stage): the buffer then holds every token's state."""
        if not self.synced:
            scatter_rows_(self.buffer, self.packing.index, self.x)
            self.synced = True

    def _run_layer(self, index: int, layer: nn.Module) -> None:
        """[routing.active-set] [routing.bypass] The host's own layer on the compact batch; the buffer is not touched."""
        if self.host.layer_kinds[index] == "linear":
            return self._run_linear(index, layer)  # optimized/hybrid.py
        if self.cache is not None:
            self.cache.record(index, self.packing)
        self.x = call_layer(
            layer,
            self.x,
            attention_mask=self.mask,
            position_ids=self.packing.index,
            position_embeddings=self.rotary,
            cache=self.cache,
            is_causal=self.mask is None,  # stage_mask: None only where SDPA's is_causal is exact
        )  # [B, n, D]
        self.synced = False

    # --- decisions -----------------------------------------------------------------------------------
    def _probe(self, layer: nn.Module) -> torch.Tensor:
        """[scoring.probe.input] Probe scores ``[B, N]`` of ``layer`` on the tokens entering it now.

        reroute: every valid token (the buffer after one scatter; deferred rows stale). remove: text plus the
        pool, which is exactly the current compact batch (removed tokens no longer exist).
        """
        policy, variant = self.config.policy, self.config.scorer.query
        queries = [query_rows(s.text, s.visual, variant) if s.routed else (0,) for s in self.samples]
        q = max(len(r) for r in queries)
        query_pos = torch.zeros(len(queries), q, dtype=torch.long)  # [B, q]
        query_valid = torch.zeros(len(queries), q, dtype=torch.bool)  # [B, q]
        for b, r in enumerate(queries):
            query_pos[b, : len(r)] = torch.tensor(r)
            query_valid[b, : len(r)] = True
        query_pos, query_valid = query_pos.to(self.device), query_valid.to(self.device)
        if policy == "reroute" and not self.reduced:
            self._sync()
            states, packing = self.buffer[:, : self.Tv], self.dense  # [B, Tv, D]
            return probe_scores(
                self.host,
                layer,
                states,
                packing.index,
                packing.lengths,
                query_pos,
                query_valid,
                self.visual_rows,
                self.dense_rotary,
            )
        packing, x, rotary = self.packing, self.x, self.rotary
        if policy == "reroute":  # after a reducer: every token in the decoder, deferred ones stale
            self._sync()
            packing, rotary = self.dense, self.dense_rotary
            x = gather_rows(self.buffer, packing.index)  # [B, n, D]
        inv = inverse(packing.index, self.Tv + 1)  # [B, Tv + 1]: compact row of each position
        columns = inv.gather(1, self.visual_rows.clamp(min=0)).masked_fill(self.visual_rows < 0, -1)  # [B, N]
        # Text queries are always in the compact batch; padding entries may name a removed position, so
        # point them at row 0 (any valid row will do: they carry no weight).
        queries_rows = inv.gather(1, query_pos).masked_fill(~query_valid, 0)  # [B, q]
        return probe_scores(
            self.host,
            layer,
            x,
            packing.index,
            packing.lengths,
            queries_rows,
            query_valid,
            columns,
            rotary,  # the probe sequence's cos/sin: the current compact batch of remove
        )

    def _decide(
        self, stage: int, early: torch.Tensor | None, forced: ForcedSelection | None
    ) -> list[Decision | None]:
        """[selection.pool] [selection.pool-cap] [scoring.scorer] One decision for every routed sample, then the new stage."""
        config, schedule = self.config, self.config.schedule
        layer_index = schedule.layers[stage]
        scores = None
        probing = runs_probe(scoring_method(config.scorer.kind), config.scorer)
        wipe = schedule.keep[stage] == 0  # [schedule.keep-zero]: no scorer runs
        twig_here = config.scorer.kind == "twig" and layer_index == self.twig.first_layer
        if wipe:
            pass
        elif twig_here:  # [twig.ttp.score]
            scores = twig_scores(self).cpu()
        elif config.scorer.kind in ("attention", "twig", "clse") and probing:
            scores = early if early is not None else self._probe(self.host.layers[layer_index])
            scores = scores.cpu()  # [B, N] in the score dtype: float32, float64 in a float64 run
        if not wipe and config.scorer.clse is not None and config.scorer.clse.spectral_at(stage):
            scores = self._clse(scores)
        decisions: list[Decision | None] = []
        keep = self.is_text.clone()  # [B, Tv]: text is always active ([layout.text-set])
        for b, s in enumerate(self.samples):
            if not s.routed:
                decisions.append(None)
                continue
            N = len(s.visual)
            pool = candidate_pool(config.policy, N, s.selected, s.entering)
            k = capped_k(schedule.keep_count(stage, N), pool)
            if wipe:  # [schedule.keep-zero]: N zeros, no probe
                score_dtype = torch.float64 if self.host.dtype == torch.float64 else torch.float32
                queries, sample_scores = (), torch.zeros(N, dtype=score_dtype)
            elif scores is None:  # [scoring.scorer.random]: no probe runs
                queries, sample_scores = (), random_scores(s.generator, N)
            else:
                queries = query_rows(s.text, s.visual, config.scorer.query) if probing else ()
                sample_scores = scores[b, :N].clone()
            if forced is None:
                chosen = select_topk(sample_scores, pool, k)
            else:
                chosen = forced_choice(forced[b][stage], pool, k, layer_index)
            s.selected = chosen
            keep[b, [s.visual[i] for i in chosen]] = True
            length = len(s.text) + len(s.entered)  # = T_b without a reducer
            probe_keys, probe_queries = probe_size(
                config.policy, len(s.text), len(pool), length, len(queries)
            )
            decisions.append(
                Decision(
                    layer=layer_index,
                    stage=stage,
                    pool=pool,
                    scores=sample_scores,
                    k=k,
                    selected=chosen,
                    probe_keys=probe_keys,
                    probe_queries=probe_queries,
                )
            )
        self._sync()
        packing = pack(keep)  # [routing.active-set]
        self._enter(packing, gather_rows(self.buffer, packing.index), synced=True)  # [B, n, D]
        return decisions

    def _clse(self, attention: torch.Tensor | None) -> torch.Tensor:
        """[clse.scorer] [clse.variants] The CLSE gates ``[B, N]`` times the attention (``clse``: the gates alone)."""
        self._sync()  # the buffer holds every token's state entering the decision layer
        decision = gather_rows(self.buffer, self.visual_rows.clamp(min=0))  # [B, N, D]
        counts = [len(s.visual) if s.routed else 0 for s in self.samples]
        images = [s.images for s in self.samples]
        gates = clse_gates_batched(
            self.reference_visual, decision, images, counts, self.config.scorer.clse
        ).cpu()
        if attention is None:
            return gates.to(torch.float64 if decision.dtype == torch.float64 else torch.float32)
        return gates.to(attention.dtype) * attention

    def _retained(self) -> torch.Tensor:
        """[cache.policy.retroactive] ``[B, Tv + 1]`` bool: text and the final selection; all valid tokens if unrouted."""
        keep = torch.zeros(len(self.samples), self.Tv + 1, dtype=torch.bool, device=self.device)
        keep[:, : self.Tv] = self.is_text
        for b, s in enumerate(self.samples):
            chosen = range(len(s.visual)) if s.selected is None else s.selected
            keep[b, [s.visual[i] for i in chosen]] = True
        return keep

    # --- outputs -------------------------------------------------------------------------------------
    def _outputs(
        self, cols: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[routing.output] Hidden ``[B, T, D]`` and logits (padding rows zero) from the buffer's valid rows."""
        B, T = attention_mask.shape
        valid = self.buffer[:, : self.Tv].masked_fill(~self.valid[..., None], 0)  # [B, Tv, D]
        hidden = valid.new_zeros(B, T, valid.shape[-1])
        scatter_rows_(hidden, cols, valid)  # [B, T, D]: valid rows to their columns
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            logits_valid = self.host.logits(valid)  # [B, Tv, V]
            logits = scatter_rows_(logits_valid.new_zeros(B, T, logits_valid.shape[-1]), cols, logits_valid)
            logits.masked_fill_(~attention_mask.bool()[..., None], 0)
            return hidden, logits
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.host.logits(hidden[:, keep])  # [B, k, V]
        return hidden, logits.masked_fill(~attention_mask.bool()[:, keep, None], 0)

    def _trace(self, decisions: list[list[Decision]], active_visual: list[list[tuple[int, ...]]]) -> Trace:
        """The routing record of the batch: per sample its layout, decisions and active visual sets."""
        samples = tuple(
            SampleTrace(
                num_text=len(s.text),
                visual_positions=s.visual,
                decisions=tuple(decisions[b]),
                active_visual=tuple(active_visual[b]),
                entering=s.entering,
            )
            for b, s in enumerate(self.samples)
        )
        return Trace(policy=self.config.policy, num_layers=self.host.num_layers, samples=samples)


def routed_prefill(
    model: nn.Module,
    config: RoutingConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    forced_selection: ForcedSelection | None = None,
    use_cache: bool = True,
    logits_to_keep: int | torch.Tensor = 0,
    image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    image_grid_thw: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    vision_outputs=None,
    twig=None,
    deepstack_features=None,
) -> PrefillResult:
    """[layout.batch-independence] Routed prefill of a batch, every sample routed on its own.

    Runs in the model's own dtype and device; scores are float32 (float64 for a float64 model). ``config.compute_dtype`` is the reference's
    switch and is ignored here.

    Args:
        input_ids: ``[B, T]`` long.
        attention_mask: ``[B, T]``, 1 for valid tokens (any padding side); None = all valid.
        pixel_values: the images of the batch in order, as the host's vision tower takes them.
        forced_selection: ``forced_selection[b][s]``, the visual indices sample b selects at decision s
            (conformance forces decisions with it); must be k distinct tokens of the pool.
        use_cache: build the per-layer ``RoutedCache`` for decoding.
        logits_to_keep: 0 for every column, k > 0 for the last k columns only (as the host's ``forward``).
        image_features: instead of ``pixel_values``, the per-image features ``[n_i, D]`` already computed by the
            host's ``get_image_features`` (``generate`` passes them as ``mm_encoder_outputs``).
        image_grid_thw: ``[I, 3]`` the images' grids, for a host whose images have one (Qwen2.5-VL).
        position_ids: ``[3, B, T]`` an mRoPE host's position ids when the caller has them (``generate``);
            otherwise the host computes them ([layout.rotary-ids]).
        vision_outputs: for a reducer that reads the vision tower (``nuwa``), its outputs with every hidden
            state when the caller has them (``generate``, through ``route``); otherwise computed from the pixels.
        twig: the twig of a ``kind="twig"`` scorer ([twig.ttp.score]); its cache group is ``twig_cache``.
        deepstack_features: with ``image_features`` on a DeepStack host (Qwen3-VL), per level the per-image
            features ``generate`` computed with them ([hosts.deepstack]).
    """
    host_inputs = {
        name: value
        for name, value in (("image_grid_thw", image_grid_thw), ("position_ids", position_ids))
        if value is not None
    }
    host, implementation = check_host(model, config)
    check_twig(config, twig, host)  # [twig.ttp.score]
    try:
        with torch.no_grad():
            return _Prefill(host, implementation, config, twig).run(
                input_ids,
                attention_mask,
                pixel_values,
                image_features,
                forced_selection,
                use_cache,
                logits_to_keep,
                host_inputs,
                deepstack_features,
                vision_outputs,
            )
    except torch.OutOfMemoryError as error:  # [routing.errors]: a clear error, never an unrouted fallback
        raise RoutingError(
            "routing.errors",
            f"out of memory in the routed prefill of a batch of shape {tuple(input_ids.shape)} "
            f"({config.policy}, decision layers {list(config.schedule.layers)}): {error}",
        ) from error
