"""The computations of ``rerouting audit`` (imported by ``cli.main`` after the options are parsed).

Every count comes from a Trace (``schedule_trace`` for the real-size architecture, the reference router
for the tiny model) through ``budget_from_trace`` ([budget.active-counts]); the result is one JSON-ready
dict (schema: docs/audit.md) that the writers in ``report_md``, ``report_tex`` and ``plots`` render.
``run_audit`` runs the steps in order: options, model, layout, schedules (with the solver), budgets,
flags, traced run, report.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rerouting.reference.archs import ArchSpec
from rerouting.reference.flops import kv_decode_growth

from .budgets import audit_run, audit_schedule
from .common import (
    CONVENTION_INFO,
    CONVENTIONS,
    DEFAULT_TEXT,
    DEFAULT_VISUAL,
    LABEL_TOLERANCE,
    SCHEMA_VERSION,
    Progress,
)
from .hosts import image_setting, is_qwen, preset_notes, schedule_groups
from .inputs import (
    KV_DTYPES,
    AuditError,
    AuditSchedule,
    check_fits,
    check_unique,
    parse_layers,
    parse_shape,
    resolve_schedules,
)
from .models import ModelInfo, resolve_model
from .solver import default_solves, identical_schedule, solve
from .trace import traced_run
from .twig import twig_records

# ---------------------------------------------------------------------------------------------
# The audit, step by step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """The token layout, KV dtype, policies and conventions of an audit, each with where it came from."""

    num_visual: int
    visual_source: str
    num_text: int
    text_source: str
    kv_name: str
    kv_source: str
    policies: tuple[str, ...]
    conventions: tuple[str, ...]
    image: dict | None = None  # --image-size: the resized size, grid and N (image_size.image_layout)

    @property
    def kv_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv_name]


def check_options(args: argparse.Namespace) -> tuple[float, ...] | str:
    """The solver options' combinations (argparse checks each alone); returns the parsed ``--shape``."""
    if args.target_avg and args.layers is None:
        raise AuditError(
            "--target-avg needs --layers (the decision layers of the solved schedule), e.g. --layers 2,7,15,23"
        )
    if args.layers is not None and not args.target_avg:
        raise AuditError(f"--layers {args.layers} is only used with --target-avg")
    if (args.identical_to is None) != (args.extra_layers is None):
        raise AuditError(
            "--identical-to and --extra-layers go together (baseline schedule + extra re-scoring layers)"
        )
    if not 0 <= args.decimals <= 8:
        raise AuditError(f"--decimals {args.decimals} must be between 0 and 8")
    if args.shape != "flat" and not args.target_avg:
        raise AuditError(
            f"--shape {args.shape} shapes the solved schedule: it needs --target-avg and --layers"
        )
    shape = parse_shape(args.shape)
    if shape == "identical":
        raise AuditError("--shape identical: use --identical-to BASELINE --extra-layers L,... for that mode")
    return shape


def load_model(value: str, progress: Progress) -> ModelInfo:
    progress(f"model {value}: building on the meta device")
    model: ModelInfo = resolve_model(value)
    arch = model.arch
    progress(
        f"model {model.name}: {model.model_class}, {arch.num_layers} layers, d={arch.hidden_size}, "
        f"H={arch.num_heads}/{arch.num_kv_heads}, hd={arch.head_dim}, m={arch.intermediate_size}"
    )
    return model


def choose_setting(args: argparse.Namespace, model: ModelInfo) -> Setting:
    """N, M and the KV dtype from the options (``--image-size``: the model's resize rule), else the config."""
    image = image_setting(args, model)
    if image is not None:
        num_visual, visual_source = (
            image["num_visual"],
            f"--image-size {args.image_size[0]}x{args.image_size[1]}",
        )
    elif args.visual_tokens is not None:
        num_visual, visual_source = args.visual_tokens, "--visual-tokens"
    elif model.default_visual is not None:
        num_visual, visual_source = model.default_visual, "config image_seq_length"
    else:
        num_visual, visual_source = DEFAULT_VISUAL, "default (the config does not fix it)"
    num_text = args.text_tokens if args.text_tokens is not None else DEFAULT_TEXT
    if args.kv_dtype is not None:
        kv_name, kv_source = args.kv_dtype, "--kv-dtype"
    elif model.config_dtype is not None:
        kv_name, kv_source = model.config_dtype, "checkpoint dtype"
    else:
        kv_name, kv_source = "float16", "default"
    return Setting(
        num_visual=num_visual,
        visual_source=visual_source,
        num_text=num_text,
        text_source="--text-tokens" if args.text_tokens is not None else "default",
        kv_name=kv_name,
        kv_source=kv_source,
        policies=("remove", "reroute") if args.policy == "both" else (args.policy,),
        conventions=CONVENTIONS if args.convention == "all" else (args.convention,),
        image=image,
    )


