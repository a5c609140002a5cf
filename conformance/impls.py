"""Implementations under test, chosen by name: ``reference``, ``optimized`` or ``package.module:object``.

:func:`load_impl` returns a :class:`Checked` wrapper around the object. The wrapper fills every
capability the object lacks with a stub that fails as "<capability> is not implemented by <impl>"
(array-api-tests' ``_UndefinedStub``), so a partial implementation still gets a readable report
instead of a crash, and checks the shapes of what comes back.

``package.module:object`` may name an instance, a class (instantiated without arguments) or a
module-like object with a functional API (``routed_prefill`` and optionally ``decode_step``, in the
shape of ``rerouting.optimized``).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rerouting.reference import Reference, RoutingConfig, decode_step

from .protocol import CapabilityMissing, DecodeOutput, ForcedSelection, LayerKV, PrefillOutput

ENV_VAR = "REROUTING_IMPL"
BUILTIN = ("reference", "optimized")


def _kv_from_sample_caches(caches: Sequence[Any]) -> list[list[LayerKV]]:
    """``LayerKV`` per sample and layer from ``SampleCache``-like objects (``layer_kv(l)``, ``positions``, ``length``).

    ``positions`` records the prefill entries; entries appended by decoding (the cache grew past them)
    sit at ``length, length + 1, ...`` ([cache.decode.positions]).
    """
    out = []
    for cache in caches:
        layers = []
        for layer, positions in enumerate(cache.positions):
            if is_linear_layer(cache, layer):  # [hosts.linear.cache]: states, no K/V entries to compare
                keys = values = torch.zeros(0, 0, 0)
                layers.append(LayerKV(keys, values, torch.as_tensor(positions).cpu()))
                continue
            keys, values = cache.layer_kv(layer)
            positions = torch.as_tensor(positions).cpu()
            grown = keys.shape[-2] - positions.numel()
            if grown > 0:
                positions = torch.cat([positions, torch.arange(int(cache.length), int(cache.length) + grown)])
            layers.append(LayerKV(keys, values, positions))
        out.append(layers)
    return out


def is_linear_layer(cache: Any, layer: int) -> bool:
    """Whether ``cache`` (a ``SampleCache``-like object) holds linear-attention states at ``layer``."""
    from transformers import cache_utils

    linear = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)  # absent before transformers 5.24
    layers = getattr(getattr(cache, "cache", None), "layers", None)
    return linear is not None and layers is not None and isinstance(layers[layer], linear)


class ReferenceImpl:
    """The reference run as an implementation under test (checks the suite itself).

    Computes in float32 (float64 for a float64 model) whatever the model's dtype (``Reference`` converts a
    copy), on the CPU.
    """

    name = "reference"

    def __init__(self) -> None:
        self._cpu_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _cpu(self, model: nn.Module) -> nn.Module:
        if next(model.parameters()).device.type == "cpu":
            return model
        if model not in self._cpu_copies:
            self._cpu_copies[model] = copy.deepcopy(model).cpu()
        return self._cpu_copies[model]

    def prefill(
        self,
        model: nn.Module,
        config: RoutingConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        forced_selection: ForcedSelection | None = None,
        image_grid_thw: torch.Tensor | None = None,
        twig: Any = None,
        generated_from: int | None = None,
        **yardstick: Any,
    ) -> PrefillOutput:
        """``yardstick``: ``Reference``'s yardstick switches (compute_dtype, score_dtype, attention), for the oracle.

        ``twig``: the twig of a ``kind="twig"`` scorer ([twig.ttp.score]).
        ``generated_from``: the oracle's recompute of decoding under the retroactive cache policy
        ([cache.policy.retroactive]); only ever passed with it.
        """
        if not yardstick and next(model.parameters()).dtype == torch.float64:
            yardstick = {"compute_dtype": torch.float64}  # a float64 model runs (and scores) in float64
        if twig is not None:
            yardstick["twig"] = (
                twig if next(twig.parameters()).device.type == "cpu" else copy.deepcopy(twig).cpu()
            )
        reference = Reference(self._cpu(model), config, **yardstick)
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        grid = {} if image_grid_thw is None else {"image_grid_thw": cpu(image_grid_thw)}
        if generated_from is not None:
            grid["generated_from"] = generated_from
        result = reference.prefill(
            cpu(input_ids), cpu(attention_mask), cpu(pixel_values), forced_selection=forced_selection, **grid
        )
        return PrefillOutput(
            logits=result.logits,
            kv=_kv_from_sample_caches(result.caches),
            trace=result.trace,
            state=(reference, result),
        )

    def decode_step(
        self, model: nn.Module, config: RoutingConfig, prefill: PrefillOutput, tokens: torch.Tensor, step: int
    ) -> DecodeOutput:
        reference, result = prefill.state
        logits = decode_step(reference, result, tokens.cpu(), step)
        return DecodeOutput(logits=logits, kv=_kv_from_sample_caches(result.caches))

    def ssd_generate(
        self,
        model,
        config,
        twig,
        input_ids,
        attention_mask,
        pixel_values,
        *,
        max_new_tokens,
        options,
        **yardstick,
    ):
        """[twig.ssd.lossless] The reference's SSD: ``[B, n]`` tokens and its ``SpeculationStats``."""
        from rerouting.reference.ssd import ssd_generate

        if not yardstick and next(model.parameters()).dtype == torch.float64:
            yardstick = {"compute_dtype": torch.float64}
        reference = Reference(self._cpu(model), config, twig=copy.deepcopy(twig).cpu(), **yardstick)
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return ssd_generate(
            reference,
            cpu(input_ids),
            cpu(attention_mask),
            cpu(pixel_values),
            max_new_tokens=max_new_tokens,
            options=options,
        )

    def greedy_generate(
        self, model, config, twig, input_ids, attention_mask, pixel_values, *, max_new_tokens, **yardstick
    ):
        """[cache.decoding-strategy] The reference's greedy decode of the (TTP-)routed prefill: ``[B, n]`` tokens."""
        from rerouting.reference.decode import greedy_generate

        if not yardstick and next(model.parameters()).dtype == torch.float64:
            yardstick = {"compute_dtype": torch.float64}
        reference = Reference(
            self._cpu(model), config, twig=None if twig is None else copy.deepcopy(twig).cpu(), **yardstick
        )
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        tokens, _ = greedy_generate(
            reference, cpu(input_ids), cpu(attention_mask), cpu(pixel_values), max_new_tokens=max_new_tokens
        )
        return tokens


