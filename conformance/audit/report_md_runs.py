"""The solver and traced-run sections of report.md."""

from __future__ import annotations

from collections.abc import Sequence

from .cells import fmt_num, keep_cell, md_table


def _matched_md(matched: Sequence[dict]) -> str:
    body = []
    for s in matched:
        shape = s["shape"] if isinstance(s["shape"], str) else ", ".join(f"{w:g}" for w in s["shape"])
        release = s.get("release_preset")
        release_cell = "–"
        if release:
            same = "same ratios" if release["same_ratios"] else ", ".join(f"{r:g}" for r in release["ratios"])
            release_cell = f"{release['name']}: {same} → {release['avg_visual_tokens']['realized']:.2f}"
        name = s["family"] or s["name"]
        body.append(
            [
                ("⚠ " if s["flagged"] else "") + name,
                ", ".join(map(str, s["layers"])),
                shape,
                fmt_num(s["target_avg"]),
                f"{'λ' if s['scale_name'] == 'lambda' else 'α'} = {s['scale']:.6f}",
                ", ".join(f"{r:g}" for r in s["ratios"]) + f" ({s['decimals']} dp)",
                ", ".join(map(str, s["k"])),
                f"{s['avg_visual_tokens']['nominal']:.2f}",
                f"{s['avg_visual_tokens']['realized']:.2f}",
                f"{100 * s['realized_deviation']:+.2f}%",
                release_cell,
            ]
        )
    return md_table(
        [
            "family",
            "layers",
            "shape",
            "target avg_T",
            "scale (unrounded)",
            "ratios (rounded)",
            "k (integer)",
            "nominal",
            "realized",
            "realized vs target",
            "release preset: ratios → realized",
        ],
        body,
        "lllrllrrrrl",
    )


def _identical_md(identical: Sequence[dict]) -> str:
    body = []
    for s in identical:
        release = s.get("release_preset")
        twin = "–"
        if release:
            twin = f"{release['name']}: {'same schedule' if release['same_schedule'] else 'differs'}"
        body.append(
            [
                s["baseline"],
                ", ".join(map(str, s["extra_layers"])),
                ", ".join(map(str, s["layers"])),
                keep_cell(s["keep"], s["unit"]),
                "yes" if s["identical_counts"] else "**no**",
                f"{s['avg_visual_tokens']['realized']:.2f}",
                twin,
            ]
        )
    return (
        "**Schedule-identical mode**: the baseline's per-layer counts, plus extra re-scoring decisions "
        "under reroute (each new decision keeps the baseline's value of its stage), so the budgets are "
        "equal layer by layer and only the extra probes cost more.\n\n"
        + md_table(
            [
                "baseline",
                "extra layers",
                "layers",
                "keep",
                "same counts per layer",
                "realized avg_T",
                "release twin",
            ],
            body,
            "lllllrl",
        )
    )


def solver_md(report: dict) -> str:
    solves = report["solver"]
    if not solves:
        return ""
    matched = [s for s in solves if s["kind"] == "matched"]
    identical = [s for s in solves if s["kind"] == "identical"]
    parts = [
        "## Matched-budget solver\n\nGiven decision layers and a shape, the solver finds the scale (α for "
        "relative weights, λ for the geometric shape) whose *nominal* avg_T equals the target, rounds each "
        "ratio to the stated decimals, and reports what the *integer* k then realizes (`[budget.avg-tokens]`)."
    ]
    if matched:
        parts.append(_matched_md(matched))
    if identical:
        parts.append(_identical_md(identical))
    return "\n\n".join(parts)


def _indices(values: Sequence[int]) -> str:
    return ", ".join(map(str, values)) if values else "–"


def trace_md(report: dict, plots: dict) -> str:
    trace = report.get("trace")
    if not trace:
        return "## Traced run\n\nSkipped (`--no-trace`)."
    model = trace["model"]
    arch = model["arch"]
    rows_h, cols_h = model["image_grid"]
    parts = [
        "## Traced run: a real routed prefill on a tiny random LLaVA\n\n"
        f"{model['description']}: {arch['num_layers']} layers, d = {arch['hidden_size']}, H = "
        f"{arch['num_heads']}/{arch['num_kv_heads']}; one image of {rows_h}×{cols_h} patches "
        f"({rows_h * cols_h} visual tokens) between {model['text_runs'][0]} and {model['text_runs'][1]} text "
        f"tokens (model seed {model['model_seed']}, input seed {model['input_seed']}); {trace['implementation']}. "
        f"Schedule: decisions at layers {', '.join(map(str, trace['schedule']['layers']))}, keep "
        f"{keep_cell(trace['schedule']['keep'], trace['schedule']['unit'])}. Visual indices are raster order "
        f"over the patch grid (index = row·{cols_h} + column)."
    ]
    for run in trace["runs"]:
        body = []
        for stage in run["stages"]:
            gone = stage["deferred"] if run["policy"] == "reroute" else stage["removed"]
            body.append(
                [
                    str(stage["stage"]),
                    f"{stage['layers'][0]}–{stage['layers'][1]}",
                    f"{stage['k']} of {len(stage['pool'])}",
                    _indices(stage["continuing"]),
                    _indices(stage["readmitted"]),
                    _indices(gone),
                ]
            )
        third = "deferred (bypass, may return)" if run["policy"] == "reroute" else "removed (for good)"
        checks = (
            f"cache lengths per layer {run['cache_lengths_measured']} "
            f"{'==' if run['cache_matches_trace'] else '!='} trace's M + n_vis(l) {run['kv_lengths']}; "
            f"model-free trace counts {'match' if run['model_free_counts_match'] else 'DIFFER'}"
        )
        parts.append(
            f"**{run['policy']}** ({run['readmitted_total']} re-admissions; {checks}):\n\n"
            + md_table(
                ["stage", "layers", "k of pool", "selected (kept from before)", "re-admitted", third],
                body,
                "lllll" + "l",
            )
        )
    if "trace_heatmap" in plots:
        parts.append(f"![trace heatmap]({plots['trace_heatmap']})")
    return "\n\n".join(parts)
