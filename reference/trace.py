"""The Trace: the full record of a routed prefill, from which budgets are computed (spec/routing.md).

Indices come in two kinds, never mixed:

- *positions*: 0..T_b-1 within a sample's valid (unpadded) sequence;
- *visual indices*: 0..N-1, the rank of a visual token among the sample's visual positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Decision:
    """One decision of one sample.

    Attributes:
        layer: the decision layer d_s (also under ``probe_layer="previous"``, [scoring.probe.variant-layer]).
        stage: s.
        pool: visual indices eligible for selection, ascending ([selection.pool]).
        scores: ``[N]`` float32 (float64 in a float64 run) score of every visual token ([scoring.probe.dtype]);
            tokens outside the probe's key set score 0 ([scoring.probe.softmax]).
        k: the number selected, after the pool cap ([selection.pool-cap]); the schedule's, also when the
            selection is forced ([selection.forced]).
        selected: visual indices selected, ascending ([selection.order]).
        probe_keys: number of keys in the probe sequence ([budget.flops.probe]).
        probe_queries: number of query rows the scorer uses ([scoring.probe.query-row]).
    """

    layer: int
    stage: int
    pool: tuple[int, ...]
    scores: torch.Tensor
    k: int
    selected: tuple[int, ...]
    probe_keys: int
    probe_queries: int


@dataclass(frozen=True)
class SampleTrace:
    """Routing record of one sample.

    Attributes:
        num_text: M, the sample's valid non-visual tokens ([layout.text-set]).
        visual_positions: the positions of V, ascending ([layout.visual-set]).
        decisions: one per schedule decision; empty when the sample has no visual token.
        active_visual: per decoder layer, the visual indices that layer processed.
        entering: the visual indices a vision-side reducer let into the decoder ([nuwa.entering]); None: all.
    """

    num_text: int
    visual_positions: tuple[int, ...]
    decisions: tuple[Decision, ...]
    active_visual: tuple[tuple[int, ...], ...]
    entering: tuple[int, ...] | None = None

    @property
    def num_visual(self) -> int:
        return len(self.visual_positions)

    @property
    def seq_len(self) -> int:
        return self.num_text + self.num_visual

    @property
    def routed(self) -> bool:
        """False for a text-only sample ([layout.text-only])."""
        return bool(self.decisions)

    @property
    def layer_visual_counts(self) -> tuple[int, ...]:
        """[budget.active-counts] Visual tokens entering each layer."""
        return tuple(len(a) for a in self.active_visual)

    @property
    def kv_lengths(self) -> tuple[int, ...]:
        """[cache.contents] Cache entries per layer after prefill: text plus active visual."""
        return tuple(self.num_text + n for n in self.layer_visual_counts)

    def deferred(self, stage: int) -> tuple[int, ...]:
        """Visual indices not selected at ``stage`` ([routing.bypass])."""
        chosen = set(self.decisions[stage].selected)
        return tuple(i for i in range(self.num_visual) if i not in chosen)

    def readmitted(self, stage: int) -> tuple[int, ...]:
        """[routing.readmit] Tokens selected at ``stage`` that were deferred (not selected) at ``stage - 1``."""
        if stage == 0:
            return ()
        before = set(self.decisions[stage - 1].selected)
        return tuple(i for i in self.decisions[stage].selected if i not in before)


@dataclass(frozen=True)
class Trace:
    """Routing record of a batch: one ``SampleTrace`` per sample, in batch order."""

    policy: str
    num_layers: int
    samples: tuple[SampleTrace, ...]

    def to_dict(self) -> dict:
        """A JSON-ready view (scores as lists of floats)."""
        return {
            "policy": self.policy,
            "num_layers": self.num_layers,
            "samples": [
                {
                    "num_text": s.num_text,
                    "visual_positions": list(s.visual_positions),
                    "layer_visual_counts": list(s.layer_visual_counts),
                    "decisions": [
                        {
                            "layer": d.layer,
                            "stage": d.stage,
                            "k": d.k,
                            "pool": list(d.pool),
                            "selected": list(d.selected),
                            "readmitted": list(s.readmitted(d.stage)),
                            "probe_keys": d.probe_keys,
                            "probe_queries": d.probe_queries,
                            "scores": [float(x) for x in d.scores.tolist()],
                        }
                        for d in s.decisions
                    ],
                }
                for s in self.samples
            ],
        }

    def summary(self) -> str:
        """A readable per-sample, per-stage table: pool, k, selected, deferred (removed) and re-admitted counts.

        Under ``remove`` the tokens not selected are gone for good, so that column says "removed" and nothing
        is ever re-admitted ([routing.readmit]).
        """
        left = "removed" if self.policy == "remove" else "deferred"
        lines = [f"Trace: policy {self.policy}, {self.num_layers} layers, {len(self.samples)} sample(s)"]
        for b, sample in enumerate(self.samples):
            head = f"sample {b}: {sample.num_visual} visual + {sample.num_text} text tokens"
            if not sample.routed:
                lines.append(f"{head}; not routed (text only)")
                continue
            counts = " ".join(map(str, sample.layer_visual_counts))
            lines += [f"{head}; visual tokens per layer: {counts}"]
            lines.append(
                f"  {'stage':>5} {'layer':>5} {'pool':>5} {'k':>5} {'selected':>8} {left:>8} {'re-admitted':>11}"
            )
            for d in sample.decisions:
                readmitted = len(sample.readmitted(d.stage))
                lines.append(
                    f"  {d.stage:>5} {d.layer:>5} {len(d.pool):>5} {d.k:>5} {len(d.selected):>8} "
                    f"{sample.num_visual - len(d.selected):>8} {readmitted:>11}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