class FunctionalImpl:
    """Adapter for a functional API: ``routed_prefill(model, config, input_ids, attention_mask, pixel_values,
    forced_selection=None)`` returning an object with ``logits``, ``trace`` and ``caches`` (per sample:
    ``layer_kv(l)`` and ``positions``) or ``cache`` (``layer_kv(l, b)``, ``sample_cache(b)``), and
    optionally ``decode_step``. ``rerouting.optimized`` has this shape.
    """

    def __init__(self, namespace: Any, name: str):
        self.namespace, self.name = namespace, name
        if not hasattr(namespace, "routed_prefill"):
            raise TypeError(f"{name} has no routed_prefill")

    def prefill(
        self,
        model: nn.Module,
        config: RoutingConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        forced_selection: ForcedSelection | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> PrefillOutput:
        kwargs = {} if forced_selection is None else {"forced_selection": forced_selection}
        if image_grid_thw is not None:
            kwargs["image_grid_thw"] = image_grid_thw
        result = self.namespace.routed_prefill(
            model, config, input_ids, attention_mask, pixel_values, **kwargs
        )
        return PrefillOutput(
            logits=result.logits, kv=_kv_from_sample_caches(result.caches), trace=result.trace, state=result
        )

    def decode_step(
        self, model: nn.Module, config: RoutingConfig, prefill: PrefillOutput, tokens: torch.Tensor, step: int
    ) -> DecodeOutput:
        step_fn = getattr(self.namespace, "decode_step", None)
        if step_fn is None:
            raise CapabilityMissing("decode_step", self.name)
        result = prefill.state
        logits = step_fn(model, config, result, tokens, step)
        return DecodeOutput(logits=logits, kv=_kv_from_sample_caches(result.caches))


class Checked:
    """Wraps an implementation: stubs for what it lacks, shape checks on what it returns.

    Every method of the protocol is present on the wrapper; calling one the wrapped object does not
    have raises :class:`CapabilityMissing`, as does passing ``forced_selection`` to a ``prefill``
    without that argument, or a ``NotImplementedError`` raised by the implementation.
    """

    def __init__(self, impl: Any, name: str | None = None, spec: str | None = None):
        self.impl = impl
        self.name = name or getattr(impl, "name", None) or type(impl).__name__
        self.spec = spec or self.name  # what load_impl() was given: reproducers use it
        prefill = getattr(impl, "prefill", None)
        self._has_forced = prefill is not None and _accepts(prefill, "forced_selection")

    def __repr__(self) -> str:
        return f"Checked({self.name})"

    def supports_host(self, class_name: str) -> bool:
        """Whether the implementation takes models of ``class_name``: its optional ``hosts`` attribute
        (class names) says; without one it is held to every host the suite draws."""
        hosts = getattr(self.impl, "hosts", None)
        return hosts is None or class_name in hosts

    def supports_reducer(self, name: str) -> bool:
        """Whether the implementation takes configurations with the vision-side reducer ``name``: its optional
        ``reducers`` attribute (names) says; without one it is held to every reducer ([layout.vision-reducer])."""
        reducers = getattr(self.impl, "reducers", None)
        return reducers is None or name in reducers

    def supports_scorer(self, kind: str) -> bool:
        """Whether the implementation has the scorer ``kind`` ([scoring.scorer]): its optional ``scorers``
        attribute (kinds) says; without one it is held to every kind the suite draws."""
        scorers = getattr(self.impl, "scorers", None)
        return scorers is None or kind in scorers

    def supports_cache_policy(self, name: str) -> bool:
        """Whether the implementation has the cache policy ``name`` ([cache.policy]): its optional
        ``cache_policies`` attribute says; without one it is held to every policy."""
        policies = getattr(self.impl, "cache_policies", None)
        return policies is None or name in policies

    def prefill(
        self,
        model: nn.Module,
        config: RoutingConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        forced_selection: ForcedSelection | None = None,
        image_grid_thw: torch.Tensor | None = None,
        twig: Any = None,
    ) -> PrefillOutput:
        """``image_grid_thw`` (a Qwen2.5-VL case) is passed only when given, to a ``prefill`` that accepts it;
        so is ``twig`` (a TTP case, [twig.ttp.score])."""
        if not hasattr(self.impl, "prefill"):
            raise CapabilityMissing("prefill", self.name)
        kwargs = {}
        if twig is not None:
            if not _accepts(self.impl.prefill, "twig"):
                raise CapabilityMissing("twig", self.name, "prefill takes no twig argument (TwigVLM's TTP)")
            kwargs["twig"] = twig
        if image_grid_thw is not None:
            if not _accepts(self.impl.prefill, "image_grid_thw"):
                raise CapabilityMissing(
                    "image_grid_thw", self.name, "prefill takes no image_grid_thw argument (Qwen2.5-VL hosts)"
                )
            kwargs["image_grid_thw"] = image_grid_thw
        if forced_selection is not None:
            if not self._has_forced:
                raise CapabilityMissing(
                    "forced_selection", self.name, "prefill takes no forced_selection argument"
                )
            kwargs["forced_selection"] = [[list(map(int, s)) for s in sample] for sample in forced_selection]
        try:
            out = self.impl.prefill(model, config, input_ids, attention_mask, pixel_values, **kwargs)
        except NotImplementedError as error:
            raise CapabilityMissing(
                "forced_selection" if "forced_selection" in kwargs else "prefill", self.name, str(error)
            ) from error
        if not isinstance(out, PrefillOutput):
            raise CapabilityMissing("prefill", self.name, f"returned {type(out).__name__}, not PrefillOutput")
        return out

    def decode_step(
        self, model: nn.Module, config: RoutingConfig, prefill: PrefillOutput, tokens: torch.Tensor, step: int
    ) -> DecodeOutput:
        if not hasattr(self.impl, "decode_step"):
            raise CapabilityMissing("decode_step", self.name)
        try:
            out = self.impl.decode_step(model, config, prefill, tokens, step)
        except NotImplementedError as error:
            raise CapabilityMissing("decode_step", self.name, str(error)) from error
        if isinstance(out, torch.Tensor):
            out = DecodeOutput(logits=out)
        if not isinstance(out, DecodeOutput):
            raise CapabilityMissing(
                "decode_step", self.name, f"returned {type(out).__name__}, not DecodeOutput"
            )
        return out

    def ssd_generate(self, *args: Any, **kwargs: Any):
        """[twig.ssd.lossless] The implementation's SSD (optional): tokens ``[B, n]`` and ``SpeculationStats``."""
        if not hasattr(self.impl, "ssd_generate"):
            raise CapabilityMissing("ssd_generate", self.name, "self-speculative decoding with a twig")
        return self.impl.ssd_generate(*args, **kwargs)

    def decode_kv(self, out: DecodeOutput) -> Sequence[Sequence[LayerKV]]:
        """The cache after a decode step, or a missing-capability failure."""
        if out.kv is None:
            raise CapabilityMissing("decode_step KV (DecodeOutput.kv)", self.name)
        return out.kv


def _accepts(fn: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class OptimizedImpl:
    """``rerouting.optimized`` as an implementation under test: batched, packed, on the model's device and dtype.

    KV per sample and layer comes from its batched ``RoutedCache`` (``layer_kv(l, b)``: the sample's
    entries with padding dropped; ``positions``: the packing index it recorded).
    """

    name = "optimized"

    def prefill(
        self,
        model: nn.Module,
        config: RoutingConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        *,
        forced_selection: ForcedSelection | None = None,
        image_grid_thw: torch.Tensor | None = None,
        twig: Any = None,
    ) -> PrefillOutput:
        from rerouting import optimized

        result = optimized.routed_prefill(
            model,
            config,
            input_ids,
            attention_mask,
            pixel_values,
            forced_selection=forced_selection,
            image_grid_thw=image_grid_thw,
            twig=twig,
        )
        return PrefillOutput(logits=result.logits, kv=self._kv(result), trace=result.trace, state=result)

    @staticmethod
    def _kv(result: Any) -> list[list[LayerKV]]:
        return _kv_from_sample_caches(
            [result.cache.sample_cache(b) for b in range(len(result.trace.samples))]
        )

    def decode_step(
        self, model: nn.Module, config: RoutingConfig, prefill: PrefillOutput, tokens: torch.Tensor, step: int
    ) -> DecodeOutput:
        from rerouting import optimized

        result = prefill.state
        if result.cache.steps != step:
            raise ValueError(f"decode step {step} but the cache has decoded {result.cache.steps} tokens")
        with torch.no_grad():
            logits = optimized.decode_step(model, result.cache, tokens[:, None])  # [B, 1, V]
        return DecodeOutput(logits=logits[:, -1], kv=self._kv(result))

    def ssd_generate(
        self, model, config, twig, input_ids, attention_mask, pixel_values, *, max_new_tokens, options
    ):
        """[twig.ssd.batch] ``rerouting.optimized``'s batched SSD: tokens ``[B, n]`` and ``SpeculationStats``."""
        from rerouting.optimized.ssd import ssd_generate

        tokens, stats, _ = ssd_generate(
            model,
            config,
            twig,
            input_ids,
            attention_mask,
            pixel_values,
            max_new_tokens=max_new_tokens,
            options=options,
        )
        return tokens, stats


def _optimized() -> Any:
    return OptimizedImpl()


def _resolve(spec: str) -> tuple[Any, str]:
    if spec == "reference":
        return ReferenceImpl(), "reference"
    if spec == "optimized":
        return _optimized(), "optimized"
    if ":" not in spec:
        raise ValueError(
            f"--impl {spec!r} is not 'reference', 'optimized' or 'package.module:object' "
            f"(also settable with the {ENV_VAR} environment variable)"
        )
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        obj = obj()
    elif not hasattr(obj, "prefill") and hasattr(obj, "routed_prefill"):
        obj = FunctionalImpl(obj, spec)
    return obj, getattr(obj, "name", None) or spec


class ImplementationError(ValueError):
    """``--impl`` names nothing importable, or an object that does not follow the ``Implementation`` protocol."""


def load_impl(spec: str | None = None) -> Checked:
    """The implementation named by ``spec`` (default: ``$REROUTING_IMPL``, else ``reference``), wrapped."""
    spec = spec or os.environ.get(ENV_VAR) or "reference"
    obj, name = _resolve(spec)
    return Checked(obj, name, spec)


def check_impl(spec: str | None = None) -> Checked:
    """Load ``spec`` and check it against ``rerouting.conformance.protocol.Implementation`` before any test runs.

    Raises :class:`ImplementationError` with one message naming the object and what is missing: nothing
    importable, or no callable ``prefill`` (the one method every check needs; a missing ``decode_step``
    is a capability, reported by name by the checks that need it).
    """
    spec = spec or os.environ.get(ENV_VAR) or "reference"
    try:
        checked = load_impl(spec)
    except ImplementationError:
        raise
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        raise ImplementationError(
            f"--impl {spec!r} cannot be loaded: {type(error).__name__}: {error}"
        ) from error
    if not callable(getattr(checked.impl, "prefill", None)):
        raise ImplementationError(
            f"--impl {spec!r} is {type(checked.impl).__name__} {checked.impl!r:.80}, which has no prefill(model, "
            "config, input_ids, attention_mask, pixel_values, *, forced_selection=None) method "
            "(see rerouting.conformance.protocol.Implementation)"
        )
    return checked


def missing_capabilities(checked: Checked) -> list[str]:
    """Optional parts of the protocol the implementation lacks (their checks fail by name)."""
    missing = [] if callable(getattr(checked.impl, "decode_step", None)) else ["decode_step"]
    return missing + ([] if checked._has_forced else ["forced_selection"])
