"""Plain-text views of a ``rerouting bench`` record: one line per measured row, and the prefill table."""

from __future__ import annotations

import json


def row_line(row: dict) -> str:
    t, r = row["times"], row["ratios"]
    ms = {name: f"{v['median_s'] * 1e3:.1f}" for name, v in t.items()}
    line = (
        f"B={row['batch']} k={row['k']} avg_T={row['avg_visual_tokens']:.1f} | dense {ms['dense']} ms, "
        f"remove {ms['remove']} ms, reroute {ms['reroute']} ms | reroute/remove {r['reroute_over_remove']:.3f} "
        f"(FLOPs {r['reroute_over_remove_flops']:.3f}) | dense/reroute {r['dense_over_reroute']:.2f}x, "
        f"bound {r['flops_bound']:.2f}x, {r['speedup_over_bound']:.2f} of it"
    )
    if "reference_over_optimized" in r:
        line += f" | reference {ms['reference']} ms vs {ms['reroute_full']} ms: {r['reference_over_optimized']:.2f}x"
    return line


def table(record: dict) -> str:
    """A plain-text table of the record (medians in ms, peak memory in MiB)."""
    head = (
        f"{'B':>2} {'k':>4} {'avg_T':>6} {'dense':>8} {'remove':>8} {'reroute':>8} {'rr/rm':>6} {'flops':>6} "
        f"{'speedup':>7} {'bound':>6} {'eff':>5} {'ref':>8} {'opt_full':>8} {'ref/opt':>7}  "
        "peak MiB dense/remove/reroute[/opt_full/ref]"
    )
    lines = [
        f"device: {record['device']}, host {record.get('host', 'llava')}, dtype {record['dtype']}, {record['clock']} clock, repeats {record['repeats']} "
        f"(reference {record['reference_repeats']}), shape {record['shape']}",
        head,
    ]
    for row in record["rows"]:
        t, r, m = row["times"], row["ratios"], row["peak_memory_bytes"]

        def ms(name, t=t):
            return f"{t[name]['median_s'] * 1e3:8.1f}" if name in t else f"{'-':>8}"

        names = ["dense", "remove", "reroute", "reroute_full", "reference"]
        mib = "/".join("-" if m.get(n) is None else f"{m[n] / 2**20:.0f}" for n in names if n in m)
        ref = f"{r['reference_over_optimized']:7.2f}" if "reference_over_optimized" in r else f"{'-':>7}"
        lines.append(
            f"{row['batch']:>2} {row['k']:>4} {row['avg_visual_tokens']:6.1f} {ms('dense')} {ms('remove')} "
            f"{ms('reroute')} {r['reroute_over_remove']:6.3f} {r['reroute_over_remove_flops']:6.3f} "
            f"{r['dense_over_reroute']:7.2f} {r['flops_bound']:6.2f} {r['speedup_over_bound']:5.2f} "
            f"{ms('reference')} {ms('reroute_full')} {ref}  {mib}"
        )
    lines.append(f"targets: {json.dumps(record['targets'])}")
    lines.append(f"verdict: {json.dumps(record['verdict'])}")
    return "\n".join(lines)
