"""Layers that are not plain softmax attention: linear attention and DeepStack injections (spec/hosts.md).

The discrete rules live here, so that the reference and the optimized path share them: which visual tokens
a linear-attention layer runs on ([hosts.linear.semantics]), and the per-sample run of such a layer. The
reference's per-sample DeepStack injection is here too ([hosts.deepstack]).

Notation: T_b valid length, D hidden, N visual tokens, n tokens a layer runs on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .compat import call_linear_layer


def layer_visual(
    kind: str, policy: str, semantics: str, num_visual: int, chosen: tuple[int, ...]
) -> tuple[int, ...]:
    """[hosts.linear.semantics] [hosts.linear.dense] [hosts.linear.bypass] The visual indices layer ``l`` runs on.

    ``chosen``: the stage's active visual indices (all ``N`` in the dense prefix). A softmax layer runs on
    them ([routing.active-set]). A linear-attention layer under ``reroute`` with ``dense`` semantics runs on
    every visual token (deferred ones included: the recurrence sees the whole sequence); under ``bypass`` on
    the stage's selection, like a softmax layer. Under ``remove`` both are the selection: removed tokens
    no longer exist.
    """
    if kind == "linear" and policy == "reroute" and semantics == "dense":
        return tuple(range(num_visual))
    return chosen


def run_linear_block(layer: nn.Module, hidden: torch.Tensor, active: Sequence[int], cache) -> torch.Tensor:
    """[hosts.linear.dense] [hosts.linear.bypass] [routing.bypass] One linear-attention layer on one sample.

    Runs the host's layer on the rows ``active`` of ``hidden`` (``[T_b, D]``), in ascending position, as one
    unpadded sequence: the recurrence and the causal conv run over exactly those tokens, in original order,
    from a zero state, and leave their final conv and recurrent states in ``cache``. Every other row of the
    returned ``[T_b, D]`` is bit-identical to the input.
    """
    idx = torch.tensor(active)
    out = call_linear_layer(layer, hidden[idx][None], padding_mask=None, cache=cache)  # [1, n, D]
    result = hidden.clone()
    result[idx] = out[0]
    return result


def inject(hidden: torch.Tensor, visual: Sequence[int], level: torch.Tensor) -> torch.Tensor:
    """[hosts.deepstack] The visual rows of ``hidden`` (``[T_b, D]``) plus ``level`` (``[T_b, D]``) at them.

    As the model's ``_deepstack_process``: only the visual rows change, ``h + level`` in the model dtype.
    """
    if not visual:
        return hidden
    idx = torch.tensor(visual)
    result = hidden.clone()
    result[idx] = hidden[idx] + level[idx].to(hidden.dtype)
    return result


def presets_for(arch) -> tuple[str, ...]:
    """[schedule.presets] [hosts.linear.decisions] [hosts.deepstack] The presets an architecture can run.

    Those whose decision layers fit its layers, fall on its softmax layers and, with DeepStack, start after
    the injections (``ArchSpec``: ``layer_kinds``, ``deepstack_levels``).
    """
    from .host import check_layer_config
    from .schedule import PRESETS, RoutingError

    kinds = tuple(arch.kind(layer) for layer in range(arch.num_layers))
    names = []
    for name, config in sorted(PRESETS.items()):
        try:
            config.schedule.check_layers(arch.num_layers)
            check_layer_config(kinds, arch.deepstack_levels, config)
        except RoutingError:
            continue
        names.append(name)
    return tuple(names)
