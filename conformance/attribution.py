"""Root causes and symptoms: which failed checks point at the first broken rule, which follow from it.

One bug fails many checks: a renumbered-RoPE bug fails every test that compares the forward, each
under its own rule. A failure's place in the **order of dependence** is, in turn:

1. *what diverged*, in the order the computation produces it (:data:`EVIDENCE_ORDER`): an exact fact
   of the trace or the cache (``structure``: layout, pools, ``k``, positions, counts, FLOPs, bytes),
   then the KV cache (``kv``), the probe's scores (``scores``), the logits (``logits``) and decoding
   (``decode``): each is computed from the ones before it;
2. the spec file of the failure's rule, in the order the files build on each other
   (:data:`SPEC_ORDER`: layout -> schedule -> scoring -> selection -> routing -> cache -> budget);
3. the rule's place in its file.

Within a test (a Hypothesis ``ExceptionGroup`` of several failures) and over a run, the **root
causes** are the failures naming the rule that comes first; every other failure is a **symptom**.
A failure that names no rule (a crash, a missing capability) is neither: it is listed apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from .rules import spec_definitions

SPEC_ORDER = ("layout.md", "schedule.md", "scoring.md", "selection.md", "routing.md", "cache.md", "budget.md")
EVIDENCE_ORDER = ("structure", "kv", "scores", "logits", "decode")
_EVIDENCE = (  # the oracle's messages for continuous outputs (outputs.py, scores.py, decode.py)
    ("kv", re.compile(r"layer \d+ (keys|values)[^:]*: max error")),
    ("scores", re.compile(r"score of visual token")),
    ("decode", re.compile(r"decode logits")),
    ("logits", re.compile(r"logits of sample")),
)


def evidence(message: str | None) -> str:
    """What diverged, from a failure's message: one of :data:`EVIDENCE_ORDER` (``structure`` if exact)."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    for kind, pattern in _EVIDENCE:
        if pattern.search(first):
            return kind
    return "structure"


def rule_rank(rule: str) -> tuple[int, int]:
    """(spec file's place in :data:`SPEC_ORDER`, the rule's place in spec order); unknown rules last."""
    for index, definition in enumerate(spec_definitions()):
        if definition.id == rule:
            file = SPEC_ORDER.index(definition.file) if definition.file in SPEC_ORDER else len(SPEC_ORDER)
            return file, index
    return len(SPEC_ORDER) + 1, 0


def failure_rank(failure: dict[str, Any]) -> tuple[int, int, int]:
    """A failure's place in the order of dependence (smaller = more upstream)."""
    kind = failure.get("evidence") or evidence(failure.get("message"))
    return (EVIDENCE_ORDER.index(kind), *rule_rank(failure["rule"]))


def first(failures: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The most upstream of ``failures`` that name a rule (None if none does)."""
    named = [f for f in failures if f.get("rule")]
    return min(named, key=failure_rank) if named else None


def attribute(failures: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Split a run's failures (one per failing test, each with its ``rule``) into root causes and symptoms.

    Returns ``root_cause`` (the first rule, or None), ``root_causes`` and ``symptoms`` (each a list of
    ``{"test", "rule"}``) and ``unattributed`` (tests whose failure names no rule).
    """
    failures = list(failures)
    root = first(failures)
    out: dict[str, Any] = {"root_cause": root["rule"] if root else None, "root_causes": [], "symptoms": []}
    out["unattributed"] = [f["test"] for f in failures if not f.get("rule")]
    for failure in failures:
        if failure.get("rule"):
            group = "root_causes" if failure["rule"] == out["root_cause"] else "symptoms"
            out[group].append({"test": failure["test"], "rule": failure["rule"]})
    return out
