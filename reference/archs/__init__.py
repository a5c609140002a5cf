"""Architectures: the decoder shapes the budget formulas need (spec/budget.md).

Architectures are described by :class:`ArchSpec`; a few real ones ship as config JSON (no weights)
in this folder (``reference/archs/``) and load with :func:`load_arch`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..schedule import RoutingError

ARCH_DIR = Path(__file__).resolve().parent

# Text-decoder families whose layer shapes follow the config (model_type of the *text* config).
_LLAMA_FAMILY = ("llama", "mistral")
# Qwen2 attention: q/k/v projections carry a bias, o_proj does not; no MLP bias.
_QWEN2_FAMILY = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
# Qwen3 attention (q/k norms; no bias unless config.attention_bias); Qwen3.5 adds the gated query and linear layers.
_QWEN3_FAMILY = ("qwen3_vl_text", "qwen3_5_text")


@dataclass(frozen=True)
class ArchSpec:
    """[budget.flops.true] The decoder shapes the FLOP and KV formulas need.

    Attributes:
        name: a label; not part of equality.
        num_layers: L, decoder layers.
        hidden_size: d.
        intermediate_size: m, the SwiGLU FFN width.
        num_heads: H, query heads.
        num_kv_heads: H_kv, key/value heads (GQA when < H).
        head_dim: hd.
        vocab_size: rows of the LM head.
        attention_bias: whether the q, k and v projections carry a bias.
        mlp_bias: whether gate, up and down projections carry a bias.
        o_proj_bias: whether the output projection carries a bias; ``None`` means "same as
            ``attention_bias``" (LLaMA's ``config.attention_bias`` covers all four projections;
            Qwen2 biases q/k/v but not o).
        layer_kinds: per layer ``"softmax"`` or ``"linear"`` ([budget.flops.linear]); empty: all softmax.
        query_gate: the softmax layers' q projection gives query and gate (``2·H·hd``, Qwen3.5).
        deepstack_levels: DeepStack levels of the vision tower (Qwen3-VL, [hosts.deepstack]).
        linear_key_heads, linear_value_heads, linear_key_dim, linear_value_dim, linear_conv_kernel: the
            Gated DeltaNet shapes of the linear layers (0 without any).
    """

    name: str = field(compare=False)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    attention_bias: bool
    mlp_bias: bool
    o_proj_bias: bool | None = None
    layer_kinds: tuple[str, ...] = ()
    query_gate: bool = False
    deepstack_levels: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv_kernel: int = 0

    def kind(self, layer: int) -> str:
        """Layer ``layer``'s kind: ``"softmax"`` or ``"linear"`` ([budget.flops.linear])."""
        return self.layer_kinds[layer] if self.layer_kinds else "softmax"

    def __post_init__(self) -> None:
        if self.o_proj_bias is None:
            object.__setattr__(self, "o_proj_bias", bool(self.attention_bias))
        for attr in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RoutingError("budget.flops.true", f"ArchSpec.{attr}={value!r} is not an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            raise RoutingError(
                "budget.flops.true",
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
            )

    @classmethod
    def from_text_config(cls, cfg: Any, name: str | None = None) -> ArchSpec:
        """[budget.flops.true] The spec of a transformers text config (LLaMA/Mistral or Qwen2 family).

        A composite VLM config (with a ``text_config``) is accepted and its text part used.
        ``head_dim`` is ``cfg.head_dim`` when the config has one, else ``hidden_size // num_heads``.
        Biases: LLaMA family from ``cfg.attention_bias`` (q, k, v and o) and ``cfg.mlp_bias``;
        Qwen2 family q/k/v biased, o and MLP not (transformers ``Qwen2Attention``/``Qwen2_5_VLAttention``).
        """
        if getattr(cfg, "text_config", None) is not None:
            cfg = cfg.text_config
        model_type = getattr(cfg, "model_type", None)
        if model_type in _LLAMA_FAMILY:
            attention_bias = bool(getattr(cfg, "attention_bias", False))
            o_bias, mlp_bias = attention_bias, bool(getattr(cfg, "mlp_bias", False))
        elif model_type in _QWEN2_FAMILY:
            attention_bias, o_bias, mlp_bias = True, False, False
        elif model_type in _QWEN3_FAMILY:
            attention_bias = bool(getattr(cfg, "attention_bias", False))
            o_bias, mlp_bias = attention_bias, False
        else:
            raise RoutingError(
                "budget.flops.true",
                f"text config model_type {model_type!r} is not supported; supported: "
                f"{', '.join(_LLAMA_FAMILY + _QWEN2_FAMILY + _QWEN3_FAMILY)}",
            )
        heads = int(cfg.num_attention_heads)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            name=name or getattr(cfg, "name_or_path", "") or str(model_type),
            num_layers=int(cfg.num_hidden_layers),
            hidden_size=int(cfg.hidden_size),
            intermediate_size=int(cfg.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg.vocab_size),
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            o_proj_bias=o_bias,
            **_qwen3_fields(cfg, model_type),
        )

    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None) -> ArchSpec:
        """[budget.flops.true] The spec read from a model's real module shapes (works on the meta device).

        Reads decoder layer 0 of ``model.model.language_model`` (LLaVA / Qwen2.5-VL in transformers 5):
        the in/out features and bias presence of ``self_attn.{q,k,v,o}_proj`` and
        ``mlp.{gate,up,down}_proj``, ``self_attn.head_dim``, the number of layers, and the LM head's
        output features (else the embedding rows) for the vocabulary. Every layer is assumed to have
        layer 0's shapes (true of LLaMA and Qwen2).
        """
        text = getattr(getattr(model, "model", None), "language_model", None)
        layers = getattr(text, "layers", None)
        if not layers:
            raise RoutingError(
                "budget.flops.true",
                f"model class {type(model).__name__} has no model.language_model.layers to read shapes from",
            )
        softmax = next((layer for layer in layers if hasattr(layer, "self_attn")), None)
        if softmax is None:
            raise RoutingError(
                "budget.flops.true", f"model class {type(model).__name__} has no softmax layer"
            )
        attn, mlp = softmax.self_attn, softmax.mlp
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        head_dim = int(attn.head_dim)
        gate = q.out_features == 2 * o.in_features  # [budget.flops.linear]: Qwen3.5's [query, gate] per head
        hidden = q.in_features
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = head.out_features if isinstance(head, nn.Linear) else text.embed_tokens.num_embeddings
        shapes_ok = (
            k.in_features == v.in_features == hidden
            and k.out_features == v.out_features
            and o.in_features * (2 if gate else 1) == q.out_features
            and o.out_features == hidden
            and mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features
            and mlp.down_proj.out_features == hidden
            and q.out_features % head_dim == 0
            and k.out_features % head_dim == 0
        )
        if not shapes_ok:
            raise RoutingError(
                "budget.flops.true", f"decoder layer 0 of {type(model).__name__} has inconsistent shapes"
            )
        biases = [m.bias is not None for m in (q, k, v)]
        if len(set(biases)) != 1:
            raise RoutingError("budget.flops.true", f"q/k/v projections disagree on bias presence: {biases}")
        mlp_biases = {m.bias is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)}
        if len(mlp_biases) != 1:
            raise RoutingError("budget.flops.true", "gate/up/down projections disagree on bias presence")
        return cls(
            name=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
            num_layers=len(layers),
            hidden_size=hidden,
            intermediate_size=mlp.gate_proj.out_features,
            num_heads=o.in_features // head_dim,
            num_kv_heads=k.out_features // head_dim,
            head_dim=head_dim,
            vocab_size=int(vocab),
            attention_bias=biases[0],
            mlp_bias=mlp_biases.pop(),
            o_proj_bias=o.bias is not None,
            **_hybrid_modules(model, layers, gate),
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "layer_kinds": list(self.layer_kinds),
        }  # JSON-shaped (a list, as it reads back)


