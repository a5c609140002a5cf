"""The public contract of an implementation under test, and what a conformance failure looks like.

Import everything an implementation touches from here (``__all__``); nothing else of
``rerouting.reference`` or ``rerouting.conformance`` is part of the contract, and the names here keep
working across releases (the classes are the reference's own, re-exported, so ``isinstance`` checks
and ``rerouting.reference.Trace`` keep working too).

An implementation is any object with the methods of :class:`Implementation`. It receives a real
``transformers.LlavaForConditionalGeneration`` (in the dtype and on the device under test), a
:class:`RoutingConfig` and a padded batch, and returns what it computed: logits, the KV cache it
would decode from, and the :class:`Trace` of its routing decisions. The suite compares all three
with the reference, rule by rule (docs/conformance.md; a worked example is docs/examples/outside_impl.py).

Notation: B batch, T padded length, T_b a sample's valid length, V vocabulary, L decoder layers, H query
heads, H_kv key/value heads, hd head dim, n_l the cache entries of layer l, N a sample's visual tokens,
M its text tokens. *Position*: a valid token's rank among its sample's valid tokens, ``0..T_b-1``
([layout.sequence]); *visual index*: ``0..N-1``, the rank of a visual position ([layout.visual-set]).

**Inputs** (what ``prefill`` is given):

- ``config`` :class:`RoutingConfig`: ``schedule`` (:class:`Schedule`: ``layers`` the decision layers
  ``d_0 < ... < d_{S-1}`` [schedule.decision-layers]; ``keep`` one target per decision, read with
  ``schedule.keep_count(s, N)`` [schedule.keep-ratio] [schedule.keep-count]; ``unit`` ``"ratio"`` or
  ``"count"``), ``policy`` (``"reroute"`` or ``"remove"`` [selection.pool]), ``scorer``
  (:class:`Scorer`: ``kind`` ``"attention"`` or ``"random"`` [scoring.scorer]; ``probe_layer``
  ``"decision"`` or ``"previous"`` [scoring.probe.variant-layer]; ``query`` ``"last"`` or
  ``"text-after-image"`` [scoring.probe.variant-query]; ``seed`` [scoring.scorer.random]) and
  ``compute_dtype`` (the reference's own switch: ignore it, run in the model's dtype).
- ``input_ids`` ``[B, T]`` long, ``attention_mask`` ``[B, T]`` (1 valid, 0 padding, either side) or None;
  ``pixel_values`` ``[I, C, H, W]``: every image of the batch, sample 0's first, each sample's in position
  order, or None [layout.pixel-values].
- ``forced_selection`` :data:`ForcedSelection`: ``forced[b][s]`` the visual indices sample b selects at
  decision s instead of its top-k; exactly ``k`` distinct tokens of the pool, else an error naming
  ``selection.forced`` [selection.forced].

**The trace** (what ``PrefillOutput.trace`` holds; frozen dataclasses, build them with keywords):

- :class:`Trace`: ``policy`` (``config.policy``), ``num_layers`` (L), ``samples`` (one
  :class:`SampleTrace` per sample, batch order).
- :class:`SampleTrace`: ``num_text`` (M [layout.text-set]), ``visual_positions`` (the positions of the
  sample's image placeholders, ascending [layout.visual-set]), ``decisions`` (one :class:`Decision` per
  schedule decision, in order; empty for a text-only sample [layout.text-only]), ``active_visual``
  (L tuples: the visual indices each layer ran, ascending: ``range(N)`` in the dense prefix, then the
  selection of the layer's stage [routing.active-set] [schedule.stages]).
- :class:`Decision`: ``layer`` (``d_s``, also under ``probe_layer="previous"``
  [scoring.probe.variant-layer]), ``stage`` (s), ``pool`` (eligible visual indices, ascending
  [selection.pool]), ``scores`` (``[N]`` tensor in the score dtype: float32, float64 in a float64 run
  [scoring.probe.dtype]; 0 for a visual token outside the probe's keys [scoring.probe.softmax]),
  ``k`` (``min(keep_count(s, N), len(pool))``, also when forced [selection.pool-cap]
  [selection.forced]), ``selected`` (k visual indices, ascending [selection.topk] [selection.order]),
  ``probe_keys`` and ``probe_queries`` (the probe's key count and query rows: every valid token (reroute)
  or text + pool (remove), and 1 or the text rows after the image; both 0 for the random scorer
  [scoring.probe.input] [budget.flops.probe]).

**Errors.** Refuse a bad input with any exception whose message names one of the rule IDs
:data:`ERROR_RULES` lists for its condition [routing.errors.ids] (the reference raises
:class:`RoutingError`); raise ``NotImplementedError`` only for a capability you lack. Run the host's
layers under one of :data:`SUPPORTED_ATTENTION` [routing.kernels].
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from rerouting.reference import Decision, RoutingConfig, RoutingError, SampleTrace, Schedule, Scorer, Trace
from rerouting.reference.selection import ForcedSelection  # forced_selection[b][s], defined once

__all__ = [
    "CAPABILITIES",
    "ERROR_RULES",
    "MARKER",
    "SUPPORTED_ATTENTION",
    "CapabilityMissing",
    "ConformanceFailure",
    "Decision",
    "DecodeOutput",
    "ForcedSelection",
    "Implementation",
    "LayerKV",
    "PrefillOutput",
    "RoutingConfig",
    "RoutingError",
    "SampleTrace",
    "Schedule",
    "Scorer",
    "Trace",
    "check",
    "fail",
]

#: [routing.kernels] The host attention implementations a routed layer may run under.
SUPPORTED_ATTENTION: tuple[str, ...] = ("eager", "sdpa")

#: [routing.errors.ids] Per error condition (spec/routing.md's table, same keys), the rule IDs of which the
#: error's message must name one. Any exception type counts except ``NotImplementedError``.
ERROR_RULES: dict[str, tuple[str, ...]] = {
    "model-class": ("routing.errors",),
    "attention": ("routing.errors", "routing.kernels"),
    "image-features": ("layout.visual-set", "layout.pixel-values", "layout.image-grid", "routing.errors"),
    "decision-layer": ("schedule.decision-layers",),
    "keep-count": ("schedule.keep-count",),
    "no-text": ("scoring.probe.query-row",),
    "no-text-after-image": ("scoring.probe.variant-query",),
    "forced-selection": ("selection.forced", "selection.pool"),
}


class LayerKV(NamedTuple):
    """One sample's cache at one layer ([cache.contents]).

    Attributes:
        keys: ``[H_kv, n_l, hd]`` in the model's dtype, after RoPE at the entries' original positions (the
            host's convention), exactly the tensor your cache keeps for the sample (no padding slots: its
            ``numel() * element_size()`` is checked against the KV budget [budget.kv.bytes]).
        values: ``[H_kv, n_l, hd]``, likewise.
        positions: ``[n_l]`` long, each entry's position: ``0..T_b-1`` for prompt tokens, ``T_b + t`` for
            the t-th decoded token [cache.decode.positions]; in cache order (ascending [selection.order]).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


