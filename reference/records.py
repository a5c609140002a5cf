"""Budget records: what :func:`~rerouting.reference.budget.budget_from_trace` returns (spec/budget.md).

One ``LayerBudget`` per decoder layer and one ``ProbeBudget`` per decision make a ``SampleBudget``;
the samples of a batch make a ``BatchBudget``. Every total is a property summing exact integers over
the records below it ([budget.active-counts]: the counts are the trace's, never the configuration's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .archs import ArchSpec
from .flops import TRUE_COMPONENTS, avg_visual_tokens, kv_entry_bytes
from .flops_linear import LINEAR_COMPONENTS


def _sum_components(parts: Sequence[Mapping[str, int]], names: Sequence[str]) -> dict[str, int]:
    return {name: sum(p.get(name, 0) for p in parts) for name in names}  # a linear layer has no proj_q


def _summed(items: str, attr: str, doc: str | None = None) -> property:
    """A read-only total: the sum of ``attr`` over the records in ``self.<items>`` (exact ints)."""

    def total(self: Any) -> int:
        return sum(getattr(record, attr) for record in getattr(self, items))

    return property(total, doc=doc)


@dataclass(frozen=True)
class LayerBudget:
    """One decoder layer of one sample.

    Attributes:
        layer: layer index.
        visual: active visual tokens entering the layer ([budget.active-counts]).
        tokens: n_l = M + visual, every token the layer runs.
        flops_true: true FLOPs by component ([budget.flops.true]).
        macs_fastv: FastV convention over n_l ([budget.flops.fastv]).
        macs_pdrop: PDrop convention over ``visual`` ([budget.flops.pdrop]).
        flops_nuwa: Nüwa convention over ``visual`` ([budget.flops.nuwa]).
        kv_entries: cache entries after prefill, = tokens ([budget.kv.entries]).
        kv_bytes: their bytes ([budget.kv.bytes]).
    """

    layer: int
    visual: int
    tokens: int
    flops_true: dict[str, int]
    macs_fastv: int
    macs_pdrop: int
    flops_nuwa: int
    kv_entries: int
    kv_bytes: int

    @property
    def flops_true_total(self) -> int:
        return sum(self.flops_true.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_true_total": self.flops_true_total}


@dataclass(frozen=True)
class ProbeBudget:
    """[budget.flops.probe] One decision's probe: its sizes and FLOPs by component."""

    layer: int
    stage: int
    keys: int
    queries: int
    flops: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class SampleBudget:
    """The budget of one sample. Totals are properties over ``layers`` and ``probes``.

    Attributes:
        num_text: M.
        num_visual: N.
        routed: False for a trace without decisions.
        layers: one ``LayerBudget`` per decoder layer.
        probes: one ``ProbeBudget`` per decision.
        lm_head_flops: 2·(M+N)·d·vocab, apart from the decoder.
        avg_visual_tokens_nominal: nominal avg_T when the config was given, else None.
    """

    num_text: int
    num_visual: int
    routed: bool
    layers: tuple[LayerBudget, ...]
    probes: tuple[ProbeBudget, ...]
    lm_head_flops: int
    avg_visual_tokens_nominal: float | None = None

    @property
    def visual_counts(self) -> tuple[int, ...]:
        return tuple(layer.visual for layer in self.layers)

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(layer.tokens for layer in self.layers)

    @property
    def avg_visual_tokens(self) -> float:
        """[budget.avg-tokens] Realized avg_T (the trace's integer counts)."""
        return avg_visual_tokens(self.visual_counts)

    @property
    def flops_true_by_component(self) -> dict[str, int]:
        parts = [layer.flops_true for layer in self.layers]
        linear = tuple(
            c for c in LINEAR_COMPONENTS if c not in TRUE_COMPONENTS and any(c in p for p in parts)
        )
        return _sum_components(parts, TRUE_COMPONENTS + linear)  # [budget.flops.linear] on a hybrid decoder

    flops_true = _summed(
        "layers", "flops_true_total", "[budget.flops.true] Decoder total (no probe, no LM head)."
    )
    macs_fastv = _summed("layers", "macs_fastv")
    macs_pdrop = _summed("layers", "macs_pdrop")
    flops_nuwa = _summed("layers", "flops_nuwa")
    probe_flops = _summed("probes", "total", "[budget.flops.probe] All decisions' probes together.")
    kv_entries = _summed("layers", "kv_entries")
    kv_bytes = _summed("layers", "kv_bytes")

    def to_dict(self) -> dict:
        return {
            "num_text": self.num_text,
            "num_visual": self.num_visual,
            "routed": self.routed,
            "visual_counts": list(self.visual_counts),
            "token_counts": list(self.token_counts),
            "avg_visual_tokens": self.avg_visual_tokens,
            "avg_visual_tokens_nominal": self.avg_visual_tokens_nominal,
            "flops_true": self.flops_true,
            "flops_true_by_component": self.flops_true_by_component,
            "macs_fastv": self.macs_fastv,
            "macs_pdrop": self.macs_pdrop,
            "flops_nuwa": self.flops_nuwa,
            "probe_flops": self.probe_flops,
            "lm_head_flops": self.lm_head_flops,
            "kv_entries": self.kv_entries,
            "kv_bytes": self.kv_bytes,
            "layers": [layer.to_dict() for layer in self.layers],
            "probes": [p.to_dict() for p in self.probes],
        }


@dataclass(frozen=True)
class BatchBudget:
    """The budget of a batch: one ``SampleBudget`` per sample, plus batch totals (sums over samples).

    Attributes:
        arch: the architecture the counts are for.
        policy: the trace's policy ("none" for an unrouted :func:`schedule_trace`).
        kv_dtype: the cache dtype the byte counts assume.
        kv_decode_growth: [budget.kv.decode-growth] bytes each generated token adds, per sample.
        samples: per-sample budgets, in batch order.
    """

    arch: ArchSpec
    policy: str
    kv_dtype: torch.dtype
    kv_decode_growth: int
    samples: tuple[SampleBudget, ...]

    flops_true = _summed("samples", "flops_true")
    macs_fastv = _summed("samples", "macs_fastv")
    macs_pdrop = _summed("samples", "macs_pdrop")
    flops_nuwa = _summed("samples", "flops_nuwa")
    probe_flops = _summed("samples", "probe_flops")
    lm_head_flops = _summed("samples", "lm_head_flops")
    kv_entries = _summed("samples", "kv_entries")
    kv_bytes = _summed("samples", "kv_bytes")

    def to_dict(self) -> dict:
        """A JSON-ready view (ints stay exact)."""
        return {
            "arch": self.arch.to_dict(),
            "policy": self.policy,
            "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
            "kv_entry_bytes": kv_entry_bytes(self.arch, self.kv_dtype),
            "kv_decode_growth": self.kv_decode_growth,
            "totals": {
                "flops_true": self.flops_true,
                "macs_fastv": self.macs_fastv,
                "macs_pdrop": self.macs_pdrop,
                "flops_nuwa": self.flops_nuwa,
                "probe_flops": self.probe_flops,
                "lm_head_flops": self.lm_head_flops,
                "kv_entries": self.kv_entries,
                "kv_bytes": self.kv_bytes,
            },
            "samples": [s.to_dict() for s in self.samples],
        }
