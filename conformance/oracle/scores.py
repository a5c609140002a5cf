"""Scores and decisions: the implementation's scores against the truth, and the near-tie band.

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

import torch

from rerouting.reference import select_topk

from ..protocol import check, fail
from .runs import Observation
from .tolerance import rounding_floor


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
            "scoring.probe.dtype",
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
