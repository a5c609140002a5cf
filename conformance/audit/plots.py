"""PNG plots of ``rerouting audit`` (matplotlib, Agg backend; the optional extra ``rerouting[plots]``).

- ``visual_tokens_per_layer.png``: the staircase of visual tokens entering each decoder layer, one
  panel per budget label (schedules claiming the same avg_T side by side), label as a dotted line.
- ``trace_heatmap.png``: for the traced tiny-LLaVA run, the image's patch grid at each stage, each
  patch coloured selected / re-admitted / deferred / removed; one row per policy.

:func:`plot_trace` draws the same heatmap for a user's own ``Trace`` objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from rerouting.reference.trace import Trace

from .trace import stages_of

STAIRCASE = "visual_tokens_per_layer.png"
HEATMAP = "trace_heatmap.png"
_LINESTYLES = ("-", (0, (5, 3)), "-.", (0, (1.2, 1.2)))
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
# trace states, in colour-map order
STATES = (
    "selected (as at the previous decision)",
    "re-admitted (deferred at the previous decision)",
    "deferred (bypasses the stage, may return)",
    "removed (for good)",
)
_STATE_COLORS = ("#2e8b57", "#f39c12", "#d0d7de", "#3b3b3b")
_STATE_TEXT = ("white", "black", "#444444", "white")


def _groups(report: dict) -> list[tuple[str, list[dict]]]:
    """Schedules grouped by label (largest first); unlabelled ones last."""
    by_label: dict[float | None, list[dict]] = {}
    for schedule in report["schedules"]:
        by_label.setdefault(schedule.get("label"), []).append(schedule)
    labelled = sorted((k for k in by_label if k is not None), reverse=True)
    groups = [(f"label avg_T = {label:g}", by_label[label]) for label in labelled]
    if None in by_label:
        groups.append(("no label", by_label[None]))
    return groups


def plot_staircase(report: dict, path: Path) -> None:
    L = report["model"]["arch"]["num_layers"]
    N = report["layout"]["num_visual"]
    groups = _groups(report) or [("dense only", [])]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    lowest = min(
        [N] + [min(run["visual_counts"]) for _, schedules in groups for s in schedules for run in s["runs"]]
    )
    longest = max([1] + [len(schedules) for _, schedules in groups])
    legend_rows = 1 + sum(len(s["runs"]) for _, schedules in groups for s in schedules) // max(1, len(groups))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(6.4 * ncols, (4.2 + 0.17 * max(longest, legend_rows)) * nrows),
        squeeze=False,
        sharey=True,
    )
    x = list(range(L + 1))
    divisors = (1, 2, 3, 4, 9, 18, 36, 72, 144, 288, 576)
    ticks = sorted({N // k for k in divisors if N // k >= max(1, lowest // 2) and N // k >= 1})
    for ax, (title, schedules) in zip(axes.flat, groups):
        ax.step(x, [N] * (L + 1), where="post", color="#9a9a9a", lw=1.0, label=f"dense: {N}")
        for i, schedule in enumerate(schedules):
            runs = schedule["runs"]
            native = next((r for r in runs if r.get("native")), runs[0])
            others = [r for r in runs if r is not native and r["visual_counts"] != native["visual_counts"]]
            color = _COLORS[i % len(_COLORS)]
            for j, run in enumerate([native, *others]):
                counts = run["visual_counts"]
                flag = " OFF-LABEL" if run.get("label_check") and run["label_check"]["flagged"] else ""
                ax.step(
                    x,
                    [*counts, counts[-1]],
                    where="post",
                    color=color,
                    ls=_LINESTYLES[(i + j) % len(_LINESTYLES)],
                    lw=3.2 if i == 0 and j == 0 else 2.0,
                    label=f"{schedule['name']} ({run['policy']}): avg {run['avg_visual_tokens']['realized']:.2f}{flag}",
                )
        if schedules and schedules[0].get("label") is not None:
            label = schedules[0]["label"]
            ax.axhline(label, color="black", ls=":", lw=1.2)
            ax.annotate(
                f"label {label:g}",
                xy=(L, label),
                xytext=(-4, 3),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize=8,
            )
        ax.set_yscale("log")
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(0, L)
        ax.set_ylim(max(0.8, lowest * 0.7), N * 1.35)
        ax.set_xlabel("decoder layer")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", axis="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False, ncol=1)
    for ax in axes[:, 0]:
        ax.set_ylabel("visual tokens entering the layer (log)")
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    model, layout = report["model"], report["layout"]
    fig.suptitle(
        f"Visual tokens per layer (integer k, realized): {model['name']}, N = {N}, M = {layout['num_text']}",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _state_grid(stage: dict, num_visual: int, side: tuple[int, int]) -> list[list[int]]:
    state = [2] * num_visual  # deferred unless told otherwise
    for i in stage["continuing"]:
        state[i] = 0
    for i in stage["readmitted"]:
        state[i] = 1
    for i in stage["removed"]:
        state[i] = 3
    rows, cols = side
    return [state[r * cols : (r + 1) * cols] for r in range(rows)]


def _draw_stage(ax, stage: dict, run: dict, side: tuple[int, int], cmap: ListedColormap) -> None:
    """One cell of the heatmap: the patch grid of one stage, each patch's index and probe-score rank."""
    grid = _state_grid(stage, run["num_visual"], side)
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(STATES) - 0.5)
    order = sorted(range(run["num_visual"]), key=lambda i: -stage["scores"][i])
    ranks = {i: n + 1 for n, i in enumerate(order)}
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            index = y * side[1] + x
            color = _STATE_TEXT[value]
            ax.text(
                x, y - 0.12, str(index), ha="center", va="center", fontsize=10, color=color, weight="bold"
            )
            in_probe = index in stage["pool"] or run["policy"] == "reroute"
            rank = f"#{ranks[index]}" if in_probe and stage["scores"][index] > 0 else "-"
            ax.text(x, y + 0.26, rank, ha="center", va="center", fontsize=7.5, color=color)
    for boundary in range(1, side[1]):
        ax.axvline(boundary - 0.5, color="white", lw=2)
    for boundary in range(1, side[0]):
        ax.axhline(boundary - 0.5, color="white", lw=2)
    ax.set_xticks([])
    ax.set_yticks([])
    left = (
        f"{len(stage['deferred'])} deferred"
        if run["policy"] == "reroute"
        else f"{len(stage['removed'])} removed"
    )
    counts = f"{len(stage['continuing'])} kept, {len(stage['readmitted'])} back, {left}"
    first, last = stage["layers"]
    span = f"layer {first}" if first == last else f"layers {first}–{last}"
    ax.set_title(f"stage {stage['stage']}: {span}, k = {stage['k']}\n{counts}", fontsize=9)


