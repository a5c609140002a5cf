"""Reference runs of the oracle: the truth (float64), the yardsticks (the reference in the dtype under
test under each kernel, and Monte Carlo arithmetic draws), and :class:`Observation`, one
implementation run with its oracle computed on demand.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from rerouting.reference import RoutingConfig, host_for
from rerouting.reference.host import attention_implementation
from rerouting.reference.routing import KERNELS

from ..impls import Checked, ReferenceImpl
from ..protocol import PrefillOutput
from .strategies import Case
from .structure import check_structure

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
    generated_from: int | None = None,
) -> PrefillOutput:
    extra = {} if generated_from is None else {"generated_from": generated_from}  # [cache.policy.retroactive]
    return _REFERENCE.prefill(
        model,
        config,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        forced_selection=forced,
        image_grid_thw=inputs.get("image_grid_thw"),  # Qwen2.5-VL cases only
        **yardstick_modes(dtype, kernel),
        **extra,
    )


def host_forward(model, inputs: dict, kernel: str = "eager") -> torch.Tensor:
    """The unrouted host forward of one unpadded sample: logits ``[T_b, V]``.

    On Qwen2.5-VL with ``image_grid_thw`` and ``mm_token_type_ids`` (without them its forward silently
    falls back to 1-D positions), so the truth has the model's own mRoPE ids.
    """
    extra = {}
    if "image_grid_thw" in inputs:
        extra["image_grid_thw"] = inputs["image_grid_thw"]
        extra["mm_token_type_ids"] = host_for(model).mm_token_type_ids(inputs["input_ids"])
    with torch.no_grad(), attention_implementation(model, kernel):
        pixels = inputs["pixel_values"]
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=None if pixels is None else pixels.to(model.dtype),
            use_cache=False,
            **extra,
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
            self.inputs["input_ids"],
            self.inputs["attention_mask"],
            image_grid_thw=self.inputs.get("image_grid_thw"),
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
# Monte Carlo arithmetic
# ---------------------------------------------------------------------------------------------


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

    # LLaVA's projector, or Qwen2.5-VL's patch merger: the vision tower's output layer into the decoder
    projector = getattr(model.model, "multi_modal_projector", None) or model.model.visual.merger
    roots = [model.model.language_model, projector]
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
