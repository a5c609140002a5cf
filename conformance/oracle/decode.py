"""Decode: cached decode steps against recomputing the routed forward with the same decisions."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rerouting.reference.routing import KERNELS

from ..impls import Checked
from ..protocol import PrefillOutput
from .inputs import sample_inputs
from .outputs import _compare_rows, _max_error, _max_family, compare_layer_kv, kv_family_errors
from .runs import _REFERENCE, Observation, mca_runs, observe, reference_prefill
from .strategies import Case


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
    tokens = torch.randint(*case.host.text_ids, (steps, B), generator=generator)
    outputs = [
        impl.decode_step(case.model(), case.config, obs.out, tokens[t].to(case.device), t)
        for t in range(steps)
    ]
    return DecodeRun(obs, tokens, [o.logits.detach().cpu() for o in outputs], outputs)


def recompute(
    case: Case, b: int, tokens: torch.Tensor, selections, dtype: torch.dtype, kernel: str = "eager"
) -> PrefillOutput:
    """[cache.decode.equiv] The routed forward over sample b's prompt + ``tokens`` with the given decisions.

    Under the retroactive cache policy the generated tokens see no visual token outside the final selection
    ([cache.policy.retroactive]).
    """
    model = case.model64() if dtype == torch.float64 else case.model_lp()
    inputs = sample_inputs(case, b, tokens)
    generated_from = None
    if case.config.cache == "retroactive" and any(selections):
        generated_from = int(inputs["attention_mask"].sum()) - len(tokens)
    return reference_prefill(model, case.config, inputs, dtype, [selections], kernel, generated_from)


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


def _decode_yardsticks(run: DecodeRun, selections, rows: list[slice]) -> tuple[list, list]:
    """The decode yardsticks: per kernel the low-precision recompute and cached decode, then the MCA draws.

    Returns logits per yardstick ``[b] -> [steps, V]`` and KV per yardstick ``[b][layer]``.
    """
    case, dtype = run.obs.case, run.obs.case.torch_dtype
    steps = run.tokens.shape[0]
    B = len(run.obs.layouts)
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
    return yard_logits, yard_kv


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
    yard_logits, yard_kv = _decode_yardsticks(run, selections, rows)
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
