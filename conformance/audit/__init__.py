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

Modules, without an import cycle: ``cli`` (options, ``main``) loads ``core`` (``run_audit`` step by
step, ``write_outputs``), which uses ``budgets``, ``solver`` and ``trace`` (the computations) over
``inputs`` (the model and schedules, validated), and the writers ``report_md`` (+ ``report_md_runs``),
``report_tex``, ``stdout`` and ``plots`` over ``cells`` (units and cells); ``common`` (defaults, names,
progress lines) imports nothing of the package. Only ``cli`` and ``common`` load without torch.
"""

from .cli import build_parser, main
from .common import (
    CONVENTIONS,
    DEFAULT_MODEL,
    DEFAULT_OUT,
    DEFAULT_TEXT,
    DEFAULT_VISUAL,
    LABEL_TOLERANCE,
    SCHEMA_VERSION,
    embedded_models,
)

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