def _hybrid_modules(model: nn.Module, layers: nn.ModuleList, gate: bool) -> dict:
    """[budget.flops.linear] [hosts.deepstack] Layer kinds, Gated DeltaNet shapes and DeepStack levels, read from
    the modules (empty for a decoder of softmax layers without DeepStack)."""
    out: dict = {}
    linear = [layer.linear_attn for layer in layers if hasattr(layer, "linear_attn")]
    if linear or gate:
        out["layer_kinds"] = tuple(
            "linear" if hasattr(layer, "linear_attn") else "softmax" for layer in layers
        )
        out["query_gate"] = gate
    if linear:
        la = linear[0]
        out.update(
            linear_key_heads=int(la.num_k_heads),
            linear_value_heads=int(la.num_v_heads),
            linear_key_dim=int(la.head_k_dim),
            linear_value_dim=int(la.head_v_dim),
            linear_conv_kernel=int(la.conv_kernel_size),
        )
    levels = len(getattr(getattr(model.model, "visual", None), "deepstack_merger_list", None) or ())
    if levels:
        out["deepstack_levels"] = levels
    return out


def _qwen3_fields(cfg: Any, model_type: str | None) -> dict:
    """[budget.flops.linear] Qwen3.5's layer kinds, gated query and Gated DeltaNet shapes (empty for others)."""
    if model_type != "qwen3_5_text":
        return {}
    kinds = {"full_attention": "softmax", "linear_attention": "linear"}
    return {
        "layer_kinds": tuple(kinds[t] for t in cfg.layer_types),
        "query_gate": True,
        "linear_key_heads": int(cfg.linear_num_key_heads),
        "linear_value_heads": int(cfg.linear_num_value_heads),
        "linear_key_dim": int(cfg.linear_key_head_dim),
        "linear_value_dim": int(cfg.linear_value_head_dim),
        "linear_conv_kernel": int(cfg.linear_conv_kernel_dim),
    }


