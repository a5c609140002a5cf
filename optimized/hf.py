"""Hugging Face integration: route an unmodified model's ``model(**inputs)`` and ``model.generate(**inputs)``.

    with rerouting.optimized.route(model, config) as router:
        out = model(**inputs)                     # routed prefill; out.past_key_values is a RoutedCache
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        trace = router.last_trace

Inside the block the model instance's ``forward`` is replaced by a routed one: a prefill (no cache, or an
empty one) runs ``routed_prefill``; a call with a ``RoutedCache`` decodes from it, unrouted. Nothing else is
touched: no weight, no config, no attention implementation, no class. On exit (also after an exception) the
instance attribute is removed again, so the model is bit-identical to before.

Notation used for tensor shapes: B batch, T padded length, q new tokens, V vocabulary.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Cache
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from rerouting.reference import Host, RoutingConfig, RoutingError, Trace, host_for
from rerouting.reference.compat import forward_cache, make_output
from rerouting.reference.hooks import reducer_for
from rerouting.reference.twig import check_twig

from .cache import RoutedCache
from .decode import decode_step
from .generate_options import check_generate_options
from .generate_ssd import generate_ssd
from .routing import PrefillResult, check_host, routed_prefill

# forward() arguments the routed path cannot honour: passing them (not None / not False) is an error, never
# a quietly unrouted or differently computed forward ([routing.errors]).
_UNSUPPORTED = (
    "inputs_embeds",
    "labels",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_sizes",
    "output_attentions",
    "output_hidden_states",
)
_VIDEO = (
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)  # Qwen video inputs ([layout.image-grid])


class Router:
    """[routing.errors] Context manager routing one model's ``forward`` and ``generate`` under one config.

    Attributes:
        last_result: the ``PrefillResult`` of the last routed prefill inside the block.
        last_trace: its ``Trace``.
    """

    def __init__(self, model: nn.Module, config: RoutingConfig, twig=None):
        host, _ = check_host(model, config)  # fail at construction: class, attention implementation, schedule
        check_twig(config, twig, host)  # [twig.ttp.score]
        self.model, self.config, self.twig = model, config, twig
        self.last_result: PrefillResult | None = None
        self.last_speculation = None  # [twig.ssd.generate]: the SpeculationStats of the last SSD generate
        self._saved: dict[str, tuple[bool, Any]] | None = None

    @property
    def last_trace(self) -> Trace | None:
        return None if self.last_result is None else self.last_result.trace

    def __enter__(self) -> Router:
        if self._saved is not None:
            raise RoutingError("routing.errors", "this router is already active; it is not re-entrant")
        model = self.model
        self._saved = {
            name: (name in model.__dict__, model.__dict__.get(name)) for name in ("forward", "generate")
        }
        original = model.forward  # bound method (or a wrapper already installed by someone else)
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads the signature (logits_to_keep, accepted kwargs)
        def forward(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            return self._forward(dict(bound.arguments))

        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            if self.twig is not None and kwargs.get("assistant_model") is not None:  # [twig.ssd.generate]
                if kwargs["assistant_model"] is not self.twig:
                    raise RoutingError(
                        "twig.ssd.generate",
                        "assistant_model must be the twig this model is routed with (route(model, config, "
                        f"twig=twig)); got another {type(kwargs['assistant_model']).__name__}",
                    )
                return generate_ssd(self, model, args, kwargs)
            check_generate_options(model, kwargs)  # before generate builds caches or assistants
            add_token_types(host_for(model), args, kwargs)
            encode_for_reducer(model, self.config, kwargs)
            return original_generate(*args, **kwargs)

        model.forward, model.generate = forward, generate
        return self

    def __exit__(self, *exc_info) -> bool:
        for name, (had, previous) in self._saved.items():
            if had:
                setattr(self.model, name, previous)
            else:
                delattr(self.model, name)
        self._saved = None
        return False

    def _forward(self, arguments: dict[str, Any]) -> Any:
        """The routed ``forward``: a routed prefill, or an unrouted decode step from a ``RoutedCache``."""
        arguments.update(arguments.pop("kwargs", {}))
        for name in _UNSUPPORTED:
            value = arguments.get(name)
            if value is not None and value is not False:
                raise RoutingError(
                    "routing.errors", f"forward argument {name!r} is not supported while routing"
                )
        videos = [name for name in _VIDEO if arguments.get(name) is not None]
        if videos:
            raise RoutingError("layout.image-grid", f"video inputs {videos} are not supported (images only)")
        if arguments.get("input_ids") is None:
            raise RoutingError(
                "routing.errors", "routing needs input_ids (the image placeholders mark the visual tokens)"
            )
        use_cache = arguments.get("use_cache")
        use_cache = self.model.config.get_text_config().use_cache if use_cache is None else use_cache
        cache = forward_cache(arguments)  # `cache` from transformers 5.24 on, `past_key_values` before
        if isinstance(cache, RoutedCache) and cache.get_seq_length() > 0:
            logits = self._decode(arguments, cache)
        elif isinstance(cache, Cache) and cache.get_seq_length() > 0:
            raise RoutingError(
                "cache.decode.unrouted",
                f"a routed forward cannot continue a {type(cache).__name__} that already holds tokens",
            )
        else:
            self.last_result = self._prefill(arguments, use_cache)
            logits, cache = self.last_result.logits, self.last_result.cache
        output = make_output(LlavaCausalLMOutputWithPast, cache if use_cache else None, logits=logits)
        return output.to_tuple() if arguments.get("return_dict") is False else output

    def _prefill(self, arguments: dict[str, Any], use_cache: bool) -> PrefillResult:
        """[routing.output] A routed prefill from the forward's arguments (pixels, or features from ``generate``)."""
        encoded = arguments.get("mm_encoder_outputs") or {}
        if set(encoded) - {"image"}:
            raise RoutingError("routing.errors", f"mm_encoder_outputs for {sorted(set(encoded) - {'image'})}")
        image = encoded.get("image")
        input_ids, attention_mask = arguments["input_ids"], arguments.get("attention_mask")
        valid = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # [B, T]
        host = host_for(self.model)
        ranks, ids = split_position_ids(host, arguments.get("position_ids"))
        check_positions(ranks, valid.long().cumsum(-1) - 1, valid.bool())
        check_token_types(host, arguments.get("mm_token_type_ids"), input_ids, valid.bool())
        host_inputs = {
            name: value
            for name, value in (("image_grid_thw", arguments.get("image_grid_thw")), ("position_ids", ids))
            if value is not None
        }
        result = routed_prefill(
            self.model,
            self.config,
            input_ids,
            attention_mask,
            arguments.get("pixel_values"),
            use_cache=use_cache,
            logits_to_keep=arguments.get("logits_to_keep", 0),
            image_features=None if image is None else image.pooler_output,
            vision_outputs=image if self.config.reducer != "identity" else None,
            twig=self.twig,
            deepstack_features=getattr(image, "deepstack_features", None),  # [hosts.deepstack]: Qwen3-VL
            **host_inputs,
        )
        rotary = None if result.cache is None else result.cache.rotary
        if rotary is not None and hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = rotary.deltas[:, None].to(
                input_ids.device
            )  # as the unrouted forward
        return result

    def _decode(self, arguments: dict[str, Any], cache: RoutedCache) -> torch.Tensor:
        """[cache.decode.unrouted] One unrouted decode step from the routed cache: logits ``[B, q or k, V]``."""
        encoded = arguments.get("mm_encoder_outputs") or {}
        if arguments.get("pixel_values") is not None or encoded.get("image") is not None:
            raise RoutingError("cache.decode.unrouted", "images given to a decode step from a routed cache")
        input_ids, attention_mask = arguments["input_ids"], arguments.get("attention_mask")
        q = input_ids.shape[1]
        if attention_mask is not None and not bool(attention_mask[:, -q:].bool().all()):
            raise RoutingError("cache.decode.unrouted", "decoded tokens must be valid (attention_mask 1)")
        ranks, ids = split_position_ids(host_for(self.model), arguments.get("position_ids"))
        positions = cache.decode_positions(q)  # [B, q]
        check_positions(ranks, positions, None)
        if ids is not None:  # [cache.decode.positions]: T_b + δ_b + step on every axis
            check_positions(ids, cache.rotary.lookup(positions.to(ids.device)), None)
        logits = decode_step(self.model, cache, input_ids)  # [B, q, V]; checks the attention implementation
        keep = arguments.get("logits_to_keep", 0)
        return logits[:, slice(-keep, None) if isinstance(keep, int) else keep]