@dataclass
class PrefillOutput:
    """What a routed prefill returns.

    Attributes:
        logits: ``[B, T, V]`` in the model's dtype, any device; rows of padding are ignored ([routing.output]).
        kv: ``kv[b][l]``, sample b's cache at layer l as it stood when the prefill returned; decode steps
            must not change it ([cache.snapshot]: return copies, or views decoding never writes through).
        trace: the routing record, a :class:`Trace` (fields in the module docstring).
        state: anything :meth:`Implementation.decode_step` needs (e.g. the live cache); opaque to the suite.
    """

    logits: torch.Tensor
    kv: Sequence[Sequence[LayerKV]]
    trace: Trace
    state: Any = None


@dataclass
class DecodeOutput:
    """What one decode step returns.

    Attributes:
        logits: ``[B, V]``, the next-token logits of every sample ([cache.decode.unrouted]).
        kv: ``kv[b][l]`` after the step (one more entry per layer, at position ``T_b + step``), or None if
            the implementation does not expose it (the checks that need it then fail as a missing
            capability).
    """

    logits: torch.Tensor
    kv: Sequence[Sequence[LayerKV]] | None = None


@runtime_checkable
class Implementation(Protocol):
    """A routing implementation under test.

    ``prefill`` runs the routed prefill of spec/routing.md on the padded batch. With
    ``forced_selection`` it must select exactly the given visual indices at every decision instead of
    its own top-k (scores are still computed and recorded, ``k`` stays the schedule's [selection.forced]);
    implementations that cannot do this may omit the argument, and only the checks that need it fail,
    each as "forced_selection is not implemented by <impl>". It must not modify ``model`` (its weights
    or its attention setting [routing.kernels]): the suite shares it between examples.

    ``decode_step`` feeds one token per sample (``tokens`` ``[B]`` long) after ``step`` earlier decode
    steps, extends the live cache kept in ``prefill.state`` and returns the next-token logits; it must
    not change ``prefill.kv`` ([cache.snapshot]).

    Hosts (added compatibly in 0.1.1): the suite draws LLaVA and Qwen2.5-VL models. On a Qwen2.5-VL case
    ``prefill`` also gets ``image_grid_thw=`` (``[I, 3]`` long, [layout.image-grid]); a ``prefill``
    without that keyword fails those checks as "image_grid_thw is not implemented by <impl>". An
    implementation for some hosts only says so with an optional ``hosts`` attribute (model class names,
    e.g. ``("LlavaForConditionalGeneration",)``): the checks of other hosts are then skipped with that
    reason, and the report lists their rules as skipped, not checked.

    TwigVLM (added compatibly): on a TTP case ``prefill`` also gets ``twig=`` (a ``rerouting.reference.Twig``,
    [twig.ttp.score]); self-speculative decoding is an optional ``ssd_generate(model, config, twig, input_ids,
    attention_mask, pixel_values, *, max_new_tokens, options)`` returning the tokens ``[B, n]`` and a
    ``rerouting.reference.ssd.SpeculationStats`` ([twig.ssd.lossless]). Without them those checks fail as a
    missing capability ("twig", "ssd_generate").

    Scorers and cache policies (added compatibly with CLSE): ``config.scorer.kind`` may be ``"clse"``
    (spec/clse.md, parameters in ``config.scorer.clse``) and ``config.cache`` ``"retroactive"``
    ([cache.policy]); the CLSE checks also draw ``Qwen2VLForConditionalGeneration`` hosts where ``hosts``
    allows. An implementation without them says so with optional ``scorers`` (kinds) and ``cache_policies``
    (names) attributes: those checks are then skipped, saying so.
    """

    name: str

    def prefill(
        self,
        model: nn.Module,
        config: RoutingConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        forced_selection: ForcedSelection | None = None,
    ) -> PrefillOutput: ...

    def decode_step(
        self, model: nn.Module, config: RoutingConfig, prefill: PrefillOutput, tokens: torch.Tensor, step: int
    ) -> DecodeOutput: ...


