"""``generate(assistant_model=twig)`` under ``route(model, config, twig=twig)``: SSD with transformers' conventions.

transformers names a draft model ``assistant_model`` and its draft length and confidence stop
``num_assistant_tokens`` and ``assistant_confidence_threshold`` (generation config fields); the twig is this
model's own draft model, so those are the names SSD takes ([twig.ssd.generate]). What SSD cannot serve
(sampling, beams, several sequences, streamers, processors, stopping criteria) is refused by name.

Notation: B batch, T padded prompt length, n new tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rerouting.reference import RoutingError
from rerouting.reference.ssd import DRAFT_CONFIDENCE, NUM_SPECULATIONS, SpeculationOptions

from .ssd import ssd_generate

# generate() arguments SSD reads (besides the inputs); any other given argument is refused by name.
_READ = (
    "max_new_tokens",
    "num_assistant_tokens",
    "assistant_confidence_threshold",
    "eos_token_id",
    "pad_token_id",
)
_HARMLESS = {
    "use_cache": True,
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "return_dict_in_generate": False,
}


def _option(name: str, kwargs: dict[str, Any], config: Any) -> Any:
    return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)


def generate_ssd(router, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """[twig.ssd.generate] SSD for ``model.generate(**inputs, assistant_model=twig)``: ``[B, T + n]`` ids."""
    kwargs = dict(kwargs)
    kwargs.pop("assistant_model")
    config = kwargs.pop("generation_config", None) or model.generation_config
    input_ids = kwargs.pop("input_ids", kwargs.pop("inputs", args[0] if args else None))
    attention_mask, pixel_values = kwargs.pop("attention_mask", None), kwargs.pop("pixel_values", None)
    for name, fine in _HARMLESS.items():
        value = _option(name, kwargs, config)
        kwargs.pop(name, None)
        if value is not None and value != fine:
            raise RoutingError(
                "twig.ssd.generate",
                f"generate option {name}={value!r} with assistant_model=twig: SSD is greedy, one sequence per prompt",
            )
    read = {name: _option(name, kwargs, config) for name in _READ}
    for name in _READ:
        kwargs.pop(name, None)
    left = sorted(name for name, value in kwargs.items() if value is not None)
    if left:
        raise RoutingError(
            "twig.ssd.generate", f"generate options {left} are not supported with assistant_model=twig (SSD)"
        )
    if read["max_new_tokens"] is None:
        raise RoutingError("twig.ssd.generate", "give max_new_tokens to generate with assistant_model=twig")
    eos = read["eos_token_id"]
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = read["pad_token_id"] if read["pad_token_id"] is not None else (eos_ids[0] if eos_ids else 0)
    options = SpeculationOptions(
        num_speculations=read["num_assistant_tokens"] or NUM_SPECULATIONS,
        draft_confidence=(
            DRAFT_CONFIDENCE
            if read["assistant_confidence_threshold"] is None
            else read["assistant_confidence_threshold"]
        ),
        eos_token_id=eos_ids[0] if eos_ids else None,
    )
    tokens, stats, result = ssd_generate(
        model,
        router.config,
        router.twig,
        input_ids,
        attention_mask,
        pixel_values,
        max_new_tokens=int(read["max_new_tokens"]),
        options=options,
    )
    router.last_result, router.last_speculation = result, stats
    return torch.cat([input_ids, finish(tokens.to(input_ids.device), eos_ids, pad)], dim=1)


def finish(tokens: torch.Tensor, eos_ids: list[int], pad: int) -> torch.Tensor:
    """[twig.ssd.generate] Greedy ``generate``'s output of ``tokens`` ``[B, n]``: pad after each sample's first EOS,
    and only as many columns as until every sample has emitted EOS."""
    if not eos_ids:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))  # [B, n]
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    out = tokens.masked_fill(after, pad)
    done = is_eos.any(dim=1)
    if bool(done.all()):
        length = int((is_eos.long().argmax(dim=1) + 1).max())
        out = out[:, :length]
    return out
