"""What every part of ``rerouting audit`` shares: the defaults and names, and the progress lines.

Nothing here imports torch, so ``rerouting audit --help`` and the package import stay fast.
"""

from __future__ import annotations

import importlib.util
import sys
import time
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

# How each convention counts, with its source (spec/budget.md). Units: "FLOPs" = 2 per multiply-add.
CONVENTION_INFO: dict[str, dict[str, str]] = {
    "true": {
        "rule": "budget.flops.true",
        "title": "true count",
        "unit": "FLOPs (2 per multiply-add)",
        "tokens": "text + active visual, n_l = M + n_vis(l)",
        "formula": "2n·d·(H + 2H_kv)·hd + 2n·H·hd·d + 4n²·H·hd + 6n·d·m, plus bias adds n·out (GQA, SwiGLU, full n×n attention)",
        "source": "design of record §4; counting rules of torch.utils.flop_counter (2 FLOPs per MAC, full SDPA matrix)",
    },
    "fastv": {
        "rule": "budget.flops.fastv",
        "title": "FastV",
        "unit": "multiply-adds (MACs)",
        "tokens": "text + active visual, n_l = M + n_vis(l)",
        "formula": "4n·d² + 2n²·d + 2n·d·m per layer (2 FFN matrices, MHA-sized projections)",
        "source": "FastV, Chen et al., arXiv 2403.06764, §4.2 Eq. 5; its Table 1 'FLOPs(B)' is this sum divided by L",
    },
    "pdrop": {
        "rule": "budget.flops.pdrop",
        "title": "PDrop",
        "unit": "multiply-adds (MACs)",
        "tokens": "active visual only, n = n_vis(l)",
        "formula": "4n·d² + 2n²·d + 3n·d·m per layer (3 FFN matrices, MHA-sized projections)",
        "source": "PyramidDrop, Xing et al., arXiv 2410.17247, §4.1 Eq. 5",
    },
    "nuwa": {
        "rule": "budget.flops.nuwa",
        "title": "Nüwa",
        "unit": "FLOPs (coefficients of 2 per multiply-add)",
        "tokens": "active visual only, n = n_vis(l)",
        "formula": "8n·d² + 4n²·d + 4n·d·m per layer (2 FFN matrices, MHA-sized projections)",
        "source": "Nüwa, arXiv 2602.02951, App. C Eq. 14 (its text says 1 FLOP = 1 MAC; its coefficients are 2·MAC)",
    },
}


def embedded_models() -> tuple[str, ...]:
    """Names of the embedded architectures (reference/archs/*.json), found without importing torch."""
    spec = importlib.util.find_spec("rerouting.reference")
    if spec is None or not spec.submodule_search_locations:
        return ()
    folder = Path(next(iter(spec.submodule_search_locations))) / "archs"
    return tuple(sorted(p.stem for p in folder.glob("*.json")))


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
