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

Modules: ``runs`` (reference runs, yardsticks, Monte Carlo arithmetic, :class:`Observation`),
``structure`` (the trace's integer facts), ``scores`` (scores and decisions, the near-tie band),
``outputs`` (logits and KV caches), ``decode``, ``harness`` (``run_check``, ``expect_error``); the
Hypothesis ``strategies``, the ``tolerance`` rule, the FLOP counters (``flops``) and the NVML sampler
(``memory``). The property modules ``rerouting.conformance.test_*`` import the checks from here.
"""

from .decode import DecodeRun, check_decode, incremental_yardstick, recompute, run_decode
from .harness import expect_error, repro, run_check
from .outputs import (
    check_against_host,
    check_kv,
    check_logits,
    compare_layer_kv,
    kv_family_errors,
    row_roles,
)
from .runs import (
    MCA_DRAWS,
    Observation,
    host_forward,
    mca_runs,
    observe,
    reference_prefill,
    yardstick_modes,
)
from .scores import (
    _decisions,
    check_decisions,
    check_own_topk,
    check_scores,
    score_family_error,
    score_tolerance,
)
from .structure import check_structure

__all__ = [
    "MCA_DRAWS",
    "DecodeRun",
    "Observation",
    "_decisions",
    "check_against_host",
    "check_decisions",
    "check_decode",
    "check_kv",
    "check_logits",
    "check_own_topk",
    "check_scores",
    "check_structure",
    "compare_layer_kv",
    "expect_error",
    "host_forward",
    "incremental_yardstick",
    "kv_family_errors",
    "mca_runs",
    "observe",
    "recompute",
    "reference_prefill",
    "repro",
    "row_roles",
    "run_check",
    "run_decode",
    "score_family_error",
    "score_tolerance",
    "yardstick_modes",
]
