"""The audit's twig section ([twig.budget]): for every schedule with the twig scorer, the routed base's realized
avg_T, the twig's own prefill cost apart, and the KV cache per group (base 0..K-1, twig, base K..L-1).

The twig is the base's own layer class, so its counts come from the architecture alone; ``T`` is the
scorer's ``twig_layers`` (a schedule without it reports T as unknown and no twig cost).
"""

from __future__ import annotations

from collections.abc import Sequence

from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import schedule_trace
from rerouting.reference.budget_twig import twig_budget


def twig_records(schedules: Sequence, arch: ArchSpec, setting) -> list[dict]:
    """[twig.budget] One record per twig schedule and policy it is audited under."""
    out = []
    for schedule in schedules:
        config = schedule.config
        T = config.scorer.twig_layers
        if config.scorer.kind != "twig" or T is None:
            continue
        for policy in setting.policies:
            trace = schedule_trace(
                config.with_policy(policy),
                num_text=setting.num_text,
                num_visual=setting.num_visual,
                num_layers=arch.num_layers,
            )
            b = twig_budget(
                trace.samples[0],
                arch,
                first_layer=config.schedule.layers[0],
                twig_layers=T,
                kv_dtype=setting.kv_dtype,
            )
            out.append(
                {
                    "schedule": schedule.name,
                    "policy": policy,
                    "first_layer": config.schedule.layers[0],
                    "twig_layers": T,
                    "avg_visual_tokens_realized": b.avg_visual_tokens,
                    "twig_visual_token_layers": b.twig_visual_token_layers,
                    "twig_flops_true": b.twig_flops_true,
                    "twig_head_flops_per_draft": b.twig_head_flops_per_draft,
                    "kv_entries": {k: list(v) for k, v in b.kv_entries.items()},
                    "kv_bytes": b.kv_bytes,
                }
            )
    return out


def twig_lines(report: dict) -> list[str]:
    """[twig.budget] Plain-text lines for ``rerouting audit``'s summary (empty without a twig schedule)."""
    records = report.get("twig") or []
    if not records:
        return []
    lines = ["", "Twig (TTP) runs: the twig's own cost is not in avg_T; KV per cache group (MiB)"]
    for r in records:
        mib = {k: v / 2**20 for k, v in r["kv_bytes"].items()}
        lines.append(
            f"{r['schedule']} ({r['policy']}): avgT real {r['avg_visual_tokens_realized']:.2f}; twig K={r['first_layer']} "
            f"T={r['twig_layers']}: {r['twig_flops_true'] / 1e12:.3f} TFLOPs prefill, {r['twig_visual_token_layers']} "
            f"visual token-layers; KV base 0..K-1 {mib['base_prefix']:.1f}, twig {mib['twig']:.1f}, "
            f"base K..L-1 {mib['base_routed']:.1f}"
        )
    return lines


def twig_md(report: dict) -> str:
    """[twig.budget] The report.md section (empty without a twig schedule)."""
    records = report.get("twig") or []
    if not records:
        return ""
    rows = [
        "| schedule | policy | avg_T realized | twig K, T | twig TFLOPs (prefill) | twig visual token-layers | "
        "KV MiB base 0..K-1 | KV MiB twig | KV MiB base K..L-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        kv = {k: f"{v / 2**20:.1f}" for k, v in r["kv_bytes"].items()}
        rows.append(
            f"| {r['schedule']} | {r['policy']} | {r['avg_visual_tokens_realized']:.2f} | {r['first_layer']}, "
            f"{r['twig_layers']} | {r['twig_flops_true'] / 1e12:.3f} | {r['twig_visual_token_layers']} | "
            f"{kv['base_prefix']} | {kv['twig']} | {kv['base_routed']} |"
        )
    return (
        "## Twig runs (TTP)\n\n"
        "The twig's own prefill (T layers over every token) and its full-prompt KV are not part of avg_T or of "
        "the decoder columns above ([twig.budget]); SSD's drafts add the twig head per drafted row "
        f"({records[0]['twig_head_flops_per_draft'] / 1e9:.3f} GFLOPs).\n\n" + "\n".join(rows)
    )