def solver_schedules(
    args: argparse.Namespace,
    shape: tuple[float, ...] | str,
    arch: ArchSpec,
    num_visual: int,
    schedules: list[AuditSchedule],
) -> list[dict]:
    """``--target-avg`` and ``--identical-to``: the solver records; the schedules they give join ``schedules``."""
    solves: list[dict] = []
    if args.target_avg:
        layers = parse_layers(args.layers, "--layers")
        for target in args.target_avg:
            record, schedule = solve(
                layers, shape, target, arch=arch, num_visual=num_visual, decimals=args.decimals
            )
            solves.append(record)
            schedules.append(schedule)
    if args.identical_to is not None:
        extra = parse_layers(args.extra_layers, "--extra-layers")
        baselines = resolve_schedules([args.identical_to], option="--identical-to")
        check_fits(baselines, arch, num_visual)
        for baseline in baselines:
            record, schedule = identical_schedule(baseline, extra, arch=arch, num_visual=num_visual)
            solves.append(record)
            if baseline.name not in {s.name for s in schedules}:
                schedules.append(baseline)
            schedules.append(schedule)
    return solves


def choose_schedules(
    args: argparse.Namespace,
    shape: tuple[float, ...] | str,
    arch: ArchSpec,
    num_visual: int,
    progress: Progress,
    model_type: str = "",
) -> tuple[list[AuditSchedule], list[dict], list[str]]:
    """The schedules to audit, the solver records and the notes they call for (``release``: the model's own)."""
    solver_requested = bool(args.target_avg) or args.identical_to is not None
    notes: list[str] = []
    groups = schedule_groups(model_type)
    if args.schedule:
        schedules = resolve_schedules(args.schedule, groups=groups)
    elif solver_requested:
        schedules = []
    else:
        schedules = resolve_schedules(["release"], groups=groups)
    check_fits(schedules, arch, num_visual)
    solves = solver_schedules(args, shape, arch, num_visual, schedules)
    if not args.schedule and not solver_requested:
        progress("solver: checking the release's matched-budget ratios at the 192/128/64 tiers")
        solves, solve_notes = default_solves(arch, num_visual, args.decimals, qwen=is_qwen(model_type))
        notes += solve_notes
    check_unique(schedules)
    check_fits(schedules, arch, num_visual)
    notes += preset_notes(schedules, arch, num_visual, model_type)
    return schedules, solves, notes


def audit_budgets(
    schedules: Sequence[AuditSchedule], arch: ArchSpec, setting: Setting, progress: Progress
) -> tuple[dict, list[dict]]:
    """The dense budget, and every schedule's under every policy (reductions against dense)."""
    policies, num_visual, num_text = setting.policies, setting.num_visual, setting.num_text
    progress(
        f"budgets: {len(schedules)} schedule(s) × {len(policies)} polic{'y' if len(policies) == 1 else 'ies'}, N={num_visual}, M={num_text}, KV {setting.kv_name}"
    )
    kv_dtype = setting.kv_dtype
    dense = audit_run(arch, None, num_visual=num_visual, num_text=num_text, kv_dtype=kv_dtype)
    audited = [
        audit_schedule(
            schedule, arch, policies, num_visual=num_visual, num_text=num_text, kv_dtype=kv_dtype, dense=dense
        )
        for schedule in schedules
    ]
    return dense, audited


def label_flags(audited: Sequence[dict]) -> list[dict]:
    """[budget.avg-tokens] Every run whose realized avg_T misses its schedule's label."""
    flags = []
    for entry in audited:
        for run in entry["runs"]:
            check = run["label_check"]
            if check and check["flagged"]:
                flags.append(
                    {
                        "schedule": entry["name"],
                        "policy": run["policy"],
                        "label": check["label"],
                        "realized": run["avg_visual_tokens"]["realized"],
                        "nominal": run["avg_visual_tokens"]["nominal"],
                        "realized_deviation": check["realized_deviation"],
                        "message": (
                            f"{entry['name']} ({run['policy']}): realized avg_T "
                            f"{run['avg_visual_tokens']['realized']:.2f} misses its label {check['label']:g} by "
                            f"{100 * check['realized_deviation']:+.1f}% (tolerance ±{100 * LABEL_TOLERANCE:g}%)"
                        ),
                    }
                )
    return flags


def solver_flags(solves: Sequence[dict]) -> list[dict]:
    """Every solved schedule whose integer k misses the target avg_T."""
    flags = []
    for record in solves:
        if record.get("flagged"):
            flags.append(
                {
                    "schedule": record["name"],
                    "policy": record["native_policy"],
                    "label": record["target_avg"],
                    "realized": record["avg_visual_tokens"]["realized"],
                    "nominal": record["avg_visual_tokens"]["nominal"],
                    "realized_deviation": record["realized_deviation"],
                    "message": (
                        f"solver {record['name']}: integer k gives realized avg_T "
                        f"{record['avg_visual_tokens']['realized']:.2f}, {100 * record['realized_deviation']:+.1f}% "
                        f"from the target {record['target_avg']:g}"
                    ),
                }
            )
    return flags


