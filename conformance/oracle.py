"""The oracle: the reference conditioned on the implementation's own decisions, and the checks.

Runs per example (flash-attention's discipline, aesthetics.md §3 and guideline 5):

- ``out``: the implementation under test, in the dtype and on the device under test;
- ``truth``: the reference in float64 on the same (dtype-rounded) weights and inputs;
- ``yardsticks``: what a plain implementation in the dtype under test errs by: the reference in
  that dtype under each attention kernel (eager, SDPA), and :data:`MCA_DRAWS` Monte Carlo
  arithmetic runs (the float64 reference with rounding noise at the dtype's unit roundoff,
  :func:`_rounding_noise`).

Every reference run is *forced* to the implementation's selections (the reference's
``forced_selection`` mode) once those are shown to be structurally valid: a decision inside the
near-tie band may legitimately differ from the reference's, and the rest of the forward is then
compared under the implementation's own selection.

**Tolerance of a continuous output** (:mod:`.tolerance`): ``max|out - truth| <= 2·e_plain + floor``,
``e_plain`` the largest yardstick error over the output's family in the example (every sample's
logits; every layer's keys, or values), the floor the rounding noise of one add at the output's
magnitude. On tiny tensors one deterministic yardstick can round luckily; the family, the two
kernels and the random MCA draws make ``e_plain`` a steady estimate.

**Near-tie band of a decision.** Scores are fp32 by the spec (``scoring.probe.softmax``), float64
in a float64 run. Let ``t`` be the truth's scores and ``β`` the tolerance the implementation's
scores are held to: ``β = 2·e_plain + floor_s`` with ``e_plain`` the largest yardstick score error
over every decision of the example (low-precision yardsticks score in fp32, as the spec says) and

    floor_s = max( (P + H + Q + 3)·u·max|t| ,  2·max|(t + s - s) - t|_score dtype ),

``u`` the unit roundoff of the score dtype (2^-24 for fp32). The first term is the rounding a
correct probe adds *after* the logits, from fixed inputs: a probability ``p = e_j / Σ_P e_i`` has
relative error at most ``(P - 1)·u`` from summing ``P`` positive terms plus ~``2u`` for ``exp`` and
``u`` for the division (Higham's γ bounds); the mean over ``H`` heads adds ``H·u`` and the mean over
``Q`` query rows ``Q·u`` (sums of non-negative terms, relative bound). Errors *before* the
softmax (the logits' dot products, the hidden states entering the probe after d layers) are what
the yardsticks measure. The second term is the add-and-subtract floor of :mod:`.tolerance`.

If the implementation's scores are within ``β`` of ``t`` and it takes the top-k of its own scores,
its k-th score ``θ'`` lies within ``β`` of the truth's k-th score ``θ`` (order statistics are
1-Lipschitz in the max norm), so a token with ``t_j > θ + 2β`` must be selected and one with
``t_j < θ - 2β`` must not. Tokens with ``|t_j - θ| <= 2β`` form the near-tie band: any choice
among them is accepted. The random scorer has no band: its scores are defined bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from rerouting.reference import RoutingConfig, candidate_pool, capped_k, host_for, select_topk
from rerouting.reference.host import attention_implementation
from rerouting.reference.routing import KERNELS
from rerouting.reference.scoring import probe_size, query_rows

from . import report
from .impls import Checked, ReferenceImpl
from .protocol import CapabilityMissing, ConformanceFailure, PrefillOutput, check, fail
from .strategies import Case, sample_inputs
from .tolerance import compare, rounding_floor

_REFERENCE = ReferenceImpl()


# ---------------------------------------------------------------------------------------------
# Reference runs
# ---------------------------------------------------------------------------------------------


def yardstick_modes(dtype: torch.dtype, kernel: str = "eager") -> dict:
    """The reference's switches for a run in ``dtype`` under ``kernel`` (see ``Reference``'s yardstick modes).

    float64 and float32 are the reference's own computation; a low dtype is only ever a yardstick
    (flash-attention's ``upcast=False``): the same obvious code rounding at every step like a plain
    implementation in that dtype would, still scoring in float32 (the spec's probe logits are fp32), or
    its score error would be bf16 rounding of the score itself. ``kernel`` "sdpa" is the second plain
    implementation (``reorder_ops``): the reference's explicit masks under another rounding order, so an
    implementation on SDPA is held to SDPA's own rounding, not only eager's.
    """
    return {"compute_dtype": dtype, "attention": kernel}


def reference_prefill(
    model,
    config: RoutingConfig,
    inputs: dict,
    dtype: torch.dtype,
    forced: Sequence | None,
    kernel: str = "eager",
) -> PrefillOutput:
    return _REFERENCE.prefill(
        model,
        config,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        forced_selection=forced,
        **yardstick_modes(dtype, kernel),
    )


def host_forward(model, inputs: dict, kernel: str = "eager") -> torch.Tensor:
    """The unrouted host forward of one unpadded sample: logits ``[T_b, V]``."""
    with torch.no_grad(), attention_implementation(model, kernel):
        pixels = inputs["pixel_values"]
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=None if pixels is None else pixels.to(model.dtype),
            use_cache=False,
        )
    return out.logits[0]


# ---------------------------------------------------------------------------------------------
# Observation: one implementation run and its oracle
# ---------------------------------------------------------------------------------------------


class Observation:
    """The implementation's prefill on a case, with the truth and yardstick computed on demand."""

    def __init__(
        self, impl: Checked, case: Case, *, forced: Sequence | None = None, out: PrefillOutput | None = None
    ):
        self.impl, self.case = impl, case
        self.inputs = case.inputs()
        if out is None:
            device_inputs = case.inputs(case.device)
            out = impl.prefill(case.model(), case.config, **device_inputs, forced_selection=forced)
        self.out = out
        self.layouts = host_for(case.model64()).layouts(
            self.inputs["input_ids"], self.inputs["attention_mask"]
        )

    @functools.cached_property
    def selections(self) -> list[list[list[int]]]:
        """The implementation's selections, once the trace's structure is valid."""
        check_structure(self)
        return [[list(map(int, d.selected)) for d in s.decisions] for s in self.out.trace.samples]

    @functools.cached_property
    def truth(self) -> PrefillOutput:
        return reference_prefill(
            self.case.model64(), self.case.config, self.inputs, torch.float64, self.selections
        )

    @functools.cached_property
    def yardstick(self) -> PrefillOutput:
        """The reference in the dtype under test (eager attention): the error a plain implementation makes."""
        case = self.case
        return reference_prefill(case.model_lp(), case.config, self.inputs, case.torch_dtype, self.selections)

    @functools.cached_property
    def yardsticks(self) -> list[PrefillOutput]:
        """The yardstick under every kernel of :data:`KERNELS`, and :data:`MCA_DRAWS` Monte Carlo arithmetic runs.

        Tolerances use the largest family error over all of them.
        """
        case = self.case
        others = [
            reference_prefill(
                case.model_lp(), case.config, self.inputs, case.torch_dtype, self.selections, kernel
            )
            for kernel in KERNELS[1:]
        ]
        mca = mca_runs(
            case,
            lambda: reference_prefill(
                case.model64(), case.config, self.inputs, torch.float64, self.selections
            ),
        )
        return [self.yardstick, *others, *mca]

    @property
    def score_dtype(self) -> torch.dtype:
        return torch.float64 if self.case.torch_dtype == torch.float64 else torch.float32


def observe(impl: Checked, case: Case, **kwargs) -> Observation:
    return Observation(impl, case, **kwargs)


# ---------------------------------------------------------------------------------------------
# Structure of the trace (exact)
# ---------------------------------------------------------------------------------------------


def _keep_rule(config: RoutingConfig) -> str:
    return "schedule.keep-count" if config.schedule.unit == "count" else "schedule.keep-ratio"


def check_structure(obs: Observation) -> None:
    """Every integer fact of the trace: layout, decision layers, pools, k, selection shape, active sets, probe sizes.

    Expected values come from the reference's own rule functions applied to the implementation's
    previous selections; each mismatch names the rule it breaks.
    """
    trace, case, config = obs.out.trace, obs.case, obs.case.config
    schedule = config.schedule
    L = case.host.num_layers
    check(
        len(trace.samples) == len(obs.layouts),
        "layout.batch-independence",
        f"the trace has {len(trace.samples)} samples for a batch of {len(obs.layouts)}",
    )
    check(
        trace.num_layers == L, "schedule.stages", f"trace.num_layers={trace.num_layers}, the decoder has {L}"
    )
    for b, (layout, sample) in enumerate(zip(obs.layouts, trace.samples)):
        where = f"sample {b}"
        check(
            tuple(sample.visual_positions) == layout.visual,
            "layout.visual-set",
            f"{where}: trace visual positions {list(sample.visual_positions)} != image placeholder positions {list(layout.visual)}",
        )
        check(
            sample.num_text == len(layout.text),
            "layout.text-set",
            f"{where}: trace num_text={sample.num_text}, the sample has {len(layout.text)} text tokens",
        )
        check(
            len(sample.active_visual) == L,
            "schedule.stages",
            f"{where}: {len(sample.active_visual)} layers in trace",
        )
        N = len(layout.visual)
        if N == 0:
            check(
                not sample.decisions and not any(sample.active_visual),
                "layout.text-only",
                f"{where} has no visual token but its trace records {len(sample.decisions)} decisions",
            )
            continue
        check(
            len(sample.decisions) == schedule.num_decisions,
            "schedule.decision-layers",
            f"{where}: {len(sample.decisions)} decisions recorded, the schedule has {schedule.num_decisions}",
        )
        selected = None
        for s, decision in enumerate(sample.decisions):
            where = f"sample {b}, decision {s} (layer {schedule.layers[s]})"
            check(
                (decision.layer, decision.stage) == (schedule.layers[s], s),
                "schedule.decision-layers",
                f"{where}: recorded as layer {decision.layer}, stage {decision.stage}",
            )
            pool = candidate_pool(config.policy, N, selected)
            check(
                tuple(decision.pool) == pool,
                "selection.pool",
                f"{where}: pool {list(decision.pool)} != {list(pool)} ({config.policy})",
            )
            target = schedule.keep_count(s, N)
            k = capped_k(target, pool)
            if decision.k != k:
                rule = "selection.pool-cap" if target > len(pool) else _keep_rule(config)
                fail(
                    rule,
                    f"{where}: k={decision.k}, expected {k} (target {target}, pool of {len(pool)}, N={N})",
                )
            chosen = tuple(int(i) for i in decision.selected)
            check(
                len(chosen) == len(set(chosen)) == k,
                "selection.topk",
                f"{where}: selected {list(chosen)} is not {k} distinct tokens",
            )
            check(
                set(chosen) <= set(pool),
                "selection.pool",
                f"{where}: selected {list(chosen)} outside pool {list(pool)}",
            )
            check(
                list(chosen) == sorted(chosen),
                "selection.order",
                f"{where}: selection {list(chosen)} is not in ascending (original) order",
            )
            check(
                tuple(decision.scores.shape) == (N,),
                "scoring.probe.head-mean",
                f"{where}: scores have shape {tuple(decision.scores.shape)}, expected one per visual token ({N},)",
            )
            if config.scorer.kind == "attention":
                n_queries = len(query_rows(layout.text, layout.visual, config.scorer.query))
                keys, queries = probe_size(
                    config.policy, len(layout.text), len(pool), layout.length, n_queries
                )
                check(
                    decision.probe_keys == keys,
                    "scoring.probe.input",
                    f"{where}: probe over {decision.probe_keys} keys, expected {keys} "
                    f"({'every valid token' if config.policy == 'reroute' else 'text + pool'})",
                )
                check(
                    decision.probe_queries == queries,
                    "scoring.probe.query-row"
                    if config.scorer.query == "last"
                    else "scoring.probe.variant-query",
                    f"{where}: {decision.probe_queries} query rows, expected {queries}",
                )
            selected = chosen
        for layer in range(L):
            stage = schedule.stage_of(layer)
            expected = tuple(range(N)) if stage is None else tuple(sample.decisions[stage].selected)
            check(
                tuple(sample.active_visual[layer]) == expected,
                "schedule.dense-prefix" if stage is None else "schedule.stages",
                f"sample {b}, layer {layer}: active visual {list(sample.active_visual[layer])} != {list(expected)} "
                + (
                    "(dense prefix: every visual token)"
                    if stage is None
                    else f"(the selection of decision {stage})"
                ),
            )


# ---------------------------------------------------------------------------------------------
# Scores and decisions
# ---------------------------------------------------------------------------------------------


def score_tolerance(
    truth: torch.Tensor,
    yard: torch.Tensor,
    *,
    keys: int,
    heads: int,
    queries: int,
    dtype: torch.dtype,
    family_error: float = 0.0,
) -> tuple[float, dict[str, float]]:
    """``β`` of the module docstring, with its parts (for messages); ``family_error`` as in :mod:`.tolerance`."""
    t = truth.double()
    if not t.numel():
        return 0.0, {"yardstick": 0.0, "floor": 0.0}
    u = torch.finfo(dtype).eps / 2
    yard_error = max(float((yard.double() - t).abs().max()), family_error)
    floor = max((keys + heads + queries + 3) * u * float(t.abs().max()), rounding_floor(t, dtype))
    return 2.0 * yard_error + floor, {"yardstick": yard_error, "floor": floor}


def _decisions(obs: Observation):
    """(b, s, impl decision, truth decision, yardstick decision) over every decision of the batch."""
    truth, yard = obs.truth.trace, obs.yardstick.trace
    for b, sample in enumerate(obs.out.trace.samples):
        for s, decision in enumerate(sample.decisions):
            yield b, s, decision, truth.samples[b].decisions[s], yard.samples[b].decisions[s]


MCA_DRAWS = 3  # Monte Carlo arithmetic yardsticks per example


@contextlib.contextmanager
def _rounding_noise(model, unit_roundoff: float, seed: int) -> Iterator[None]:
    """Perturb every Linear and RMSNorm of the language model and projector like rounding at unit roundoff ``u``.

    Monte Carlo arithmetic (Stott Parker, 1997) at the *typical* size of rounding errors. A length-n
    dot product rounds n partial sums, each by at most ``u`` times its magnitude; the bounds are
    ``n·u·Σ|w_i x_i|`` (worst case) and ``sqrt(n)·u·Σ|w_i x_i|`` (Higham & Mary 2019, probabilistic),
    but with random-sign terms the partial sums random-walk and the accumulated error is of order
    ``u·Σ_i |w_i x_i|`` (measured: the bounds overshoot the reference's own fp32 error 6x and more).
    So a Linear's output element j gets ``u·(|W||x|)_j·r_j`` and an RMSNorm (a mean of D squares, a
    rsqrt, two products) its output times ``1 + 4u·r``, ``r ~ U(-1, 1)`` from a local generator. A
    float64 run under this noise errs like a plain implementation in a dtype of unit roundoff ``u``,
    and a draw is never "lucky" the way one deterministic rounding of a small output can be.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1

    def linear_hook(module, args, output):
        magnitude = torch.nn.functional.linear(args[0].abs(), module.weight.abs())  # Σ_i |w_ji x_i|
        return output + unit_roundoff * magnitude * uniform(output.shape).to(output.dtype)

    def norm_hook(module, args, output):
        return output * (1 + 4 * unit_roundoff * uniform(output.shape).to(output.dtype))

    roots = [model.model.language_model, model.model.multi_modal_projector]
    handles = []
    for module in (m for root in roots for m in root.modules()):
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif type(module).__name__.endswith("RMSNorm"):
            handles.append(module.register_forward_hook(norm_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mca_runs(case: Case, run: Callable[[], Any]) -> list[Any]:
    """``run()`` (a float64 reference computation) under :data:`MCA_DRAWS` rounding-noise draws at the dtype under test."""
    if case.torch_dtype == torch.float64:
        return []
    u = torch.finfo(case.torch_dtype).eps / 2
    out = []
    for draw in range(MCA_DRAWS):
        with _rounding_noise(case.model64(), u, seed=zlib.crc32(f"{case!r}/{draw}".encode())):
            out.append(run())
    return out


def score_family_error(obs: Observation) -> float:
    """The plain-implementation score error of the example: every yardstick's, max over every decision.

    Scores are few per decision (N, sometimes one), so one deterministic yardstick can round luckily;
    the Monte Carlo arithmetic draws among the yardsticks give the typical error at the dtype.
    """
    if "score_family" not in obs.__dict__:
        errors = [0.0]
        for yard in obs.yardsticks:
            for b, sample in enumerate(yard.trace.samples):
                for s, decision in enumerate(sample.decisions):
                    truth = obs.truth.trace.samples[b].decisions[s].scores.double()
                    if truth.numel():
                        errors.append(float((decision.scores.double() - truth).abs().max()))
        obs.__dict__["score_family"] = max(errors)
    return obs.__dict__["score_family"]


def check_scores(obs: Observation, rule: str) -> None:
    """The implementation's scores: fp32, zero outside the probe's keys, within ``β`` of the truth (random: exact)."""
    scorer = obs.case.config.scorer
    heads = obs.case.host.num_heads
    family = score_family_error(obs)
    for b, s, mine, truth, yard in _decisions(obs):
        where = f"sample {b}, decision {s} (layer {truth.layer})"
        scores = mine.scores.detach().cpu()
        if scorer.kind == "random":
            expected = truth.scores.to(torch.float32)
            if not torch.equal(scores.to(torch.float32), expected):
                i = int((scores.float() != expected).nonzero()[0])
                fail(
                    "scoring.scorer.random",
                    f"{where}: random score of visual token {i} is {float(scores[i])!r}, the seeded draw is "
                    f"{float(expected[i])!r} (torch.Generator seeded {scorer.seed}, one float64 rand(N) per decision, cast to float32)",
                    observed=float(scores[i]),
                    allowed=float(expected[i]),
                )
            continue
        check(
            scores.dtype == obs.score_dtype,
            "scoring.probe.softmax",
            f"{where}: scores are {scores.dtype}, the spec computes them in {obs.score_dtype}",
        )
        outside = (
            [i for i in range(len(scores)) if i not in set(truth.pool)]
            if obs.case.config.policy == "remove"
            else []
        )
        if outside and bool((scores[outside] != 0).any()):
            i = next(i for i in outside if float(scores[i]) != 0)
            fail(
                "scoring.probe.softmax",
                f"{where}: visual token {i} is not a probe key (removed earlier) but scores {float(scores[i])!r}, not 0",
                observed=float(scores[i]),
                allowed=0.0,
            )
        beta, parts = score_tolerance(
            truth.scores,
            yard.scores,
            keys=truth.probe_keys,
            heads=heads,
            queries=truth.probe_queries,
            dtype=obs.score_dtype,
            family_error=family,
        )
        error = (scores.double() - truth.scores.double()).abs()
        if error.numel() and float(error.max()) > beta:
            i = int(error.argmax())
            fail(
                rule,
                f"{where}: score of visual token {i} is {float(scores[i]):.9g}, truth {float(truth.scores[i]):.9g}: "
                f"error {float(error.max()):.3e} > allowed {beta:.3e} (= 2 x reference's own error {parts['yardstick']:.3e} "
                f"+ floor {parts['floor']:.3e})",
                observed=float(error.max()),
                allowed=beta,
            )


def check_own_topk(obs: Observation) -> None:
    """The selection is the top-k of the implementation's own scores, ties to the lower index, ascending."""
    for b, sample in enumerate(obs.out.trace.samples):
        for s, decision in enumerate(sample.decisions):
            scores = decision.scores.detach().cpu()
            expected = select_topk(scores, decision.pool, decision.k)
            chosen = tuple(int(i) for i in decision.selected)
            if chosen == expected:
                continue
            values = scores.tolist()
            extra = sorted(set(chosen) - set(expected))
            missing = sorted(set(expected) - set(chosen))
            tied = any(values[i] == values[j] for i in extra for j in missing)
            fail(
                "selection.tiebreak" if tied else "selection.topk",
                f"sample {b}, decision {s} (layer {decision.layer}): selected {list(chosen)}, the top-{decision.k} of its own "
                f"scores is {list(expected)}; chose {[(i, values[i]) for i in extra]} over {[(j, values[j]) for j in missing]}"
                + (" (equal scores: the lower visual index wins)" if tied else ""),
                observed=str(list(chosen)),
                allowed=str(list(expected)),
            )


def check_decisions(obs: Observation) -> None:
    """Decisions equal the truth's outside the near-tie band ``|t_j - θ| <= 2β`` (module docstring)."""
    heads = obs.case.host.num_heads
    random = obs.case.config.scorer.kind == "random"
    family = 0.0 if random else score_family_error(obs)
    for b, s, mine, truth, yard in _decisions(obs):
        pool = list(truth.pool)
        t = truth.scores.double()
        if random:
            beta = 0.0
        else:
            beta, _ = score_tolerance(
                t[pool],
                yard.scores[pool],
                keys=truth.probe_keys,
                heads=heads,
                queries=truth.probe_queries,
                dtype=obs.score_dtype,
                family_error=family,
            )
        k = truth.k
        theta = float(sorted((float(t[i]) for i in pool), reverse=True)[k - 1]) if k else float("inf")
        chosen = set(int(i) for i in mine.selected)
        must = [i for i in pool if float(t[i]) > theta + 2 * beta and i not in chosen]
        never = [i for i in pool if float(t[i]) < theta - 2 * beta and i in chosen]
        if must or never:
            i = (must or never)[0]
            fail(
                "selection.topk",
                f"sample {b}, decision {s} (layer {truth.layer}): visual token {i} "
                f"{'not selected' if must else 'selected'} with truth score {float(t[i]):.9g}, "
                f"{'above' if must else 'below'} the k-th score {theta:.9g} by {abs(float(t[i]) - theta):.3e}, "
                f"outside the near-tie band 2*beta = {2 * beta:.3e}",
                observed=abs(float(t[i]) - theta),
                allowed=2 * beta,
            )


# ---------------------------------------------------------------------------------------------
# Continuous outputs
# ---------------------------------------------------------------------------------------------


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
        if contents:
            _compare_rows(
                f"{where} {name}",
                rule,
                a.transpose(0, 1),
                t.transpose(0, 1),
                y.transpose(0, 1),
                dtype,
                [f"entry at position {p}" for p in positions],
                family_error=(family or {}).get(name, 0.0),
            )


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecodeRun:
    obs: Observation
    tokens: torch.Tensor  # [steps, B]
    logits: list[torch.Tensor]  # per step [B, V]
    outputs: list[Any]  # DecodeOutput per step


def run_decode(impl: Checked, case: Case, steps: int, token_seed: int) -> DecodeRun:
    """A routed prefill, then ``steps`` decode steps fed drawn tokens (teacher forcing: no argmax discontinuity)."""
    obs = observe(impl, case)
    B = len(case.layout.samples)
    generator = torch.Generator().manual_seed(token_seed)
    tokens = torch.randint(
        4, case.host.llava_config().text_config.vocab_size, (steps, B), generator=generator
    )
    outputs = [
        impl.decode_step(case.model(), case.config, obs.out, tokens[t].to(case.device), t)
        for t in range(steps)
    ]
    return DecodeRun(obs, tokens, [o.logits.detach().cpu() for o in outputs], outputs)


def recompute(
    case: Case, b: int, tokens: torch.Tensor, selections, dtype: torch.dtype, kernel: str = "eager"
) -> PrefillOutput:
    """[cache.decode.equiv] The routed forward over sample b's prompt + ``tokens`` with the given decisions."""
    model = case.model64() if dtype == torch.float64 else case.model_lp()
    return reference_prefill(model, case.config, sample_inputs(case, b, tokens), dtype, [selections], kernel)


def incremental_yardstick(
    case: Case, tokens: torch.Tensor, selections, kernel: str = "eager"
) -> tuple[list[torch.Tensor], list]:
    """The reference decoding from its own cache in the dtype under test: per step logits ``[B, V]``, final KV.

    The same algorithm as a cached implementation (one token against each layer's cache), so its error
    is a yardstick of a decode check next to the low-precision recompute's.
    """
    dtype = case.torch_dtype
    out = reference_prefill(case.model_lp(), case.config, case.inputs(), dtype, selections, kernel)
    steps = [  # the Reference in out.state carries the yardstick modes of the prefill
        _REFERENCE.decode_step(case.model_lp(), case.config, out, tokens[t], t)
        for t in range(tokens.shape[0])
    ]
    return [step.logits for step in steps], steps[-1].kv


def check_decode(run: DecodeRun, rule: str, *, logits: bool = True, kv: bool = False) -> None:
    """Decode logits (and the cache after the last step) == recomputing the routed forward with the same decisions.

    Truth: the float64 recompute over prompt + tokens. Yardsticks: the recompute in the dtype under
    test and the reference's own cached decode in that dtype, each under both kernels; the largest
    family error counts.
    """
    obs, case = run.obs, run.obs.case
    dtype = case.torch_dtype
    steps = run.tokens.shape[0]
    selections = obs.selections
    final_kv = run.obs.impl.decode_kv(run.outputs[-1]) if kv else None
    B = len(obs.layouts)
    truths = [recompute(case, b, run.tokens[:, b], selections[b], torch.float64) for b in range(B)]
    rows = [slice(layout.length, layout.length + steps) for layout in obs.layouts]
    # yardstick logits per kernel and kind: [b] -> [steps, V]; yardstick KV: [b][layer]
    yard_logits, yard_kv = [], []
    for kernel in KERNELS:
        recomputed = [recompute(case, b, run.tokens[:, b], selections[b], dtype, kernel) for b in range(B)]
        yard_logits.append([r.logits[0, rows[b]] for b, r in enumerate(recomputed)])
        yard_kv.append([r.kv[0] for r in recomputed])
        inc_logits, inc_kv = incremental_yardstick(case, run.tokens, selections, kernel)
        yard_logits.append([torch.stack([inc_logits[t][b] for t in range(steps)]) for b in range(B)])
        yard_kv.append(inc_kv)
    noisy = mca_runs(
        case, lambda: [recompute(case, b, run.tokens[:, b], selections[b], torch.float64) for b in range(B)]
    )
    for recomputed in noisy:
        yard_logits.append([r.logits[0, rows[b]] for b, r in enumerate(recomputed)])
        yard_kv.append([r.kv[0] for r in recomputed])
    yards = yard_logits[0]
    family = max(_max_error((y, t.logits[0, r]) for y, t, r in zip(ys, truths, rows)) for ys in yard_logits)
    kv_family = {}
    if final_kv is not None:
        truth_kv = [t.kv[0] for t in truths]
        kv_family = _max_family([kv_family_errors(kv, truth_kv) for kv in yard_kv])
    for b, layout in enumerate(obs.layouts):
        T = layout.length
        if logits:
            out = torch.stack([run.logits[t][b] for t in range(steps)])
            _compare_rows(
                f"decode logits of sample {b}",
                rule,
                out,
                truths[b].logits[0, rows[b]],
                yards[b],
                dtype,
                [f"decode step {t} (position {T + t})" for t in range(steps)],
                family_error=family,
            )
        if final_kv is not None:
            for layer in range(case.host.num_layers):
                compare_layer_kv(
                    final_kv[b][layer],
                    truths[b].kv[0][layer],
                    yard_kv[0][b][layer],
                    dtype,
                    rule,
                    f"sample {b}, layer {layer} after {steps} decode steps",
                    family=kv_family,
                )


# ---------------------------------------------------------------------------------------------
# Errors and the harness
# ---------------------------------------------------------------------------------------------


def expect_error(rule: str, what: str, fn: Callable[[], Any], *, must_mention: Sequence[str]) -> None:
    """``fn()`` must raise a clear error naming one of ``must_mention`` (rule IDs), never run quietly ([routing.errors])."""
    try:
        fn()
    except CapabilityMissing:
        raise
    except Exception as error:  # the implementation's own error type is its choice
        text = str(error)
        check(
            any(m in text for m in must_mention),
            rule,
            f"{what}: raised {type(error).__name__}({text!r}), which names none of the rules {list(must_mention)} "
            "(routing.errors: an error names the value and the rule)",
        )
        return
    fail(rule, f"{what}: no error was raised (no silent fallback)", observed="no error", allowed="an error")


def _suite_module(name: str) -> str:
    # a test module imported by path is "conformance.test_x"; the installed name is "rerouting.conformance.test_x"
    return f"rerouting.{name}" if name.startswith("conformance.") else name


def repro(fn: Callable, impl: Checked, case: Case | None, kwargs: dict) -> str:
    args = ", ".join(
        [f"load_impl({impl.spec!r})"]
        + ([repr(case)] if case is not None else [])
        + [f"{k}={v!r}" for k, v in kwargs.items()]
    )
    return (
        "Reproduce with:\n"
        "    import torch\n"
        "    from rerouting.conformance.impls import load_impl\n"
        "    from rerouting.conformance.strategies import Case, HostSpec, Layout\n"
        "    from rerouting.reference import RoutingConfig, Schedule, Scorer\n"
        f"    from {_suite_module(fn.__module__)} import {fn.__name__}\n"
        f"    {fn.__name__}({args})"
    )


def run_check(fn: Callable, impl: Checked, case: Case | None = None, **kwargs) -> None:
    """Run one example of a property: count it, and attach a reproducer to any failure."""
    report.count_example()
    try:
        if case is None:
            fn(impl, **kwargs)
        else:
            fn(impl, case, **kwargs)
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(repro(fn, impl, case, kwargs))
        raise
