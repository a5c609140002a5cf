"""Continuous outputs: logits and KV caches within the derived tolerance of :mod:`.tolerance`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from rerouting.reference.routing import KERNELS

from ..protocol import ConformanceFailure, check, fail
from .inputs import sample_inputs
from .runs import Observation, host_forward, mca_runs
from .tolerance import compare


def row_roles(obs: Observation, b: int) -> list[str]:
    """A label per valid position of sample ``b``: text, or a visual token's fate in the last stage."""
    layout, sample = obs.layouts[b], obs.out.trace.samples[b]
    roles = ["text"] * layout.length
    last = sample.decisions[-1].selected if sample.decisions else None
    for i, p in enumerate(layout.visual):
        state = "active" if last is None or i in last else "deferred/removed"
        roles[p] = f"visual {i} ({state} at the last layer)"
    return roles


def _max_error(pairs) -> float:
    """Max |a - b| over (a, b) pairs of tensors (the yardstick's error over a family of outputs)."""
    return max((float((a.double() - b.double()).abs().max()) for a, b in pairs if a.numel()), default=0.0)


def _compare_rows(
    name: str,
    rule: str,
    out,
    truth,
    yard,
    dtype: torch.dtype,
    labels: Sequence[str],
    *,
    family_error: float = 0.0,
) -> None:
    result = compare(out, truth, yard, dtype, family_error=family_error)
    if result.ok:
        return
    per_row = (
        (out.double() - truth.double()).abs().reshape(out.shape[0], -1).amax(dim=1) if out.ndim > 1 else None
    )
    where = ""
    if per_row is not None and len(labels) == out.shape[0]:
        r = int(per_row.argmax())
        where = f" (worst row {r}: {labels[r]})"
    raise ConformanceFailure(
        rule,
        result.describe(name, rule).removeprefix(f"[rule {rule}] ") + where,
        observed=result.error,
        allowed=result.allowed,
    )


def check_logits(
    obs: Observation, rule: str, *, positions: Callable[[int], Sequence[int]] | None = None
) -> None:
    """Logits of valid rows (or of ``positions(b)``) within the derived tolerance ([routing.output])."""
    dtype = obs.case.torch_dtype
    family = _max_error(
        (yard.logits[b, layout.valid], obs.truth.logits[b, layout.valid])
        for yard in obs.yardsticks
        for b, layout in enumerate(obs.layouts)
    )
    for b, layout in enumerate(obs.layouts):
        rows = list(range(layout.length)) if positions is None else list(positions(b))
        if not rows:
            continue
        cols = layout.valid[rows]
        roles = row_roles(obs, b)
        out = obs.out.logits.detach().cpu()[b, cols]
        _compare_rows(
            f"logits of sample {b}",
            rule,
            out,
            obs.truth.logits[b, cols],
            obs.yardstick.logits[b, cols],
            dtype,
            [f"position {rows[r]}, {roles[rows[r]]}" for r in range(len(rows))],
            family_error=family,
        )


def kv_family_errors(yard, truth) -> dict[str, float]:
    """The yardstick's max error over every layer and sample, for keys and for values."""
    pairs = [(y, t) for ys, ts in zip(yard, truth) for y, t in zip(ys, ts)]
    return {
        "keys": _max_error((y.keys, t.keys) for y, t in pairs),
        "values": _max_error((y.values, t.values) for y, t in pairs),
    }


def _max_family(families: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: max(f[key] for f in families) for key in families[0]}