def off_label_notes(
    flags: Sequence[dict], schedules: Sequence[AuditSchedule], solves: Sequence[dict]
) -> list[str]:
    off_label = {f["schedule"]: f for f in flags if f["schedule"] in {s.name for s in schedules}}
    if not (off_label and solves):
        return []
    listed = ", ".join(f"{name} ({flag['realized']:.2f})" for name, flag in off_label.items())
    return [
        f"Off-label schedules: {listed}. The solver section gives the keep ratios that realize each label."
    ]


def trace_step(progress: Progress) -> dict:
    progress("trace: routed prefill of a tiny random LLaVA (reference implementation, reroute and remove)")
    trace = traced_run()
    counts = trace["runs"][0]
    progress(
        f"trace: {len(counts['stages'])} decisions, {counts['readmitted_total']} re-admissions under reroute"
    )
    return trace


def _command_line(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(["rerouting", "audit", *(shlex.quote(a) for a in argv)])


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("rerouting", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def decode_record(arch: ArchSpec, kv_dtype: torch.dtype) -> dict:
    return {
        "kv_growth_bytes_per_token": kv_decode_growth(arch, kv_dtype),
        "kv_growth_bytes_per_token_by_dtype": {n: kv_decode_growth(arch, dt) for n, dt in KV_DTYPES.items()},
        "lm_head_flops_per_token": 2 * arch.hidden_size * arch.vocab_size,
        "decoder_flops_per_token_note": "decode is never routed: each generated token runs every layer over the whole cache",
    }


def run_audit(args: argparse.Namespace, argv: Sequence[str], progress: Progress) -> dict:
    """Everything the reports show, as one JSON-ready dict (schema: docs/audit.md)."""
    shape = check_options(args)
    model = load_model(args.model, progress)
    arch = model.arch
    setting = choose_setting(args, model)
    schedules, solves, notes = choose_schedules(
        args, shape, arch, setting.num_visual, progress, model.model_type
    )
    dense, audited = audit_budgets(schedules, arch, setting, progress)
    flags = label_flags(audited) + solver_flags(solves)
    notes += off_label_notes(flags, schedules, solves)
    trace = None if args.no_trace else trace_step(progress)
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": {"tool": "rerouting audit", "command": _command_line(argv), **_versions()},
        "model": model.to_dict(),
        "layout": {
            "num_visual": setting.num_visual,
            "num_visual_source": setting.visual_source,
            "num_text": setting.num_text,
            "num_text_source": setting.text_source,
            "visual_start": 0,
            "batch": 1,
            "image": setting.image,
        },
        "kv_dtype": setting.kv_name,
        "kv_dtype_source": setting.kv_source,
        "policies": list(setting.policies),
        "conventions": list(setting.conventions),
        "convention_definitions": CONVENTION_INFO,
        "label_tolerance": LABEL_TOLERANCE,
        "dense": dense,
        "decode": decode_record(arch, setting.kv_dtype),
        "schedules": audited,
        "flags": flags,
        "solver": solves,
        "trace": trace,
        "notes": notes,
        "files": {},
        "twig": twig_records(schedules, arch, setting),  # [twig.budget]
    }


# ---------------------------------------------------------------------------------------------
# Writing the outputs
# ---------------------------------------------------------------------------------------------


def write_outputs(report: dict, out: Path, *, plots: bool, progress: Progress) -> dict[str, str]:
    from . import report_md, report_tex

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if plots:
        try:
            from . import plots as audit_plots
        except ImportError as error:  # matplotlib missing from a hand-made environment
            report["notes"].append(
                f"No PNG plot: matplotlib is not installed ({error}); pip install 'rerouting[plots]'."
            )
            progress("plots: skipped, matplotlib is not installed (pip install 'rerouting[plots]')")
        else:
            progress(
                "plots: staircase of visual tokens per layer" + (", trace heatmap" if report["trace"] else "")
            )
            files.update(audit_plots.write_plots(report, out))
    files.update(
        {
            "markdown": "report.md",
            "json": "report.json",
            "latex": "report.tex",
            "latex_table": "report-table.tex",
            "latex_table_full": "report-table-full.tex",
        }
    )
    report["files"] = files
    report_md.write_markdown(report, out / files["markdown"])
    report_tex.write_latex(
        report, out / files["latex"], out / files["latex_table"], out / files["latex_table_full"]
    )
    write_json(report, out / files["json"])
    return files


def write_json(report: dict, path: Path) -> None:
    """report.json: the whole report dict, integers exact, no NaN (schema: docs/audit.md)."""
    path.write_text(
        json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