# Capabilities the suite asks for, by the name a failure message uses.
CAPABILITIES: tuple[str, ...] = (
    "prefill",
    "forced_selection",
    "decode_step",
    "decode_step KV (DecodeOutput.kv)",
    "image_grid_thw",
    "twig",  # prefill(..., twig=) on a TTP case (TwigVLM; checks skipped without it)
    "ssd_generate",  # self-speculative decoding (TwigVLM; checks skipped without it)
)


class CapabilityMissing(AssertionError):
    """The implementation lacks something a check needs: a named failure, never a crash."""

    def __init__(self, capability: str, impl: str, detail: str = ""):
        self.capability, self.impl = capability, impl
        super().__init__(f"{capability} is not implemented by {impl}" + (f" ({detail})" if detail else ""))


MARKER = "CONFORMANCE-FAILURE "  # prefix of the machine-readable line in every failure message


class ConformanceFailure(AssertionError):
    """A rule is broken. The message is readable and ends with one machine-readable JSON line.

    Attributes:
        rule: the spec rule ID the failed check enforces.
        observed: the observed error or value (a float or a short string).
        allowed: what the rule allows (a float tolerance or a short string).
    """

    def __init__(self, rule: str, message: str, *, observed: Any = None, allowed: Any = None):
        self.rule, self.observed, self.allowed = rule, observed, allowed
        record = {"rule": rule, "observed": _jsonable(observed), "allowed": _jsonable(allowed)}
        super().__init__(f"[rule {rule}] {message}\n{MARKER}{json.dumps(record)}")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def fail(rule: str, message: str, *, observed: Any = None, allowed: Any = None) -> None:
    """Raise :class:`ConformanceFailure`."""
    raise ConformanceFailure(rule, message, observed=observed, allowed=allowed)


def check(condition: bool, rule: str, message: str, *, observed: Any = None, allowed: Any = None) -> None:
    """Raise :class:`ConformanceFailure` unless ``condition``."""
    if not condition:
        fail(rule, message, observed=observed, allowed=allowed)
