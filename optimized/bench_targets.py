"""The targets of ``rerouting bench`` and the verdict of a run's rows against them.

``reroute_over_remove``: reroute's timed prefill over remove's at the same per-layer counts (bench.py);
``speedup_over_bound``: the dense/reroute timed ratio over the FLOPs bound, at the smallest keep tier;
``optimized_over_reference``: the reference reroute's time over the optimized one producing the same outputs.
"""

from __future__ import annotations

TARGETS = {
    "reroute_over_remove_max": 1.10,
    "speedup_over_bound_min_at_smallest_tier": 0.7,
    "optimized_over_reference_min": 4.0,
}


def verdict(rows: list[dict]) -> dict:
    """Each target against the measured ratios (worst case over rows)."""
    smallest = min(row["k"] for row in rows)
    worst_ratio = max(row["ratios"]["reroute_over_remove"] for row in rows)
    worst_bound = min(row["ratios"]["speedup_over_bound"] for row in rows if row["k"] == smallest)
    reference = [
        row["ratios"]["reference_over_optimized"]
        for row in rows
        if "reference_over_optimized" in row["ratios"]
    ]
    out = {
        "reroute_over_remove_worst": worst_ratio,
        "reroute_over_remove_ok": worst_ratio <= TARGETS["reroute_over_remove_max"],
        "speedup_over_bound_worst_at_smallest_tier": worst_bound,
        "speedup_over_bound_ok": worst_bound >= TARGETS["speedup_over_bound_min_at_smallest_tier"],
    }
    if reference:
        out["reference_over_optimized_worst"] = min(reference)
        out["reference_over_optimized_ok"] = min(reference) >= TARGETS["optimized_over_reference_min"]
    return out
