"""report.md of ``rerouting audit``: the setup, flags and budget sections (solver and trace: ``report_md_runs``).

Every writer (here, ``report_tex``, ``stdout``, ``plots``) reads the one report dict built by
``core.run_audit`` (schema in docs/audit.md), so the outputs always show the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from .cells import (
    CONVENTION_TITLES,
    CONVENTION_UNITS,
    G,
    bu,
    by,
    fl,
    flagged,
    fmt_bytes,
    fp,
    keep_cell,
    label_cell,
    md_table,
    pct,
    policy_cell,
    rows,
    stage_lengths,
)
from .report_md_runs import solver_md, trace_md
from .twig import twig_md

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
    table = md_table(
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
            *_image_rows(layout.get("image")),
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


def _image_rows(image: dict | None) -> list[list[str]]:
    """[layout.image-grid] ``--image-size``: the image, its resized size, grid and N."""
    if not image:
        return []
    (w, h), (rw, rh) = image["size"], image["resized"]
    if image["rule"] == "fixed":
        return [["image", f"{w}×{h} px → {rw}×{rh} (fixed crop): N = {image['num_visual']}; {image['note']}"]]
    gh, gw = image["grid_thw"][1:]
    mh, mw = image["merged_grid"]
    return [
        [
            "image",
            f"{w}×{h} px → {rw}×{rh} (smart resize, multiples of {image['factor']}, area in "
            f"[{image['min_pixels']}, {image['max_pixels']}]): grid (1, {gh}, {gw}) patches, {mh}×{mw} merged, "
            f"N = {image['num_visual']}; rule: {image['source']}",
        ]
    ]


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
        + md_table(header, body, "ll" + "r" * 8)
    )


def _conventions_md(report: dict) -> str:
    definitions = report["convention_definitions"]
    shown = report["conventions"]
    table = md_table(
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
        + md_table(header, body, "ll" + "r" * (len(header) - 2))
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
        + md_table(
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
        + md_table(
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
        + md_table(header, body)
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
        solver_md(report),
        trace_md(report, plots),
        twig_md(report),
    ]
    if report["notes"]:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in report["notes"]))
    sections.append(_cite_md(report))
    return "\n\n".join(s for s in sections if s) + "\n"


def write_markdown(report: dict, path: Path) -> None:
    path.write_text(render_markdown(report), encoding="utf-8")
