"""The plain-text summary table ``rerouting audit`` prints."""

from __future__ import annotations

from collections.abc import Sequence

from .cells import (
    CONVENTION_TITLES,
    CONVENTION_UNITS,
    bu,
    by,
    fl,
    flagged,
    fp,
    label_cell,
    pct,
    policy_cell,
    rows,
)
from .twig import twig_lines


def summary_table(report: dict) -> str:
    """The plain-text summary ``rerouting audit`` prints: one row per schedule × policy, dense first."""
    # all four conventions make the table too wide for a terminal: stdout shows one paper convention
    # when asked for it, the true count always; report.md has every column
    conventions = [c for c in report["conventions"] if c != "true"] if len(report["conventions"]) == 1 else []
    kv = report["kv_dtype"]
    p = fp(report)
    header = ["schedule", "policy", "avgT real", "nominal", "label", f"true {p}FLOPs", "-%", f"probe {p}"]
    header += [f"{CONVENTION_TITLES[c]} {p} {CONVENTION_UNITS[c]}" for c in conventions]
    header += [f"KV {bu(report)} {kv}", "-%", "flag"]
    dense = report["dense"]
    body = [
        [
            "dense (unrouted)",
            "-",
            f"{dense['avg_visual_tokens']['realized']:.2f}",
            f"{dense['avg_visual_tokens']['nominal']:.2f}",
            "-",
            fl(report, dense["flops"]["true"]),
            "",
            "0",
            *[fl(report, dense["flops"][c]) for c in conventions],
            by(report, dense["kv"]["bytes"]),
            "",
            "",
        ]
    ]
    for schedule, run in rows(report):
        red = run["reduction_vs_dense"]
        body.append(
            [
                schedule["name"],
                policy_cell(run),
                f"{run['avg_visual_tokens']['realized']:.2f}",
                f"{run['avg_visual_tokens']['nominal']:.2f}",
                label_cell(schedule).replace("–", "-"),
                fl(report, run["flops"]["true"]),
                pct(red["true"]),
                fl(report, run["probe_flops"]),
                *[fl(report, run["flops"][c]) for c in conventions],
                by(report, run["kv"]["bytes"]),
                pct(red["kv_bytes"]),
                "OFF-LABEL" if flagged(run) else "",
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    left = {0, 1, len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    model, layout = report["model"], report["layout"]
    title = (
        f"Budget audit: {model['name']}, N={layout['num_visual']} visual + M={layout['num_text']} text tokens, "
        f"decoder only, per sample (* native policy)"
    )
    out = [title]
    if layout.get("image"):
        out.append(f"Image: {layout['image']['note']}")
    out += [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)]
    if not conventions and report["conventions"] != ["true"]:
        out.append("(FastV / PDrop / Nüwa conventions: report.md, or --convention NAME here)")
    if report["flags"]:
        out.append("")
        out += [f"FLAG: {flag['message']}" for flag in report["flags"]]
    trace = report.get("trace")
    if trace:
        reroute = trace["runs"][0]
        per_stage = ", ".join(
            f"L{s['layer']}: {len(s['selected'])} selected / {len(s['readmitted'])} re-admitted / {len(s['deferred'])} deferred"
            for s in reroute["stages"]
        )
        out += ["", f"Traced tiny LLaVA (reroute, {reroute['num_visual']} visual tokens): {per_stage}"]
    out += twig_lines(report)  # [twig.budget]
    return "\n".join(out)
