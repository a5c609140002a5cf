"""Measured FLOPs of what an implementation actually ran, by two independent counters, per decoder layer.

**What is traced.** During the implementation's routed prefill a forward pre-hook on each of the
host's decoder layers records every call (its positional and keyword tensors, and the attention
implementation in force). Afterwards each recorded call is replayed, alone, inside a small module
that takes its tensors positionally, and traced by fvcore (``torch.jit``): one trace per layer call,
so the count is per layer by construction, and nothing outside the layer (probe, gathers, LM head)
can leak into it. The cache argument (``cache`` or ``past_key_values``) is dropped and ``use_cache`` turned off for the replay: a
prefill call starts from an empty layer cache, so the attention sees the same keys either way.

**Counter 1: fvcore** (``FlopCountAnalysis``; 1 multiply-add = 1 flop, doubled here). fvcore has
no handle for ``aten::scaled_dot_product_attention``; :func:`sdpa_macs` counts
``B·H·Lq·Lk·(Dqk + Dv)`` multiply-adds with ``H`` the *query* heads (GQA counted at query heads, the
full ``Lq × Lk`` matrix: what dense kernels execute). Every other op fvcore meets must be either
counted by its own handle (``linear``, ``matmul``, ``bmm``, ``einsum``, ...) or be one of
:data:`ZERO_COST_OPS`, declared zero on purpose: elementwise work (norms, RoPE, softmax, SiLU,
residual adds, masking) and data movement (gathers, scatters, indexing, ``topk``, ``sort``),
exactly the ops the spec's true count sets to zero (``budget.flops.true``). fvcore already ignores
``aten::gather``/``aten::index``; we say so explicitly for the rest. An op outside both lists fails
the check by name instead of being silently counted as zero.

**Counter 2: ``torch.utils.flop_counter.FlopCounterMode``** (2 FLOPs per multiply-add) around the
live prefill; per-layer attribution from the same decoder-layer hooks (count before and after each
call). On CPU, SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch
2.13 has no formula for (pytorch/pytorch#195460): :data:`CPU_SDPA_MAPPING` adds one.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rerouting.reference.compat import CACHE_NAMES

ELEMENTWISE_ZERO = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::neg",
    "aten::pow", "aten::rsqrt", "aten::sqrt", "aten::mean", "aten::sum", "aten::exp", "aten::silu", "aten::gelu",
    "aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::tanh", "aten::sigmoid", "aten::where",
    "aten::masked_fill", "aten::masked_fill_", "aten::clamp", "aten::eq", "aten::ne", "aten::lt", "aten::le",
    "aten::gt", "aten::ge", "aten::logical_and", "aten::logical_or", "aten::logical_not", "aten::bitwise_not",
    "aten::bitwise_and", "aten::bitwise_or", "aten::any", "aten::all", "aten::amax", "aten::max", "aten::min",
    "aten::cumsum", "aten::fill_", "aten::zero_", "aten::dropout", "aten::type_as", "aten::scalar_tensor",
)  # fmt: skip
DATA_MOVEMENT_ZERO = (
    "aten::gather", "aten::index", "aten::index_select", "aten::index_put_", "aten::index_put", "aten::index_copy_",
    "aten::index_add_", "aten::scatter", "aten::scatter_", "aten::scatter_add_", "aten::masked_scatter",
    "aten::masked_select", "aten::take_along_dim", "aten::topk", "aten::sort", "aten::argsort", "aten::embedding",
    "aten::repeat_interleave", "aten::repeat", "aten::expand", "aten::expand_as", "aten::cat", "aten::stack",
    "aten::clone", "aten::copy_", "aten::contiguous", "aten::new_zeros", "aten::new_ones", "aten::new_full",
    "aten::full", "aten::full_like", "aten::zeros_like", "aten::ones_like", "aten::empty_like", "aten::arange",
    "aten::nonzero", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::unflatten", "aten::narrow",
    "aten::split", "aten::chunk", "aten::unbind", "aten::roll", "aten::flip", "aten::tril", "aten::triu",
    "aten::view_as", "aten::reshape_as", "aten::detach", "aten::lift_fresh",
)  # fmt: skip
ZERO_COST_OPS: tuple[str, ...] = ELEMENTWISE_ZERO + DATA_MOVEMENT_ZERO


def sdpa_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``B·H·Lq·Lk·(Dqk + Dv)`` multiply-adds.

    ``H`` is the query's head count, so grouped-query attention is counted at query heads; causality
    does not halve it.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch_heads, lq, dqk = q
    lk, dv = k[-2], v[-1]
    count = 1
    for size in batch_heads:
        count *= size
    return count * lq * lk * (dqk + dv)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (2 FLOPs per MAC)."""
    *batch_heads, lq, dqk = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    count = 1
    for size in batch_heads:
        count *= size
    return 2 * count * lq * lk * (dqk + dv)


