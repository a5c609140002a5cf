"""Writers of ``rerouting audit``: report.md, report.json, report.tex (+ report-table.tex), and the stdout table.

Every writer reads the one report dict built by ``audit.run_audit`` (schema in docs/audit.md), so the
four outputs always show the same numbers. Units: T = 1e12 (G, M for small models), MiB = 2**20 bytes (KiB for tiny models).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

T = 1e12
G = 1e9
MiB = 2**20
KiB = 2**10
CONVENTION_TITLES = {"true": "true", "fastv": "FastV", "pdrop": "PDrop", "nuwa": "Nüwa"}
CONVENTION_UNITS = {"true": "FLOPs", "fastv": "MACs", "pdrop": "MACs", "nuwa": "FLOPs"}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def flops_unit(report: dict) -> tuple[float, str]:
    """The FLOP prefix of every table of a report, from its dense decoder count: T, G, M or k."""
    dense = report["dense"]["flops"]["true"]
    for scale, prefix in ((T, "T"), (G, "G"), (1e6, "M")):
        if dense >= scale:
            return scale, prefix
    return 1e3, "k"


def bytes_unit(report: dict) -> tuple[int, str]:
    """The byte unit of every KV table of a report: MiB, or KiB for tiny models."""
    return (MiB, "MiB") if report["dense"]["kv"]["bytes"] >= 10 * MiB else (KiB, "KiB")


def fp(report: dict) -> str:
    """'T', 'G', ...: the FLOP prefix, for headers ("TFLOPs", "T MACs")."""
    return flops_unit(report)[1]


def bu(report: dict) -> str:
    return bytes_unit(report)[1]


def fl(report: dict, value: int | float) -> str:
    return f"{value / flops_unit(report)[0]:.3f}"


def by(report: dict, value: int | float) -> str:
    return f"{value / bytes_unit(report)[0]:.1f}"


def pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def fmt_bytes(value: int) -> str:
    if value >= MiB:
        return f"{value / MiB:.1f} MiB"
    if value >= KiB:
        return f"{value / KiB:g} KiB"
    return f"{value} B"


def fmt_num(value: float) -> str:
    return f"{value:g}"


def rows(report: dict) -> Iterable[tuple[dict, dict]]:
    """(schedule, run) pairs in report order."""
    for schedule in report["schedules"]:
        for run in schedule["runs"]:
            yield schedule, run


def policy_cell(run: dict) -> str:
    return run["policy"] + ("*" if run.get("native") else "")


def flagged(run: dict) -> bool:
    return bool(run.get("label_check") and run["label_check"]["flagged"])


def label_cell(schedule: dict) -> str:
    return "–" if schedule.get("label") is None else fmt_num(schedule["label"])


def keep_cell(values: Sequence[float], unit: str) -> str:
    if unit == "count":
        return ", ".join(str(int(v)) for v in values) + " tokens"
    return ", ".join(f"{v:g}" for v in values)


def stage_lengths(layers: Sequence[int], num_layers: int) -> list[int]:
    bounds = [*layers, num_layers]
    return [b - a for a, b in itertools.pairwise(bounds)]


def _md_table(header: Sequence[str], body: Iterable[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# stdout
# ---------------------------------------------------------------------------------------------


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
    out = [title, line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)]
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
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _setup_md(report: dict) -> str:
    model, arch, layout = report["model"], report["model"]["arch"], report["layout"]
    biases = [
        name
        for name, on in (
            ("q/k/v", arch["attention_bias"]),
            ("o", arch["o_proj_bias"]),
            ("MLP", arch["mlp_bias"]),
        )
        if on
    ]
    source = (
        "embedded config (reference/archs/), no weights"
        if model["source"] == "embedded"
        else f"`{model['source']}`"
    )
    entry = report["dense"]["kv"]["bytes"] // max(1, report["dense"]["kv"]["entries"])
    table = _md_table(
        ["", ""],
        [
            ["architecture", f"{model['name']}: {source}; `{model['model_class']}` built on the meta device"],
            [
                "decoder",
                f"L = {arch['num_layers']} layers, d = {arch['hidden_size']}, H = {arch['num_heads']} query / "
                f"{arch['num_kv_heads']} KV heads, hd = {arch['head_dim']}, m = {arch['intermediate_size']}, "
                f"vocabulary {arch['vocab_size']}, biases: {', '.join(biases) or 'none'}",
            ],
            [
                "layout",
                f"N = {layout['num_visual']} visual tokens ({layout['num_visual_source']}), M = "
                f"{layout['num_text']} text tokens ({layout['num_text_source']}), one sample, no padding",
            ],
            [
                "KV cache",
                f"{report['kv_dtype']} ({report['kv_dtype_source']}): {fmt_bytes(entry)} per entry (one token at one layer)",
            ],
            ["policies", ", ".join(report["policies"]) + " (`*` marks a schedule's native policy)"],
            ["FLOP conventions shown", ", ".join(CONVENTION_TITLES[c] for c in report["conventions"])],
            ["label tolerance", f"±{100 * report['label_tolerance']:g}% of the label, on the realized avg_T"],
        ],
        align="ll",
    )
    return "## Setup\n\n" + table


def _flags_md(report: dict) -> str:
    if not report["flags"]:
        body = "None: every labelled schedule realizes its label within the tolerance."
    else:
        body = "\n".join(f"- **OFF-LABEL** {flag['message']}" for flag in report["flags"])
    return (
        "## Flags\n\nA schedule is flagged when its realized average of visual tokens per layer (integer k, "
        "[budget.avg-tokens]) misses the budget it is labelled with (`avgNN` in its name, `label` in its "
        "file, or the solver's target) by more than the tolerance.\n\n" + body
    )


def _summary_md(report: dict) -> str:
    kv = report["kv_dtype"]
    header = [
        "schedule",
        "policy",
        "avg_T realized",
        "avg_T nominal",
        "label",
        f"decoder {fp(report)}FLOPs (true)",
        "−% vs dense",
        f"probe {fp(report)}FLOPs",
        f"KV {bu(report)} ({kv})",
        "−% vs dense",
    ]
    dense = report["dense"]
    body = [
        [
            "dense (unrouted)",
            "–",
            f"{dense['avg_visual_tokens']['realized']:.2f}",
            f"{dense['avg_visual_tokens']['nominal']:.2f}",
            "–",
            fl(report, dense["flops"]["true"]),
            "",
            "0",
            by(report, dense["kv"]["bytes"]),
            "",
        ]
    ]
    for schedule, run in rows(report):
        name = f"**{schedule['name']}** ⚠" if flagged(run) else schedule["name"]
        red = run["reduction_vs_dense"]
        body.append(
            [
                name,
                policy_cell(run),
                f"{run['avg_visual_tokens']['realized']:.2f}",
                f"{run['avg_visual_tokens']['nominal']:.2f}",
                label_cell(schedule),
                fl(report, run["flops"]["true"]),
                pct(red["true"]),
                fl(report, run["probe_flops"]),
                by(report, run["kv"]["bytes"]),
                pct(red["kv_bytes"]),
            ]
        )
    return (
        "## Summary\n\nPer sample, prefill, decoder only (probes, LM head and vision tower apart). avg_T is the "
        "mean over all layers of the visual tokens entering each layer: *realized* with the integer k that "
        "runs, *nominal* with the real-valued N·r. ⚠ = off-label (see Flags).\n\n"
        + _md_table(header, body, "ll" + "r" * 8)
    )


def _conventions_md(report: dict) -> str:
    definitions = report["convention_definitions"]
    shown = report["conventions"]
    table = _md_table(
        ["convention", "unit", "tokens counted", "per-layer formula (n tokens)", "source", "rule"],
        [
            [
                CONVENTION_TITLES[name],
                info["unit"],
                info["tokens"],
                info["formula"],
                info["source"],
                f"`[{info['rule']}]`",
            ]
            for name, info in definitions.items()
            if name in shown
        ],
        align="llllll",
    )
    header = ["schedule", "policy"]
    for c in shown:
        header.append(f"{CONVENTION_TITLES[c]} ({fp(report)} {CONVENTION_UNITS[c]})")
        if c == "fastv":
            header.append("FastV per-layer avg (G MACs)")  # FastV's Table 1 'FLOPs(B)'
        header.append("−%")
    L = report["model"]["arch"]["num_layers"]

    def cells(run: dict, reduction: dict | None) -> list[str]:
        out = []
        for c in shown:
            out.append(fl(report, run["flops"][c]))
            if c == "fastv":
                out.append(f"{run['flops']['fastv'] / L / G:.2f}")
            out.append("" if reduction is None else pct(reduction[c]))
        return out

    body = [["dense (unrouted)", "–", *cells(report["dense"], None)]]
    body += [[s["name"], policy_cell(r), *cells(r, r["reduction_vs_dense"])] for s, r in rows(report)]
    return (
        "## FLOPs by convention\n\nThe papers count differently; each column below applies one paper's "
        "convention as published, so a published table can be reproduced from these inputs. Only the true "
        "count is a FLOP count of what runs.\n\n"
        + table
        + "\n\n"
        + _md_table(header, body, "ll" + "r" * (len(header) - 2))
    )


def _tokens_md(report: dict, plots: dict) -> str:
    L = report["model"]["arch"]["num_layers"]
    body = []
    for schedule, run in rows(report):
        if not run.get("native") and len(report["policies"]) > 1:
            ks_other = [d["k"] for d in run["decisions"]]
            native = (
                next(r for r in schedule["runs"] if r.get("native"))
                if any(r.get("native") for r in schedule["runs"])
                else None
            )
            if native is not None and [d["k"] for d in native["decisions"]] == ks_other:
                continue  # same counts as the native policy: one row is enough
        body.append(
            [
                schedule["name"],
                policy_cell(run),
                ", ".join(map(str, schedule["layers"])),
                keep_cell(schedule["keep"], schedule["unit"]),
                ", ".join(str(d["k"]) for d in run["decisions"]),
                ", ".join(f"{d['k_nominal']:.2f}" for d in run["decisions"]),
                f"{schedule['layers'][0]} + " + ", ".join(map(str, stage_lengths(schedule["layers"], L))),
            ]
        )
    text = (
        "## Visual tokens per layer\n\nk is the integer count each decision keeps (`max(1, floor(N·r))`, capped "
        "by the pool under remove); N·r the nominal target. Stage lengths are the dense prefix, then the "
        "layers of each stage. A policy is listed once when both give the same counts.\n\n"
        + _md_table(
            [
                "schedule",
                "policy",
                "decision layers",
                "keep",
                "k (integer)",
                "N·r (nominal)",
                "dense + stage lengths",
            ],
            body,
            "lllllll",
        )
    )
    if "staircase" in plots:
        text += f"\n\n![visual tokens per layer]({plots['staircase']})"
    return text


def _probes_md(report: dict) -> str:
    layout = report["layout"]
    body = []
    for schedule, run in rows(report):
        per = "; ".join(
            f"L{d['layer']}: P={d['probe_keys']}, {d['probe_flops'] / G:.2f} G" for d in run["decisions"]
        )
        body.append(
            [
                schedule["name"],
                policy_cell(run),
                per,
                fl(report, run["probe_flops"]),
                pct(run["probe_share_of_decoder"]),
            ]
        )
    return (
        "## Probe overhead per decision\n\nThe attention probe of each decision is counted apart from the decoder "
        "(`[budget.flops.probe]`, 2 FLOPs per multiply-add): `2·P·d·H_kv·hd` (k over the P keys) + "
        "`2·Q·d·H·hd` (q over the Q query rows) + `2·Q·P·H·hd` (scores), Q = 1. **reroute** probes every "
        f"valid token (P = M + N = {layout['num_text'] + layout['num_visual']}); **remove** probes the text and the "
        "surviving pool only (P = M + |pool|). The release computes q for every token (about twice the cost); "
        "the papers' convention FLOPs leave probes out.\n\n"
        + _md_table(
            [
                "schedule",
                "policy",
                "per decision: layer, keys P, GFLOPs",
                f"total {fp(report)}FLOPs",
                "% of decoder",
            ],
            body,
            "lllrr",
        )
    )


def _kv_md(report: dict) -> str:
    dense = report["dense"]
    names = list(dense["kv"]["bytes_by_dtype"])
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(dense["kv"]["bytes_by_dtype"][name] // max(1, dense["kv"]["entries"]), []).append(
            name
        )
    columns = [(size, "/".join(group)) for size, group in groups.items()]
    header = (
        ["schedule", "policy", "entries (Σ layers)"]
        + [f"{bu(report)} {label}" for _, label in columns]
        + ["−% vs dense"]
    )

    def cells(run: dict) -> list[str]:
        return [str(run["kv"]["entries"])] + [by(report, run["kv"]["entries"] * size) for size, _ in columns]

    body = [["dense (unrouted)", "–", *cells(dense), ""]]
    body += [
        [s["name"], policy_cell(r), *cells(r), pct(r["reduction_vs_dense"]["kv_bytes"])]
        for s, r in rows(report)
    ]
    decode = report["decode"]
    growth = ", ".join(
        f"{fmt_bytes(v)} in {k}" for k, v in decode["kv_growth_bytes_per_token_by_dtype"].items()
    )
    L = report["model"]["arch"]["num_layers"]
    return (
        "## KV cache\n\nAfter prefill layer l holds M + n_vis(l) entries (`[budget.kv.entries]`), each "
        "`2 · H_kv · hd · bytes` (`[budget.kv.bytes]`). The selected dtype is "
        f"**{report['kv_dtype']}**.\n\n"
        + _md_table(header, body)
        + f"\n\n**Growth per generated token** (`[budget.kv.decode-growth]`): decode is never routed, so each "
        f"token adds one entry at each of the {L} layers whatever the schedule: {growth}. After t tokens the "
        "cache holds the prefill bytes above plus t times this."
    )


def _lm_head_md(report: dict) -> str:
    dense, layout, decode = report["dense"], report["layout"], report["decode"]
    return (
        "## LM head (apart from the decoder)\n\n"
        f"Prefill over all M + N = {layout['num_text'] + layout['num_visual']} positions: "
        f"{fl(report, dense['lm_head_flops'])} {fp(report)}FLOPs (`2·(M+N)·d·W`, as `transformers` computes logits for every "
        f"position); per generated token: {decode['lm_head_flops_per_token'] / G:.3f} GFLOPs (`2·d·W`). Routing "
        "does not change it, and no decoder column above includes it."
    )


def _solver_md(report: dict) -> str:
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
        body = []
        for s in matched:
            shape = s["shape"] if isinstance(s["shape"], str) else ", ".join(f"{w:g}" for w in s["shape"])
            release = s.get("release_preset")
            release_cell = "–"
            if release:
                same = (
                    "same ratios"
                    if release["same_ratios"]
                    else ", ".join(f"{r:g}" for r in release["ratios"])
                )
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
        parts.append(
            _md_table(
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
        )
    if identical:
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
        parts.append(
            "**Schedule-identical mode**: the baseline's per-layer counts, plus extra re-scoring decisions "
            "under reroute (each new decision keeps the baseline's value of its stage), so the budgets are "
            "equal layer by layer and only the extra probes cost more.\n\n"
            + _md_table(
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
    return "\n\n".join(parts)


def _indices(values: Sequence[int]) -> str:
    return ", ".join(map(str, values)) if values else "–"


def _trace_md(report: dict, plots: dict) -> str:
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
            + _md_table(
                ["stage", "layers", "k of pool", "selected (kept from before)", "re-admitted", third],
                body,
                "lllll" + "l",
            )
        )
    if "trace_heatmap" in plots:
        parts.append(f"![trace heatmap]({plots['trace_heatmap']})")
    return "\n\n".join(parts)


def _cite_md(report: dict) -> str:
    gen = report["generator"]
    return (
        "## Reproduce and cite\n\n"
        f"Reproduce with `{gen['command']}` (rerouting {gen['rerouting']}, torch {gen['torch']}, transformers "
        f"{gen['transformers']}). Every number is exact integer arithmetic on the architecture's shapes and the "
        "trace's counts (spec/budget.md); `report.json` holds the exact integers. When citing, state the "
        "convention (true count, or FastV / PDrop / Nüwa as published), the token layout (N, M), whether probes "
        "are included, and the KV dtype; see docs/audit.md."
    )


def render_markdown(report: dict) -> str:
    plots = {k: v for k, v in report.get("files", {}).items() if k in ("staircase", "trace_heatmap")}
    gen = report["generator"]
    sections = [
        f"# Budget audit: {report['model']['name']}\n\n`{gen['command']}` · rerouting {gen['rerouting']} · "
        f"report schema {report['schema_version']}",
        _setup_md(report),
        _flags_md(report),
        _summary_md(report),
        _conventions_md(report),
        _tokens_md(report, plots),
        _probes_md(report),
        _kv_md(report),
        _lm_head_md(report),
        _solver_md(report),
        _trace_md(report, plots),
    ]
    if report["notes"]:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in report["notes"]))
    sections.append(_cite_md(report))
    return "\n\n".join(s for s in sections if s) + "\n"


def write_markdown(report: dict, path: Path) -> None:
    path.write_text(render_markdown(report), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def write_json(report: dict, path: Path) -> None:
    """report.json: the whole report dict, integers exact, no NaN (schema: docs/audit.md)."""
    path.write_text(
        json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------
# LaTeX
# ---------------------------------------------------------------------------------------------

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))
    return (
        out.replace("ü", r"\"u")
        .replace("−", "--")
        .replace("–", "--")
        .replace("λ", r"$\lambda$")
        .replace("α", r"$\alpha$")
    )


def _tex_pct(fraction: float | None) -> str:
    return "--" if fraction is None else f"{100 * fraction:.1f}\\%"


def render_latex_table(report: dict) -> str:
    """The main budget table as a ``table`` environment (booktabs), for ``\\input`` in a paper."""
    conventions = [c for c in report["conventions"] if c != "true"]
    kv = report["kv_dtype"]
    layout, model = report["layout"], report["model"]
    ncols = 9 + len(conventions)
    spec = "ll" + "r" * (ncols - 2)
    head = [
        "Schedule",
        "Policy",
        r"$\bar{T}$ real.",
        r"$\bar{T}$ nom.",
        f"{fp(report)}FLOPs",
        r"$\Delta$",
        "Probe",
        *[f"{tex_escape(CONVENTION_TITLES[c])}" for c in conventions],
        f"KV {bu(report)}",
        r"$\Delta$",
    ]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
    ]
    dense = report["dense"]
    lines.append(
        " & ".join(
            [
                "Dense",
                "--",
                f"{dense['avg_visual_tokens']['realized']:.2f}",
                f"{dense['avg_visual_tokens']['nominal']:.2f}",
                fl(report, dense["flops"]["true"]),
                "--",
                "0",
                *[fl(report, dense["flops"][c]) for c in conventions],
                by(report, dense["kv"]["bytes"]),
                "--",
            ]
        )
        + r" \\"
    )
    previous = None
    for schedule, run in rows(report):
        if previous is not None and schedule["name"] != previous:
            lines.append(r"\addlinespace[2pt]")
        previous = schedule["name"]
        name = tex_escape(schedule["name"]) + (r"\textsuperscript{\dag}" if flagged(run) else "")
        policy = tex_escape(run["policy"]) + ("$^{*}$" if run.get("native") else "")
        red = run["reduction_vs_dense"]
        lines.append(
            " & ".join(
                [
                    name,
                    policy,
                    f"{run['avg_visual_tokens']['realized']:.2f}",
                    f"{run['avg_visual_tokens']['nominal']:.2f}",
                    fl(report, run["flops"]["true"]),
                    _tex_pct(red["true"]),
                    fl(report, run["probe_flops"]),
                    *[fl(report, run["flops"][c]) for c in conventions],
                    by(report, run["kv"]["bytes"]),
                    _tex_pct(red["kv_bytes"]),
                ]
            )
            + r" \\"
        )
    units = ", ".join(
        f"{tex_escape(CONVENTION_TITLES[c])} in {fp(report)} {CONVENTION_UNITS[c]}" for c in conventions
    )
    caption = (
        f"Budget of {tex_escape(model['name'])} per sample ($N={layout['num_visual']}$ visual, "
        f"$M={layout['num_text']}$ text tokens), prefill, decoder only. $\\bar{{T}}$: average visual tokens per "
        "layer, realized (integer $k$) and nominal ($N r$). "
        f"{fp(report)}FLOPs: true count, 2 FLOPs per multiply-add; "
        f"Probe: routing probes, {fp(report)}FLOPs, not in the decoder count{'; ' + units if units else ''}. "
        f"KV: cache after prefill in {tex_escape(kv)}. $\\Delta$: reduction vs dense. $^{{*}}$ native policy. "
        f"\\dag\\ realized $\\bar{{T}}$ misses the schedule's label by more than "
        f"{100 * report['label_tolerance']:g}\\%. Generated by \\texttt{{rerouting audit}}."
    )
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        f"\\caption{{{caption}}}",
        r"\label{tab:rerouting-audit}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def render_latex_solver(report: dict) -> str:
    matched = [s for s in report["solver"] if s["kind"] == "matched"]
    if not matched:
        return ""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{lllrllrr}",
        r"\toprule",
        r"Family & Layers & Shape & Target & Scale & Ratios & Nominal & Realized \\",
        r"\midrule",
    ]
    for s in matched:
        shape = s["shape"] if isinstance(s["shape"], str) else ", ".join(f"{w:g}" for w in s["shape"])
        scale = ("$\\lambda$" if s["scale_name"] == "lambda" else "$\\alpha$") + f" = {s['scale']:.4f}"
        lines.append(
            " & ".join(
                [
                    tex_escape(s["family"] or s["name"])
                    + (r"\textsuperscript{\dag}" if s["flagged"] else ""),
                    ", ".join(map(str, s["layers"])),
                    tex_escape(shape),
                    fmt_num(s["target_avg"]),
                    scale,
                    ", ".join(f"{r:g}" for r in s["ratios"]),
                    f"{s['avg_visual_tokens']['nominal']:.2f}",
                    f"{s['avg_visual_tokens']['realized']:.2f}",
                ]
            )
            + r" \\"
        )
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        "\\caption{Matched-budget solver: keep ratios whose nominal $\\bar{T}$ equals the target, rounded to "
        f"{matched[0]['decimals']} decimals; realized $\\bar{{T}}$ with integer $k = \\max(1, \\lfloor N r\\rfloor)$.}}",
        r"\label{tab:rerouting-solver}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def render_latex_document(report: dict) -> str:
    return "\n".join(
        [
            r"\documentclass[10pt]{article}",
            r"\usepackage[T1]{fontenc}",
            r"\usepackage[a4paper,landscape,margin=1.5cm]{geometry}",
            r"\usepackage{booktabs}",
            r"\begin{document}",
            f"% {report['generator']['command']}",
            render_latex_table(report),
            render_latex_solver(report),
            r"\end{document}",
            "",
        ]
    )


def write_latex(report: dict, document: Path, table: Path) -> None:
    """report.tex compiles as is (pdflatex); report-table.tex is the bare table for ``\\input``."""
    document.write_text(render_latex_document(report), encoding="utf-8")
    table.write_text(render_latex_table(report), encoding="utf-8")