def arch_names() -> tuple[str, ...]:
    """The embedded architectures (``reference/archs/*.json``), sorted."""
    return tuple(sorted(p.stem for p in ARCH_DIR.glob("*.json")))


def _config_class(model_type: str) -> type:
    import transformers

    classes = {
        "llava": transformers.LlavaConfig,
        "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
        "qwen2_vl": transformers.Qwen2VLConfig,
    }
    for qwen3_type, name in (("qwen3_vl", "Qwen3VLConfig"), ("qwen3_5", "Qwen3_5Config")):
        if hasattr(transformers, name):  # the embedded Qwen3 configs (not in every supported release)
            classes[qwen3_type] = getattr(transformers, name)
    if model_type not in classes:
        raise RoutingError(
            "budget.flops.true", f"embedded config model_type {model_type!r} is not one of {sorted(classes)}"
        )
    return classes[model_type]


def load_arch(name: str) -> tuple[Any, ArchSpec]:
    """[budget.flops.true] An embedded architecture: ``(transformers config, ArchSpec)``.

    The JSON is a ``to_dict()`` of the real checkpoint's config (no weights); the config object is
    rebuilt with ``LlavaConfig(**d)`` or ``Qwen2_5_VLConfig(**d)`` per its ``model_type``, so
    ``LlavaForConditionalGeneration(config)`` on the meta device gives the real module shapes. The
    ``ArchSpec`` comes from the text config ([`ArchSpec.from_text_config`]).
    """
    names = arch_names()
    if name not in names:
        raise RoutingError(
            "budget.flops.true", f"unknown architecture {name!r}; valid architectures: {', '.join(names)}"
        )
    data = json.loads((ARCH_DIR / f"{name}.json").read_text())
    config = _config_class(data.get("model_type", ""))(**data)
    spec = ArchSpec.from_text_config(config.text_config, name=name)
    levels = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())
    if levels:  # [hosts.deepstack]: Qwen3-VL's vision tower
        spec = replace(spec, deepstack_levels=levels)
    return config, spec
