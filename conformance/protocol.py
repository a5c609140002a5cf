"""The contract an implementation under test fulfils, and what a conformance failure looks like.

An implementation is any object with the two methods of :class:`Implementation`. It receives a real
``transformers.LlavaForConditionalGeneration`` (in the dtype and on the device under test), a
``rerouting.reference.RoutingConfig`` and a padded batch, and returns what it computed: logits, the
KV cache it would decode from, and the :class:`~rerouting.reference.Trace` of its routing decisions.
The suite compares all three with the reference (``rerouting.reference``), rule by rule.

Notation: B batch, T padded length, T_b a sample's valid length, V vocabulary, L decoder layers,
H_kv key/value heads, hd head dim, n_l the cache entries of layer l.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from rerouting.reference import RoutingConfig, Trace
from rerouting.reference.selection import ForcedSelection  # forced_selection[b][s], defined once


class LayerKV(NamedTuple):
    """One sample's cache at one layer.

    Attributes:
        keys: ``[H_kv, n_l, hd]``, after RoPE at the entries' original positions (the host's convention).
        values: ``[H_kv, n_l, hd]``.
        positions: ``[n_l]`` long, each entry's position: ``0..T_b-1`` for prompt tokens, ``T_b + t`` for
            the t-th decoded token; in cache order (ascending).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


@dataclass
class PrefillOutput:
    """What a routed prefill returns.

    Attributes:
        logits: ``[B, T, V]``; rows of padding are ignored ([routing.output]).
        kv: ``kv[b][l]``, sample b's cache at layer l after the prefill.
        trace: the routing record (``rerouting.reference.Trace``): per sample, per decision, the fp32
            scores of every visual token, the pool, k and the selection; per layer the active visual set.
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
        logits: ``[B, V]``, the next-token logits of every sample.
        kv: ``kv[b][l]`` after the step (one more entry per layer), or None if the implementation does
            not expose it (the checks that need it then fail as a missing capability).
    """

    logits: torch.Tensor
    kv: Sequence[Sequence[LayerKV]] | None = None


@runtime_checkable
class Implementation(Protocol):
    """A routing implementation under test.

    ``prefill`` runs the routed prefill of spec/routing.md on the padded batch. With
    ``forced_selection`` it must select exactly the given visual indices at every decision instead of
    its own top-k (scores are still computed and recorded); implementations that cannot do this may
    omit the argument, and only the checks that need it fail, each as "forced_selection is not
    implemented by <impl>".

    ``decode_step`` feeds one token per sample (``tokens`` ``[B]`` long) after ``step`` earlier decode
    steps, extends ``prefill``'s cache in place and returns the next-token logits.
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
