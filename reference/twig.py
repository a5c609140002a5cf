"""The twig: T decoder layers of the base's own class beside base layer K, a norm and an LM head (spec/twig.md).

A twig never re-implements or modifies the base: its layers are instances of the base's decoder layer class
built from the base's text configuration (``layer_idx`` K..K+T-1), its norm of the base's norm class, its head
a ``Linear`` of the base's vocabulary. Two ways to get one: ``Twig.from_base`` (copies of base layers
K..K+T-1, the final norm and ``lm_head``, where TwigVLM's training starts) and ``Twig.load`` (a twig folder,
[twig.format]; ``release_state_dict`` maps the released TwigVLM checkpoint's keys onto it). Training a twig is
out of scope.

Notation: K the base layer the twig branches off at, T twig layers, L base layers, D hidden, W vocabulary.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .host import Host, host_for
from .schedule import RoutingConfig, RoutingError

FORMAT = {"format": "rerouting-twig", "version": 1}
CONFIG_FILE, WEIGHTS_FILE = "twig.json", "twig.safetensors"
# [twig.format] The released TwigVLM checkpoint's twig keys -> a twig folder's keys (prefix rewrites).
RELEASE_PREFIXES = (("model.twig_layers.", "layers."), ("model.twig_norm.", "norm."), ("twig_head.", "head."))


class Twig(nn.Module):
    """[twig.module] T decoder layers (``layer_idx`` K..K+T-1), a final norm and an LM head.

    Attributes:
        first_layer: K, the base layer whose input the twig reads.
        layers: the T layers, of the base's own decoder layer class.
        norm: the final norm, of the base's norm class.
        head: the LM head ``D -> W``.
    """

    def __init__(self, first_layer: int, layers: nn.ModuleList, norm: nn.Module, head: nn.Module):
        super().__init__()
        if isinstance(first_layer, bool) or not isinstance(first_layer, int) or first_layer < 0:
            raise RoutingError("twig.module", f"first layer K={first_layer!r} is not an integer >= 0")
        if not len(layers):
            raise RoutingError("twig.module", "a twig needs T >= 1 layers, got 0")
        self.first_layer = first_layer
        self.layers = layers
        self.norm = norm
        self.head = head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.head.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[twig.module] The twig's norm and head: ``[..., D] -> [..., W]``."""
        return self.head(self.norm(hidden))

    def bind(self, model: nn.Module) -> Twig:
        """[twig.module] The twig's layers read ``model``'s text configuration (its attention kernel included).

        A copied layer carries a copy of the configuration; rebinding makes the twig run under whatever
        attention implementation the base is set to, as the base's own layers do.
        """
        from transformers import PretrainedConfig

        text = model.config.get_text_config()
        for module in self.modules():
            if isinstance(getattr(module, "config", None), PretrainedConfig):
                module.config = text
        return self

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_base(cls, model: nn.Module, first_layer: int, num_layers: int) -> Twig:
        """[twig.init-from-base] Copies of base layers K..K+T-1, the base's final norm and ``lm_head``."""
        host = host_for(model)
        check_shape(first_layer, num_layers, host.num_layers)
        layers = nn.ModuleList(
            copy.deepcopy(host.layers[first_layer + i]) for i in range(num_layers)
        )  # deep copies: never the base's tensors
        twig = cls(first_layer, layers, copy.deepcopy(host.norm), copy.deepcopy(host.lm_head))
        return twig.bind(model).to(host.dtype).eval()

    @classmethod
    def empty(cls, model: nn.Module, first_layer: int, num_layers: int) -> Twig:
        """[twig.module] A twig of the base's own classes, layer ids K..K+T-1, weights as the classes init them."""
        host = host_for(model)
        check_shape(first_layer, num_layers, host.num_layers)
        text = model.config.get_text_config()
        layer_class, norm_class = type(host.layers[0]), type(host.norm)
        layers = nn.ModuleList(layer_class(text, layer_idx=first_layer + i) for i in range(num_layers))
        norm = norm_class(text.hidden_size, eps=text.rms_norm_eps)
        head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        return cls(first_layer, layers, norm, head).bind(model).to(host.dtype).eval()

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module) -> Twig:
        """[twig.format] A twig from a twig folder, for ``model``: JSON, tensors and base checked against each other."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / CONFIG_FILE).read_text())
        for key, value in FORMAT.items():
            if meta.get(key) != value:
                raise RoutingError(
                    "twig.format", f"{folder / CONFIG_FILE}: {key}={meta.get(key)!r}, expected {value!r}"
                )
        host = host_for(model)
        text = model.config.get_text_config()
        for key, base_value in (("hidden_size", text.hidden_size), ("vocab_size", text.vocab_size)):
            if meta.get(key) != base_value:
                raise RoutingError(
                    "twig.module",
                    f"twig {key}={meta.get(key)!r} does not match the base's {key}={base_value}",
                )
        twig = cls.empty(model, int(meta["first_layer"]), int(meta["num_layers"]))
        state = load_file(str(folder / WEIGHTS_FILE))
        expected = twig.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise RoutingError(
                "twig.format",
                f"{folder / WEIGHTS_FILE}: missing keys {missing}, unexpected keys {unexpected}",
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise RoutingError(
                    "twig.format",
                    f"{WEIGHTS_FILE} key {key!r} has shape {tuple(tensor.shape)}, the base's layer class "
                    f"needs {tuple(expected[key].shape)}",
                )
        twig.load_state_dict(state)
        return twig.to(host.dtype).eval()

    def save(self, folder: str | Path) -> None:
        """[twig.format] Write ``twig.json`` and ``twig.safetensors`` into ``folder`` (created if needed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            **FORMAT,
            "first_layer": self.first_layer,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))

    # --- attaching -------------------------------------------------------------------------------
    def check_base(self, host: Host) -> None:
        """[twig.module] The twig fits the base: ``K + T <= L``, the same hidden size and vocabulary."""
        check_shape(self.first_layer, self.num_layers, host.num_layers)
        base_hidden, base_vocab = int(host.lm_head.weight.shape[1]), int(host.lm_head.weight.shape[0])
        if self.hidden_size != base_hidden:
            raise RoutingError(
                "twig.module", f"twig hidden size {self.hidden_size} does not match the base's {base_hidden}"
            )
        if self.vocab_size != base_vocab:
            raise RoutingError(
                "twig.module", f"twig vocabulary {self.vocab_size} does not match the base's {base_vocab}"
            )