def plot_trace_heatmap(report: dict, path: Path) -> None:
    """The patch grid at every stage, one row per run (policy); ``report["trace"]`` as the audit builds it."""
    trace = report["trace"]
    side = tuple(trace["model"]["image_grid"])
    runs = trace["runs"]
    nstages = max(len(run["stages"]) for run in runs)
    height = 3.5 * len(runs) + 1.6
    fig, axes = plt.subplots(
        len(runs),
        nstages,
        figsize=(3.1 * nstages + 0.6, height),
        squeeze=False,
        gridspec_kw={"hspace": 0.42, "wspace": 0.08},
    )
    cmap = ListedColormap(_STATE_COLORS)
    for r, run in enumerate(runs):
        for s in range(nstages):
            if s < len(run["stages"]):
                _draw_stage(axes[r, s], run["stages"][s], run, side, cmap)
            else:
                axes[r, s].axis("off")
        axes[r, 0].set_ylabel(run["policy"], fontsize=12, weight="bold")
    handles = [Patch(facecolor=c, edgecolor="#888888", label=n) for c, n in zip(_STATE_COLORS, STATES)]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    schedule = trace["schedule"]
    title = trace.get("title") or (
        f"Tiny random LLaVA, {side[0]}×{side[1]} patches: decisions at layers {schedule['layers']}, "
        f"keep {schedule['keep']}"
    )
    fig.suptitle(
        f"{title}\nnumber = visual index (raster order); #n = probe-score rank at the decision", fontsize=10
    )
    fig.subplots_adjust(left=0.05, right=0.98, top=1 - 1.05 / height, bottom=0.75 / height)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trace(
    traces: Trace | Sequence[Trace],
    path: Path | str,
    *,
    grid: tuple[int, int] | None = None,
    sample: int = 0,
    title: str | None = None,
) -> Path:
    """The trace heatmap of your own routed prefill(s): one row per trace (e.g. a reroute and a remove run).

    ``traces``: ``Trace`` objects from ``Reference(...).prefill``, ``routed_prefill`` or ``route()``'s
    ``router.last_trace``; ``sample`` picks the batch row; ``grid`` is the image's patch grid (rows, columns),
    by default the square root of the sample's N (LLaVA-1.5: 24×24). Returns the path written.
    """
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    runs = []
    for trace in traces:
        if not 0 <= sample < len(trace.samples) or not trace.samples[sample].decisions:
            raise ValueError(
                f"sample {sample}: no routed sample at that index (the batch has {len(trace.samples)})"
            )
        routed = trace.samples[sample]
        bounds = (*(d.layer for d in routed.decisions), trace.num_layers)
        runs.append(
            {
                "policy": trace.policy,
                "num_visual": routed.num_visual,
                "stages": stages_of(routed, trace.policy, bounds),
            }
        )
    n = runs[0]["num_visual"]
    side = grid or (math.isqrt(n), math.isqrt(n))
    if side[0] * side[1] != n or any(run["num_visual"] != n for run in runs):
        raise ValueError(
            f"grid {side} does not hold the {[run['num_visual'] for run in runs]} visual tokens; pass grid=(rows, columns)"
        )
    layers = [d.layer for d in traces[0].samples[sample].decisions]
    view = {"model": {"image_grid": list(side)}, "runs": runs, "schedule": {"layers": layers, "keep": []}}
    view["title"] = title or f"{side[0]}×{side[1]} patches, sample {sample}: decisions at layers {layers}"
    plot_trace_heatmap({"trace": view}, Path(path))
    return Path(path)


def write_plots(report: dict, out: Path) -> dict[str, str]:
    """Write the PNGs into ``out``; returns ``{"staircase": file, "trace_heatmap": file}`` (names only)."""
    files = {}
    plot_staircase(report, out / STAIRCASE)
    files["staircase"] = STAIRCASE
    if report.get("trace"):
        plot_trace_heatmap(report, out / HEATMAP)
        files["trace_heatmap"] = HEATMAP
    return files