def add_token_types(host: Host, args: tuple, kwargs: dict[str, Any]) -> None:
    """[layout.rotary-ids] ``generate`` on an mRoPE host gets the host's own ``mm_token_type_ids``.

    Without them ``generate`` would build 1-D position ids for Qwen2.5-VL, silently; given ones are checked
    against the image placeholders when the forward sees them.
    """
    if not hasattr(host, "mm_token_type_ids") or kwargs.get("mm_token_type_ids") is not None:
        return
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if isinstance(input_ids, torch.Tensor):
        kwargs["mm_token_type_ids"] = host.mm_token_type_ids(input_ids)


def generate_takes_encoder_outputs(model: nn.Module) -> bool:
    """Whether ``generate`` can hand precomputed encoder outputs (``mm_encoder_outputs``) to the forward."""
    return "mm_encoder_outputs" in inspect.signature(type(model).forward).parameters


def encode_for_reducer(model: nn.Module, config: RoutingConfig, kwargs: dict[str, Any]) -> None:
    """[nuwa.probe] ``generate`` under a reducer that reads the vision tower: the tower runs once, here.

    ``generate`` would encode the pixels itself and keep only the host's select layer, which is not enough for
    the reducer; so the reducer's own ``encode`` (every hidden state, the host's projected features as
    ``pooler_output``) is passed as ``mm_encoder_outputs``, which ``generate`` hands to the routed prefill.
    """
    encode = getattr(reducer_for(config), "encode", None)
    pixels = kwargs.get("pixel_values")
    if encode is None or pixels is None:
        return
    if (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None:
        raise RoutingError("layout.visual-set", "give pixel_values or mm_encoder_outputs, not both")
    if not generate_takes_encoder_outputs(model):
        raise RoutingError(
            "nuwa.probe",
            f"generate under the {config.reducer!r} reducer needs a transformers release whose "
            f"{type(model).__name__}.forward takes mm_encoder_outputs (5.24 does); transformers "
            f"{transformers.__version__} does not. The routed forward (model(...)) works on this release.",
        )
    with torch.no_grad():
        outputs = encode(host_for(model), pixels)
    kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": outputs}
    del kwargs["pixel_values"]


def split_position_ids(
    host: Host, given: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[layout.rotary-ids] Caller-given ``position_ids`` as (positions ``[B, q]``, mRoPE ids ``[3, B, q]``).

    1-D RoPE: the ids are the positions. An mRoPE host takes ``generate``'s ``[4, B, q]`` (row 0 the
    position, rows 1..3 the ids) or ``[3, B, q]`` ids; 2-D ids would be 1-D RoPE there, an error.
    """
    if given is None or getattr(host, "rotary_axes", 1) == 1:
        return given, None
    axes = host.rotary_axes
    if given.dim() == 3 and given.shape[0] == axes + 1:
        return given[0], given[1:]
    if given.dim() == 3 and given.shape[0] == axes:
        return None, given
    raise RoutingError(
        "layout.rotary-ids",
        f"position_ids of shape {tuple(given.shape)} for an mRoPE host: give [{axes + 1}, B, T] or "
        f"[{axes}, B, T] (2-D ids would run 1-D RoPE)",
    )


def check_token_types(
    host: Host, given: torch.Tensor | None, input_ids: torch.Tensor, valid: torch.Tensor
) -> None:
    """[layout.rotary-ids] Caller-given ``mm_token_type_ids`` must be the host's own (1 at image placeholders)."""
    if given is None or not hasattr(host, "mm_token_type_ids"):
        return
    own = host.mm_token_type_ids(input_ids)
    if bool(((given.to(own.device) != own) & valid).any()):
        raise RoutingError(
            "layout.rotary-ids",
            f"mm_token_type_ids {given.tolist()} differ from the image placeholders (id {host.image_token_id}) "
            f"{own.tolist()} on valid tokens",
        )


def check_positions(given: torch.Tensor | None, expected: torch.Tensor, valid: torch.Tensor | None) -> None:
    """[routing.active.positions] Caller-given ``position_ids`` must be the spec's own on valid tokens.

    ``generate`` passes ``cumsum(attention_mask) - 1``, which is the spec's rank among valid tokens; anything
    else (e.g. the positions ``generate`` continues after right padding) is an error, not silently overridden.
    """
    if given is None:
        return
    given = given.to(expected.device).expand_as(expected)  # [B, q]
    differs = given != expected
    if valid is not None:
        differs &= valid
    if bool(differs.any()):
        raise RoutingError(
            "routing.active.positions",
            f"position_ids {given.tolist()} differ from the routed positions {expected.tolist()} on valid tokens "
            "(valid tokens take their rank; decoded tokens continue from T_b: pad on the left for generate)",
        )


def route(model: nn.Module, config: RoutingConfig, *, twig=None) -> Router:
    """[routing.errors] Route ``model`` under ``config`` inside a ``with`` block (see the module docstring).

    ``twig``: the twig of a ``kind="twig"`` scorer (TTP); ``model.generate(..., assistant_model=twig)`` then
    runs self-speculative decoding with it ([twig.ssd.generate]). Raises ``RoutingError`` at once for an
    unsupported model class, attention implementation, schedule or twig.
    """
    return Router(model, config, twig)