def check_shape(first_layer: int, num_layers: int, base_layers: int) -> None:
    """[twig.module] ``K >= 0``, ``T >= 1`` and ``K + T <= L``, else an error naming K, T and L."""
    if first_layer < 0 or num_layers < 1 or first_layer + num_layers > base_layers:
        raise RoutingError(
            "twig.module",
            f"a twig of T={num_layers} layers from K={first_layer} needs K >= 0, T >= 1 and K + T <= L={base_layers}",
        )


def check_twig(config: RoutingConfig, twig: Twig | None, host: Host) -> None:
    """[twig.ttp.score] A twig scorer needs a twig that fits the base, the schedule's first layer and ``twig_layers``.

    A twig given with another scorer would do nothing: an error too.
    """
    scorer, schedule = config.scorer, config.schedule
    if scorer.kind != "twig":
        if twig is not None:
            raise RoutingError(
                "twig.ttp.score",
                f"a twig was given but the scorer is {scorer.kind!r}, not 'twig': it would do nothing",
            )
        return
    if twig is None:
        raise RoutingError(
            "twig.ttp.score", "the 'twig' scorer needs a twig (twig=Twig.from_base(...) or Twig.load(...))"
        )
    twig.check_base(host)
    if schedule.layers[0] != twig.first_layer:
        raise RoutingError(
            "twig.ttp.score",
            f"the twig branches off at K={twig.first_layer} but the schedule's first decision layer is "
            f"{schedule.layers[0]}",
        )
    if scorer.twig_layers is not None and scorer.twig_layers != twig.num_layers:
        raise RoutingError(
            "twig.ttp.score",
            f"the config asks for a twig of twig_layers={scorer.twig_layers} layers, the twig has T={twig.num_layers}",
        )


def release_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """[twig.format] A released TwigVLM state dict's twig tensors under twig-folder keys, and the keys left over.

    ``model.twig_layers.{i}.X`` -> ``layers.{i}.X``, ``model.twig_norm.weight`` -> ``norm.weight``,
    ``twig_head.weight`` -> ``head.weight``; every other key (the base's weights) is returned as left over.
    """
    mapped, rest = {}, []
    for key, tensor in state.items():
        for old, new in RELEASE_PREFIXES:
            if key.startswith(old):
                mapped[new + key[len(old) :]] = tensor
                break
        else:
            rest.append(key)
    return mapped, rest
