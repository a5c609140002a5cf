"""``rerouting audit``: the budget audit of routing schedules on a real architecture (spec/budget.md).

With no argument it audits the LLaVA-1.5-7B architecture (embedded config, built on the meta device,
no weights) under the Reroute release's schedules (``fastv_K3``, ``ours_vs_fastv``, ``pdrop_earlyL2``,
``ours_vs_pdrop`` at the 192/128/64 tiers), each under both policies, at N = 576 visual and
M = 64 text tokens; checks the matched-budget solver against the release's hand-solved ratios; and
runs one real routed prefill through a tiny random LLaVA with the reference implementation, so the
report also shows a real trace. It writes ``report.md``, ``report.json``, ``report.tex`` (plus the
bare table ``report-table.tex``) and PNG plots into ``--out`` and prints a summary table.

Every count comes from a Trace (``schedule_trace`` for the real-size architecture, the reference
router for the tiny model) through ``budget_from_trace`` ([budget.active-counts]). See docs/audit.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SCHEMA_VERSION = "1.0"
DEFAULT_MODEL = "llava-1.5-7b"
DEFAULT_VISUAL = (
    576  # LLaVA-1.5: 24×24 patches of a 336-px image; used when the config has no image_seq_length
)
DEFAULT_TEXT = 64  # a short LLaVA-1.5 prompt: ~35 system/template tokens + a one-line question
DEFAULT_OUT = "rerouting-audit"
LABEL_TOLERANCE = 0.01  # flag a schedule whose realized avg_T misses its label by more than 1 %
CONVENTIONS = ("true", "fastv", "pdrop", "nuwa")
POLICY_CHOICES = ("remove", "reroute", "both")
KV_DTYPE_NAMES = ("float16", "bfloat16", "float32")


def embedded_models() -> tuple[str, ...]:
    """Names of the embedded architectures (reference/archs/*.json), found without importing torch."""
    spec = importlib.util.find_spec("rerouting.reference")
    if spec is None or not spec.submodule_search_locations:
        return ()
    folder = Path(next(iter(spec.submodule_search_locations))) / "archs"
    return tuple(sorted(p.stem for p in folder.glob("*.json")))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    def __init__(self, message: str):
        super().__init__(message)


class _Exit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` returns the status."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        if message:
            sys.stderr.write(message)
        raise _Exit(status)

    def format_help(self) -> str:
        """The epilog lists the presets, which needs the reference package (torch): built only for --help."""
        from rerouting.reference.schedule import PRESETS

        from .audit_inputs import SCHEDULE_GROUPS

        self.epilog = (
            f"presets: {', '.join(sorted(PRESETS))}\n"
            f"groups: {', '.join(f'{k} ({len(v)} presets)' for k, v in SCHEDULE_GROUPS.items())}\n"
            f"embedded models: {', '.join(embedded_models())}\n"
            "docs: docs/audit.md"
        )
        return super().format_help()


def positive_int(text: str) -> int:
    """argparse ``type`` for token counts: an integer >= 1 (argparse names the option in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be an integer >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse ``type`` for token averages: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rerouting audit",
        description=(
            "Budget audit of visual-token routing schedules: average visual tokens per layer (realized and "
            "nominal), decoder FLOPs in the true count and in the FastV / PDrop / Nüwa conventions, probe "
            "overhead, KV cache, the matched-budget solver, and a real routed trace on a tiny model. "
            "With no option: LLaVA-1.5-7B under the Reroute release's schedules. See docs/audit.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|PATH",
        help=f"embedded architecture ({', '.join(embedded_models())}), a local checkpoint folder with config.json, "
        f"or a config.json file; built on the meta device, no weights (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--schedule",
        action="append",
        default=None,
        metavar="NAME|FILE",
        help="a preset name, a group ('release': the 12 release schedules, the default; 'all': every preset), "
        "or a YAML/JSON file (keys: layers, keep, unit, policy, name, label, scorer); repeatable",
    )
    parser.add_argument(
        "--visual-tokens",
        type=positive_int,
        metavar="N",
        help="visual tokens per sample (default: the config's image_seq_length, else 576)",
    )
    parser.add_argument(
        "--text-tokens",
        type=positive_int,
        metavar="M",
        default=None,
        help=f"text (non-visual) tokens per sample (default: {DEFAULT_TEXT})",
    )
    parser.add_argument(
        "--policy",
        choices=POLICY_CHOICES,
        default="both",
        help="audit each schedule under this policy; 'both' compares remove and reroute (default: both)",
    )
    parser.add_argument(
        "--convention",
        choices=(*CONVENTIONS, "all"),
        default="all",
        help="FLOP convention(s) shown in report.md and report.tex (stdout adds a paper convention only when "
        "one is chosen); report.json always has all four (default: all)",
    )
    parser.add_argument(
        "--kv-dtype",
        choices=KV_DTYPE_NAMES,
        default=None,
        help="KV-cache element type for the byte counts (default: the checkpoint's dtype, else float16)",
    )
    solver = parser.add_argument_group("matched-budget solver")
    solver.add_argument(
        "--target-avg",
        type=positive_float,
        action="append",
        metavar="X",
        help="solve keep ratios whose nominal avg_T is X (repeatable); needs --layers; the solved "
        "schedules are audited too",
    )
    solver.add_argument(
        "--layers",
        metavar="L0,L1,...",
        help="decision layers of the solved schedule, e.g. 2,7,15,23",
    )
    solver.add_argument(
        "--shape",
        default="flat",
        metavar="SHAPE",
        help="'flat' (one ratio at every decision, default), 'geometric' (λ, λ², ... as PDrop), or "
        "relative weights such as 1,1,0.5,0.25 (ratios α·weight)",
    )
    solver.add_argument(
        "--decimals",
        type=int,
        default=4,
        metavar="D",
        help="round solved ratios to D decimals, as the release's configs do (default: 4)",
    )
    solver.add_argument(
        "--identical-to",
        metavar="NAME|FILE",
        help="schedule-identical mode: the baseline schedule whose per-layer counts are kept, with extra "
        "re-scoring decisions at --extra-layers (as the release builds ours_vs_fastv from fastv_K3)",
    )
    solver.add_argument(
        "--extra-layers",
        metavar="L0,L1,...",
        help="the extra decision layers of --identical-to, e.g. 7,15,23",
    )
    parser.add_argument(
        "--no-trace", action="store_true", help="skip the real routed prefill on the tiny model"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plot")
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"output folder, created if needed (default: ./{DEFAULT_OUT}/)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return parser


class Progress:
    """Progress lines on stderr, with the elapsed time."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"audit [{self.elapsed():5.1f}s] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``rerouting audit [options]``: 0 on success, 2 on a bad input (message on stderr, no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _Exit as done:
        return done.status
    except _UsageError as error:
        print(f"{parser.format_usage()}rerouting audit: error: {error}", file=sys.stderr)
        return 2
    progress = Progress(args.quiet)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        print(f"rerouting audit: error: --out {args.out!r} exists and is not a folder", file=sys.stderr)
        return 2
    progress("loading torch and transformers")
    from rerouting.reference.schedule import RoutingError

    from .audit_core import run_audit, write_outputs
    from .audit_inputs import AuditError

    try:
        report = run_audit(args, argv, progress)
        files = write_outputs(report, out, plots=not args.no_plots, progress=progress)
    except (AuditError, RoutingError) as error:
        print(f"rerouting audit: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"rerouting audit: error: cannot write to --out {args.out!r}: {error}", file=sys.stderr)
        return 2
    from .audit_report import summary_table

    try:
        print(summary_table(report), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: the reports are written, nothing else to say
        sys.stderr.close()
        return 0
    listed = ", ".join(sorted(set(files.values())))
    progress(f"done: wrote {listed} into {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CONVENTIONS",
    "DEFAULT_MODEL",
    "DEFAULT_OUT",
    "DEFAULT_TEXT",
    "DEFAULT_VISUAL",
    "LABEL_TOLERANCE",
    "SCHEMA_VERSION",
    "build_parser",
    "embedded_models",
    "main",
]
