"""The one adapter between rerouting and the installed ``transformers``.

transformers 5.24 renamed the cache argument of every decoder layer and model ``forward`` from
``past_key_values`` to ``cache`` (the old name is deprecated, "removed in 5.40.0"), and the cache field of
the output classes with it. Every call rerouting makes into a host's layers, and every output it builds,
goes through this module, which finds the names by feature detection (signatures and dataclass fields),
never by parsing version strings. The version is compared only to refuse a release outside the range
the project tests ([routing.errors]).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from .schedule import RoutingError

#: The transformers releases rerouting supports; CI tests the floor and the newest release in it.
SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.4,<6")

#: Names a cache argument has had, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def check_transformers(version: str | None = None) -> None:
    """[routing.errors] Refuse a transformers outside ``SUPPORTED_TRANSFORMERS`` or with an unknown cache protocol.

    ``version`` defaults to the installed distribution's (a parameter so that tests can check the refusal).
    """
    installed = importlib.metadata.version("transformers") if version is None else version
    if not SUPPORTED_TRANSFORMERS.contains(Version(installed), prereleases=True):
        raise RoutingError(
            "routing.errors",
            f"transformers {installed} is installed; rerouting supports transformers{SUPPORTED_TRANSFORMERS} "
            f"(pip install 'transformers{SUPPORTED_TRANSFORMERS}')",
        )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer_cache_argument(LlamaDecoderLayer)  # raises if neither name is an argument


def _parameters(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)  # follows functools.wraps (deprecate_kwarg)


@functools.cache
def layer_cache_argument(layer_class: type) -> str:
    """[routing.errors] The name under which ``layer_class.forward`` takes its cache (``cache`` or ``past_key_values``)."""
    parameters = _parameters(layer_class.forward)
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise RoutingError(
        "routing.errors",
        f"{layer_class.__name__}.forward takes none of {list(CACHE_NAMES)} (transformers "
        f"{transformers.__version__}): its cache protocol is not one rerouting recognises; supported: "
        f"transformers{SUPPORTED_TRANSFORMERS}",
    )


def call_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Any | None,
    is_causal: bool = False,
) -> torch.Tensor:
    """[routing.active.causal] Run a host decoder layer on ``hidden`` ``[B, n, D]``, storing its K/V in ``cache``.

    Causality is always stated: an explicit ``attention_mask``, or ``attention_mask=None`` with
    ``is_causal=True``, an explicit causal request to SDPA (exact over an unpadded sequence in ascending
    position). A missing mask is never left for a backend to interpret: without the request, or under a
    kernel other than SDPA, it is an error (a single query row needs neither: it sees every entry).
    """
    if attention_mask is None and hidden.shape[1] > 1:
        kernel = getattr(
            getattr(getattr(layer, "self_attn", None), "config", None), "_attn_implementation", None
        )
        if not is_causal or kernel != "sdpa":
            raise RoutingError(
                "routing.active.causal",
                f"a layer call over {hidden.shape[1]} rows without a mask needs is_causal=True under sdpa "
                f"(got is_causal={is_causal}, attention implementation {kernel!r})",
            )
    causal = {"is_causal": True} if attention_mask is None and is_causal else {}
    return layer(
        hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        position_embeddings=position_embeddings,
        **causal,
        **{layer_cache_argument(type(layer)): cache},
    )


def call_linear_layer(
    layer: nn.Module, hidden: torch.Tensor, *, padding_mask: torch.Tensor | None, cache: Any | None
) -> torch.Tensor:
    """[hosts.linear.dense] Run a host's linear-attention decoder layer on ``hidden`` ``[B, n, D]``.

    The rows must be LEFT-aligned (padding first): the recurrence starts from a zero state and a zeroed
    padding row leaves it zero, so each sample's valid rows, and the conv and recurrent states written to
    ``cache``, are those of the sample alone. ``padding_mask`` ``[B, n]`` (1 valid) or None (no padding).
    """
    return layer(
        hidden,
        position_embeddings=None,  # a linear-attention layer has no rotary
        attention_mask=padding_mask,
        use_cache=cache is not None,
        **{layer_cache_argument(type(layer)): cache},
    )


def linear_cache_protocol() -> str | None:
    """Why this transformers cannot hold linear-attention states in a ``Cache`` (None when it can).

    rerouting serves conv and recurrent states through ``Cache.get_conv_state``/``LinearAttentionLayer``
    (transformers 5.24); earlier releases keep them in a model-specific cache class.
    """
    from transformers import cache_utils

    if hasattr(cache_utils, "LinearAttentionLayer") and hasattr(cache_utils.Cache, "get_conv_state"):
        return None
    return (
        f"transformers {transformers.__version__} keeps linear-attention states in a model-specific cache "
        "(no cache_utils.LinearAttentionLayer / Cache.get_conv_state)"
    )


def new_cache(kinds: tuple[str, ...]) -> Any:
    """[cache.contents] An empty ``DynamicCache``; with linear layers in ``kinds``, one layer per kind
    (``LinearAttentionLayer`` for ``"linear"``, ``DynamicLayer`` for ``"softmax"``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if "linear" in kinds:
        from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

        cache.layers.extend(LinearAttentionLayer() if kind == "linear" else DynamicLayer() for kind in kinds)
    return cache


def forward_cache(arguments: dict[str, Any]) -> Any | None:
    """[routing.errors] Pop the cache from a model forward's bound arguments, under either name.

    ``generate`` hands it over as ``cache`` from 5.24 on and as ``past_key_values`` before; a user may pass
    the old name to a new release. Both at once is an error, as it is in transformers.
    """
    given = {name: arguments.pop(name) for name in CACHE_NAMES if arguments.get(name) is not None}
    if len(given) > 1:
        raise RoutingError("routing.errors", f"both {sorted(given)} were given; pass the cache once")
    return next(iter(given.values()), None)


def output_cache_field(output_class: type) -> str:
    """The cache field of a transformers output dataclass (``cache`` from 5.24 on, ``past_key_values`` before)."""
    fields = {field.name for field in dataclasses.fields(output_class)}
    for name in CACHE_NAMES:
        if name in fields:
            return name
    raise RoutingError(
        "routing.errors",
        f"{output_class.__name__} has none of the fields {list(CACHE_NAMES)} (transformers "
        f"{transformers.__version__}); supported: transformers{SUPPORTED_TRANSFORMERS}",
    )


def make_output(output_class: type, cache: Any | None, **fields: Any) -> Any:
    """An instance of ``output_class`` with ``fields`` and ``cache`` under the field name this release uses."""
    return output_class(**fields, **{output_cache_field(output_class): cache})


def output_cache(output: Any) -> Any | None:
    """The cache a transformers model output carries, read without the deprecated alias."""
    return getattr(output, output_cache_field(type(output)))


check_transformers()  # at import of rerouting.reference, before any other module of it touches transformers


def vision_encoder_layers(tower: nn.Module) -> nn.ModuleList | None:
    """A CLIP vision tower's encoder layers, or None when ``tower`` is not one.

    transformers 5.4 wraps the transformer in ``CLIPVisionModel.vision_model``; later 5.x releases flatten it
    (``tower.encoder`` directly). Calling the tower itself is the same in both.
    """
    inner = getattr(tower, "vision_model", tower)
    return getattr(getattr(inner, "encoder", None), "layers", None)
