"""Layers that are not plain softmax attention: linear attention and DeepStack injections (spec/hosts.md).

The discrete rules live here, so that the reference and the optimized path share them: which visual tokens
a linear-attention layer runs on ([hosts.linear.semantics]), and the per-sample run of such a layer. The
reference's per-sample DeepStack injection is here too ([hosts.deepstack]).

Notation: T_b valid length, D hidden, N visual tokens, n tokens a layer runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .compat import call_linear_layer
from .schedule import RoutingError

if TYPE_CHECKING:
    from .host import Host


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
    from .presets import PRESETS

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


def check_host_config(host: Host, config: Any) -> None:
    """[hosts.linear.decisions] [hosts.deepstack] A routing config against a host's layer kinds and DeepStack levels.

    A decision (or the ``previous`` probe layer) at a linear-attention layer is an error naming the layer and
    its type; with ``L_ds`` DeepStack levels the first decision layer must be ``>= L_ds``.
    """
    types = tuple(getattr(host.config.get_text_config(), "layer_types", None) or ())
    check_layer_config(host.layer_kinds, getattr(host, "deepstack_levels", 0), config, types)


def check_layer_config(kinds: Sequence[str], levels: int, config: Any, types: Sequence[str] = ()) -> None:
    """[hosts.linear.decisions] [hosts.deepstack] A routing config against layer kinds and DeepStack levels.

    ``kinds[l]``: ``"softmax"`` or ``"linear"`` (a host's ``layer_kinds``, an ``ArchSpec``'s); ``types``: the
    config's ``layer_types`` names, for the message.
    """
    probe_shift = 1 if config.scorer.kind == "attention" and config.scorer.probe_layer == "previous" else 0
    for layer in config.schedule.layers:
        for index, what in ((layer, "decision layer"), (layer - probe_shift, "probe layer")):
            if 0 <= index < len(kinds) and kinds[index] != "softmax":
                name = types[index] if index < len(types) else f"{kinds[index]}-attention"
                softmax = [i for i, kind in enumerate(kinds) if kind == "softmax"]
                raise RoutingError(
                    "hosts.linear.decisions",
                    f"{what} {index} is a {name} layer: decisions and probes need a softmax-attention layer "
                    f"(this host's full_attention layers: {softmax})",
                )
    if levels and config.schedule.layers[0] < levels:
        raise RoutingError(
            "hosts.deepstack",
            f"first decision layer {config.schedule.layers[0]} is inside the DeepStack injections (visual features "
            f"are added after layers 0..{levels - 1}): the first decision layer must be >= {levels}",
        )


def embed_inputs(
    host: Host,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    image_grid_thw: torch.Tensor | None = None,
    deepstack_features: Sequence[Sequence[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """[layout.visual-set] [hosts.deepstack] Merged input embeddings ``[B, T, D]`` and the host's DeepStack levels.

    Level ``j`` (``[B, T, D]``, the vision tower's level-``j`` features in the placeholder slots, zero
    elsewhere) is added to the visual rows right after decoder layer ``j``; ``()`` for a host without
    DeepStack. ``deepstack_features``: per level the per-image features ``generate`` computed together with
    ``image_features``.
    """
    grid = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    if getattr(host, "deepstack_levels", 0):
        return host.embed_deepstack(
            input_ids, pixel_values, image_features, deepstack_features=deepstack_features, **grid
        )
    if deepstack_features is not None:
        raise RoutingError(
            "hosts.deepstack", f"DeepStack features given to a host without DeepStack ({type(host).__name__})"
        )
    return host.embed(input_ids, pixel_values, image_features, **grid), ()
