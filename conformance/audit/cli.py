"""``rerouting audit`` command line: the options (argparse) and ``main``.

``main`` parses and checks the options here, without torch; the computations (``core``) and the writers
load torch, transformers and matplotlib only once the options are valid.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import (
    CONVENTIONS,
    DEFAULT_MODEL,
    DEFAULT_OUT,
    DEFAULT_TEXT,
    KV_DTYPE_NAMES,
    POLICY_CHOICES,
    Progress,
    embedded_models,
)
from .image_size import parse_image_size

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
        from rerouting.reference.presets import PRESETS

        from .inputs import SCHEDULE_GROUPS

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
        help="a preset name, a group ('release': the 12 release schedules of the model's family, the default; "
        "'qwen25vl_release': the Qwen ones on any model; 'all': every preset), "
        "or a YAML/JSON file (keys: layers, keep, unit, policy, name, label, scorer); repeatable",
    )
    parser.add_argument(
        "--visual-tokens",
        type=positive_int,
        metavar="N",
        help="visual tokens per sample (default: the config's image_seq_length, else 576)",
    )
    parser.add_argument(
        "--image-size",
        type=parse_image_size,
        metavar="WxH",
        help="instead of --visual-tokens: an image of W x H pixels; the model's resize rule decides N (Qwen2-VL/"
        "Qwen2.5-VL: smart resize to multiples of 28, N = (h/28)·(w/28); LLaVA-1.5: a fixed 336x336 crop, 576)",
    )
    parser.add_argument(
        "--min-pixels",
        type=positive_int,
        metavar="P",
        help="Qwen smart resize: the smallest resized area (default: the processor's 56·56 = 3136)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        metavar="P",
        help="Qwen smart resize: the largest resized area (default: the processor's 28·28·1280 = 1003520; "
        "the Reroute release uses 451584 = 576·28²)",
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

    from .core import run_audit, write_outputs
    from .inputs import AuditError

    try:
        report = run_audit(args, argv, progress)
        files = write_outputs(report, out, plots=not args.no_plots, progress=progress)
    except (AuditError, RoutingError) as error:
        print(f"rerouting audit: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"rerouting audit: error: cannot write to --out {args.out!r}: {error}", file=sys.stderr)
        return 2
    from .stdout import summary_table

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