def check_against_host(obs: Observation, rule: str, samples: Sequence[int]) -> None:
    """Logits of ``samples`` == the unrouted host forward (each sample alone, unpadded; both kernels as yardsticks)."""
    case, dtype = obs.case, obs.case.torch_dtype
    inputs = {b: sample_inputs(case, b) for b in samples}
    truths = {b: host_forward(case.model64(), inputs[b]) for b in samples}
    yards = {
        b: [host_forward(case.model_lp(), inputs[b], kernel) for kernel in KERNELS]
        + mca_runs(case, lambda b=b: host_forward(case.model64(), inputs[b]))
        for b in samples
    }
    family = _max_error((y, truths[b]) for b in samples for y in yards[b])
    for b in samples:
        cols = obs.layouts[b].valid
        _compare_rows(
            f"logits of sample {b} vs the unrouted host forward",
            rule,
            obs.out.logits.detach().cpu()[b, cols],
            truths[b],
            yards[b][0],
            dtype,
            [f"position {p}" for p in range(len(cols))],
            family_error=family,
        )


def check_kv(obs: Observation, rule: str, *, contents: bool = True) -> None:
    """Per sample and layer: the cache's positions equal text + the stage's active visual set; K/V within tolerance."""
    dtype = obs.case.torch_dtype
    family = _max_family([kv_family_errors(yard.kv, obs.truth.kv) for yard in obs.yardsticks])
    for b in range(len(obs.layouts)):
        check(len(obs.out.kv) > b, rule, f"no cache for sample {b}")
        check(
            len(obs.out.kv[b]) == obs.case.host.num_layers,
            rule,
            f"sample {b}: cache has {len(obs.out.kv[b])} layers, the decoder {obs.case.host.num_layers}",
        )
        for layer, (mine, truth, yard) in enumerate(zip(obs.out.kv[b], obs.truth.kv[b], obs.yardstick.kv[b])):
            compare_layer_kv(
                mine, truth, yard, dtype, rule, f"sample {b}, layer {layer}", contents=contents, family=family
            )


def compare_layer_kv(
    mine,
    truth,
    yard,
    dtype,
    rule: str,
    where: str,
    *,
    contents: bool = True,
    family: dict[str, float] | None = None,
) -> None:
    positions = [int(p) for p in mine.positions.tolist()]
    expected = [int(p) for p in truth.positions.tolist()]
    if positions != expected:
        extra, missing = sorted(set(positions) - set(expected)), sorted(set(expected) - set(positions))
        fail(
            rule,
            f"{where}: cache holds {len(positions)} entries at positions {positions}, expected {len(expected)} at {expected}"
            + (f" (extra {extra}, missing {missing})" if extra or missing else " (order differs)"),
            observed=len(positions),
            allowed=len(expected),
        )
    compare = {}
    for name, a, t, y in (
        ("keys", mine.keys, truth.keys, yard.keys),
        ("values", mine.values, truth.values, yard.values),
    ):
        a = a.detach().cpu()
        check(
            tuple(a.shape) == tuple(t.shape),
            rule,
            f"{where}: {name} have shape {tuple(a.shape)}, expected [H_kv, n_l, hd] = {tuple(t.shape)}",
        )
        compare[name] = functools.partial(
            _compare_rows,
            f"{where} {name}",
            rule,
            a.transpose(0, 1),
            t.transpose(0, 1),
            y.transpose(0, 1),
            dtype,
            [f"entry at position {p}" for p in positions],
            family_error=(family or {}).get(name, 0.0),
        )
    if contents:
        _compare_keys_then_values(compare["keys"], compare["values"])


def _compare_keys_then_values(keys: Callable[[], None], values: Callable[[], None]) -> None:
    """[routing.active.positions] Keys, then values; keys wrong over right values is a RoPE position bug.

    K and V of a layer come from the same normed input; only the keys are rotated. So keys out of
    tolerance while the values are within it point at the rotary positions, whatever the test's rule.
    """
    try:
        keys()
    except ConformanceFailure as error:
        try:
            values()
        except ConformanceFailure:
            raise error from None
        message = str(error).split("\n")[0].split("] ", 1)[-1]
        raise ConformanceFailure(
            "routing.active.positions",
            f"{message}; the values of this layer match, so the keys' rotary positions differ "
            f"(found by a check of [{error.rule}])",
            observed=error.observed,
            allowed=error.allowed,
        ) from None
    values()
