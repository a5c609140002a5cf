"""[eval.budgets] Per-sample budgets next to accuracy, in lmms-eval's own records.

Each generated answer carries its sample's budget, computed from the routed prefill's trace by
``budget_from_trace`` ([budget.active-counts]): the per-layer visual counts, the realized and nominal
avg_T, the true TFLOPs (decoder, and the probes apart), the KV bytes after prefill. lmms-eval writes it
into the per-sample log (``--log_samples``) under ``token_counts[0]["routing"]``: ``generate_until``
returns ``GenerationResult`` objects whose ``token_counts`` is a :class:`RoutedCounts`.

The run's means go through lmms-eval's throughput log (``log_metrics``): its summary averages every
numeric key over the records, one record per sample here, so the results JSON's ``throughput`` block
and the printed "Throughput Summary" (right under the task metrics) hold ``avg_T``, ``avg_tflops``,
``avg_kv_mib``, and the same per task (``avg_T[task]``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lmms_eval.api.instance import TokenCounts
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from rerouting.reference import RoutingConfig, Trace
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace, schedule_trace
from rerouting.reference.records import SampleBudget
from rerouting.reference.trace import SampleTrace

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class RoutedCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the sample's routing budget (``routing``)."""

    routing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "routing": self.routing}


def sample_budget(
    sample: SampleTrace, num_layers: int, arch: ArchSpec, kv_dtype: torch.dtype, config: RoutingConfig | None
) -> SampleBudget:
    """[eval.budgets] One sample's budget from its trace row (an unrouted run: the dense trace of its M and N)."""
    trace = Trace(
        policy="none" if config is None else config.policy, num_layers=num_layers, samples=(sample,)
    )
    return budget_from_trace(trace, arch, kv_dtype=kv_dtype, config=config).samples[0]


def dense_sample(num_text: int, num_visual: int, num_layers: int) -> SampleTrace:
    """The trace row of an unrouted forward over M text and N visual tokens (every layer runs all N)."""
    return schedule_trace(None, num_text=num_text, num_visual=num_visual, num_layers=num_layers).samples[0]


def budget_record(budget: SampleBudget, routing_name: str) -> dict[str, Any]:
    """[eval.budgets] What the per-sample log holds: counts per layer, avg_T, TFLOPs and KV bytes."""
    return {
        "schedule": routing_name,
        "num_visual": budget.num_visual,
        "num_text": budget.num_text,
        "visual_per_layer": list(budget.visual_counts),
        "avg_T": budget.avg_visual_tokens,
        "avg_T_nominal": budget.avg_visual_tokens_nominal,
        "tflops": budget.flops_true / 1e12,
        "tflops_probe": budget.probe_flops / 1e12,
        "kv_bytes": budget.kv_bytes,
    }


def log_sample(record: dict[str, Any], task: str, seconds: float, generated: int) -> None:
    """[eval.budgets] One throughput record per sample: lmms-eval's summary then averages the budgets."""
    means = {
        "T": record["avg_T"],
        "tflops": record["tflops"] + record["tflops_probe"],
        "kv_mib": record["kv_bytes"] / 2**20,
    }
    means.update({f"{key}[{task}]": value for key, value in list(means.items())})
    log_metrics(
        total_elapsed_time=seconds,
        total_gen_tokens=generated,
        avg_speed=generated / seconds if seconds > 0 else 0.0,
        additional_metrics={"total_requests": 1, **means},
    )