CPU_SDPA_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=dict(CPU_SDPA_MAPPING))


def fvcore_count(module: nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """fvcore's multiply-adds of ``module(*inputs)`` and the ops it met without a handle (should be empty)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fvcore's imports use torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
    analysis.set_op_handle(**dict.fromkeys(ZERO_COST_OPS, None))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # torch.jit is deprecated in torch 2.13; fvcore needs it
        total = int(analysis.total())
    return total, dict(analysis.unsupported_ops())


# ---------------------------------------------------------------------------------------------
# Recording the implementation's decoder-layer calls
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerCall:
    """One call of a decoder layer: its arguments (tensors detached and cloned) and attention implementation."""

    layer: int
    module: nn.Module  # the layer object called (an implementation may run a converted copy of the model)
    args: tuple
    kwargs: dict
    attention: str | None
    live_flops: int = 0  # FlopCounterMode's count inside the call (0 without a counter)


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    return value


@dataclass
class Recording:
    calls: list[LayerCall] = field(default_factory=list)

    def per_layer_live(self, num_layers: int) -> list[int]:
        out = [0] * num_layers
        for call in self.calls:
            out[call.layer] += call.live_flops
        return out

    def calls_of(self, layer: int) -> list[LayerCall]:
        return [c for c in self.calls if c.layer == layer]


@contextlib.contextmanager
def record_layer_calls(model: nn.Module, counter: FlopCounterMode | None = None) -> Iterator[Recording]:
    """Record every call of ``model``'s decoder layers (and FlopCounterMode's count inside each)."""
    layers = model.model.language_model.layers
    recording = Recording()
    handles = []
    open_calls: dict[int, tuple[LayerCall, int]] = {}

    def pre_hook(index):
        def hook(module, args, kwargs):
            attention = getattr(module.self_attn.config, "_attn_implementation", None)
            call = LayerCall(index, module, _snapshot(args), _snapshot(kwargs), attention)
            recording.calls.append(call)
            open_calls[index] = (call, counter.get_total_flops() if counter is not None else 0)

        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            call, start = open_calls.pop(index)
            if counter is not None:
                call.live_flops = counter.get_total_flops() - start

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(index), with_kwargs=True))
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()


class _Replay(nn.Module):
    """Calls a decoder layer with a recorded call's arguments, its tensors given positionally (for torch.jit)."""

    def __init__(self, layer: nn.Module, call: LayerCall):
        super().__init__()
        self.layer = layer
        kwargs = dict(call.kwargs)
        for name in (*CACHE_NAMES, "past_key_value"):  # whichever name the implementation used
            kwargs.pop(name, None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.leaves: list[torch.Tensor] = []
        self.template = (self._flatten(call.args), self._flatten(kwargs))

    def _flatten(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            self.leaves.append(value)
            return ("__tensor__", len(self.leaves) - 1)
        if isinstance(value, dict):
            return {k: self._flatten(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(self._flatten(v) for v in value)
        return value

    @staticmethod
    def _fill(value: Any, tensors: tuple) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and value[0] == "__tensor__":
            return tensors[value[1]]
        if isinstance(value, dict):
            return {k: _Replay._fill(v, tensors) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(_Replay._fill(v, tensors) for v in value)
        return value

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        args, kwargs = self._fill(self.template[0], tensors), self._fill(self.template[1], tensors)
        out = self.layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _attention(layer: nn.Module, name: str | None) -> Iterator[None]:
    """Run ``layer`` under the attention implementation it was called with (restored on exit)."""
    config = layer.self_attn.config
    previous = config._attn_implementation
    if name is not None:
        config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def fvcore_layer_call(call: LayerCall) -> tuple[int, dict[str, int]]:
    """fvcore's FLOPs (2 per multiply-add) of one recorded layer call, and its unhandled ops."""
    replay = _Replay(call.module, call)
    with _attention(call.module, call.attention), torch.no_grad():
        macs, unsupported = fvcore_count(replay, tuple(replay.leaves))
    return 2 * macs, unsupported
