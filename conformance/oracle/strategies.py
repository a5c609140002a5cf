"""Hypothesis strategies for conformance cases.

A :class:`Case` is everything one example needs, as plain frozen data whose ``repr`` is a valid
constructor, so a failing example is reproduced by pasting it:

- :class:`HostSpec` (``oracle/hosts.py``): a tiny LLaVA or Qwen2.5-VL host (``family``, its own labelled
  draw), including ``ties``, which makes ties on purpose, and ``attention``, the decoder's attention
  kernel (``eager`` or ``sdpa``, drawn as its own labelled choice: an implementation that leaves
  causality to SDPA's implicit mask fails under ``eager``, [routing.active.causal]);
- :class:`Layout`: each sample's text runs around its images, on Qwen each image's grid (``grids``,
  drawn after the layout), the padding side and the seed of the token ids and pixels (drawn from a
  local ``torch.Generator``, never the global RNG);
- a ``RoutingConfig`` (schedule, policy, scorer) and the dtype under test.

Tests draw the parts one by one with :func:`draw_case`, each draw labelled, so Hypothesis prints
``Draw 1 (attention): 'sdpa'``, ``Draw 2 (family): 'llava'``, ``Draw 3 (host): HostSpec(...)`` for a
falsifying example. The families drawn are those the implementation under test takes
(``SETTINGS.families``, from its ``hosts`` attribute): the others are not drawn, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import strategies as st

from rerouting.reference import PRESETS, RoutingConfig, Schedule, Scorer
from rerouting.reference.routing import KERNELS
from rerouting.reference.tiny import SampleSpec, make_batch
from rerouting.reference.tiny_qwen import QwenSample, make_qwen_batch

from .hosts import (  # noqa: F401  (re-exported: reproducers import HostSpec from here)
    DTYPES,
    HOST_CLASSES,
    PATCH,
    QWEN_GRIDS,
    SERVED,
    TIE_MODES,
    VOCAB,
    HostSpec,
    as_qwen,
    build_model,
    build_model64,
    hosts,
)


@dataclass
class SuiteSettings:
    """What the run targets; set by the pytest plugin from ``--dtypes`` and ``--device``."""

    dtypes: tuple[str, ...] = ("float32",)
    device: str = "cpu"
    families: tuple[str, ...] = SERVED  # the host families drawn: served here and taken by the implementation


SETTINGS = SuiteSettings()


# ---------------------------------------------------------------------------------------------
# Layouts and cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Samples as text runs around images: ``(2, 0, 3)`` is 2 text tokens, image, image, 3 text tokens.

    ``grids`` (Qwen2.5-VL hosts only): per sample, each image's ``(gh, gw)`` in 14-px patches (``gh·gw/4``
    visual tokens); each Qwen image is wrapped in vision start/end markers (text tokens), so its images
    are never adjacent and no Qwen sample is without text.
    """

    samples: tuple[tuple[int, ...], ...]
    padding: str = "left"
    seed: int = 0
    grids: tuple[tuple[tuple[int, int], ...], ...] | None = None

    @property
    def images(self) -> tuple[int, ...]:
        return tuple(len(runs) - 1 for runs in self.samples)

    def num_visual(self, host: HostSpec) -> tuple[int, ...]:
        if host.is_qwen:
            return tuple(sum(gh * gw // 4 for gh, gw in g) for g in self._grids())
        return tuple(n * host.tokens_per_image for n in self.images)

    def with_sample(self, runs: tuple[int, ...], grids: tuple[tuple[int, int], ...] = ()) -> Layout:
        """The layout with one more sample (``grids``: its images' grids, on a Qwen layout)."""
        more = None if self.grids is None else (*self.grids, grids)
        return replace(self, samples=(*self.samples, runs), grids=more)

    def _grids(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The grids, or every image 2x2 (1 token) where none were drawn (a case rebuilt on other samples)."""
        drawn = self.grids is not None and len(self.grids) == len(self.samples)
        if drawn and all(len(g) == n for g, n in zip(self.grids, self.images)):
            return self.grids
        return tuple(((2, 2),) * n for n in self.images)

    def batch(self, host: HostSpec) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, (if any image) ``pixel_values`` and on Qwen ``image_grid_thw`` (CPU)."""
        if host.is_qwen:
            specs = [QwenSample(runs, g) for runs, g in zip(self.samples, self._grids())]
            return make_qwen_batch(
                specs, padding=self.padding, seed=self.seed, patch_columns=host.patch_columns
            )
        specs = [SampleSpec(runs) for runs in self.samples]
        return make_batch(host.llava_config(), specs, padding=self.padding, seed=self.seed)


@dataclass(frozen=True)
class Case:
    """One conformance example. ``repr`` is a valid constructor (with ``torch`` and the classes imported)."""

    host: HostSpec
    layout: Layout
    config: RoutingConfig
    dtype: str = "float32"
    device: str = field(default="cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model(self):
        """The model the implementation runs (dtype and device under test)."""
        return build_model(self.host, self.dtype, self.device)

    def model64(self):
        """The truth's model: the same weights, in float64, on the CPU."""
        return build_model64(self.host, self.dtype)

    def model_lp(self):
        """The yardstick's model: the same weights in the dtype under test, on the CPU."""
        return build_model(self.host, self.dtype)

    def inputs(self, device: str = "cpu") -> dict[str, torch.Tensor | None]:
        """The batch; pixels are rounded to the dtype under test and back, so every run sees the same values.

        On a Qwen2.5-VL host the batch has ``image_grid_thw`` too (``[I, 3]``, None without images); on
        LLaVA it has no such key (``prefill`` is called without it).
        """
        batch = self.layout.batch(self.host)
        pixels = batch.get("pixel_values")
        if pixels is not None:
            pixels = pixels.to(self.torch_dtype).to(torch.float32)
        out = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": None if pixels is None else pixels.to(device),
        }
        if self.host.is_qwen:
            grid = batch.get("image_grid_thw")
            out["image_grid_thw"] = None if grid is None else grid.to(device)
        return out

    def with_config(self, **changes) -> Case:
        return replace(self, config=replace(self.config, **changes))

    def on_samples(self, samples: tuple[tuple[int, ...], ...]) -> Case:
        """The case on other samples, with a ratio schedule (valid for any N) at its first decision layer.

        For error cases: only the error under test can then be raised. On Qwen every new image is 2x2.
        """
        schedule = Schedule(self.config.schedule.layers[:1], (0.5,))
        layout = replace(self.layout, samples=samples, grids=None)
        return replace(self, layout=layout, config=replace(self.config, schedule=schedule))

    def sample(self, b: int) -> Case:
        """Sample ``b`` alone, unpadded (its ids and pixels are not those of the batch: use :meth:`sample_inputs`)."""
        grids = None if self.layout.grids is None else (self.layout._grids()[b],)
        return replace(self, layout=replace(self.layout, samples=(self.layout.samples[b],), grids=grids))


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def layouts(
    *,
    min_batch: int = 1,
    max_batch: int = 4,
    min_images: int = 0,
    max_images: int = 3,
    routed: bool = True,
    text_after_image: bool = False,
    text: bool = True,
) -> st.SearchStrategy[Layout]:
    """Batches of 1-4 samples, each with ``min_images..max_images`` images and text before, between and after.

    ``routed``: at least one sample has an image. ``text_after_image``: every sample with an image has
    text after its last image. ``text=False``: samples are images only (no text token at all).
    """

    @st.composite
    def sample(draw) -> tuple[int, ...]:
        images = draw(st.integers(min_images, max_images))
        if not text:
            return (0,) * (images + 1)
        runs = [draw(st.integers(0, 3)) for _ in range(images + 1)]
        if text_after_image and images and runs[-1] == 0:
            runs[-1] = 1
        if sum(runs) == 0:  # every sample has a text token: the probe's query row
            runs[-1 if draw(st.booleans()) else 0] = 1
        return tuple(runs)

    @st.composite
    def build(draw) -> Layout:
        samples = draw(st.lists(sample(), min_size=min_batch, max_size=max_batch))
        if routed and all(len(s) == 1 for s in samples):
            samples[draw(st.integers(0, len(samples) - 1))] = (draw(st.integers(0, 2)), 1)
            if text_after_image:
                samples = [(s[0], max(1, s[1])) if len(s) == 2 else s for s in samples]
        return Layout(tuple(samples), draw(st.sampled_from(["left", "right"])), draw(st.integers(0, 2**16)))

    return build()


KEEP_RATIOS = (1.0, 0.75, 0.5, 0.34, 0.25, 0.1, 0.01)  # 0.01: the extreme, k = max(1, floor(N r)) = 1


def schedules(
    num_layers: int,
    min_visual: int,
    *,
    max_decisions: int = 4,
    unit: str | None = None,
    monotone: bool = False,
    keep_all: bool = False,
    min_first_layer: int = 0,
    exact_decisions: int | None = None,
) -> st.SearchStrategy[Schedule]:
    """Schedules of 1-4 strictly increasing decision layers in ``[min_first_layer, L)``.

    Keeps are ratios (extremes 1.0 and 0.01 included) or absolute counts in ``1..min_visual``;
    ``monotone`` makes them non-increasing (then the remove pool cap never binds);
    ``keep_all`` keeps everything (ratio 1).
    """
    min_visual = max(1, min_visual)
    max_s = min(max_decisions, num_layers - min_first_layer)
    sizes = st.just(exact_decisions) if exact_decisions else st.integers(1, max_s)

    @st.composite
    def build(draw) -> Schedule:
        size = draw(sizes)
        layers = sorted(
            draw(
                st.lists(
                    st.integers(min_first_layer, num_layers - 1), min_size=size, max_size=size, unique=True
                )
            )
        )
        kind = unit or ("ratio" if keep_all else draw(st.sampled_from(["ratio", "count"])))
        if keep_all:
            keep = [1.0] * size
        elif kind == "ratio":
            keep = [draw(st.sampled_from(KEEP_RATIOS)) for _ in layers]
        else:
            keep = [draw(st.integers(1, min_visual)) for _ in layers]
        if monotone:
            keep = sorted(keep, reverse=True)
        return Schedule(tuple(layers), tuple(keep), unit=kind)

    return build()


def scorers(*, variants: bool = True, random: bool = True) -> st.SearchStrategy[Scorer]:
    """The default probe mostly; the random baseline and the two named probe variants sometimes."""
    options = [st.just(Scorer())]
    if random:
        options.append(st.builds(Scorer, kind=st.just("random"), seed=st.integers(0, 2**16)))
    if variants:
        options.append(st.builds(Scorer, probe_layer=st.just("previous")))
        options.append(st.builds(Scorer, query=st.just("text-after-image")))
    return st.one_of(*options)


def dtypes() -> st.SearchStrategy[str]:
    return st.sampled_from(SETTINGS.dtypes)


def families(not_on_qwen: str | None = None) -> st.SearchStrategy[str]:
    """The host families the implementation under test takes (LLaVA first: Hypothesis shrinks toward it).

    ``not_on_qwen``: why the property cannot apply to Qwen2.5-VL (then only LLaVA is drawn; the reasons
    are listed in docs/conformance.md, "Known limits").
    """
    drawn = tuple(f for f in SETTINGS.families if not (not_on_qwen and f == "qwen2.5-vl"))
    if not drawn:
        reason = f": not on Qwen2.5-VL ({not_on_qwen})" if not_on_qwen else ""
        pytest.skip(f"the implementation takes none of the hosts this property draws{reason}")
    return st.sampled_from(drawn)


def qwen_grids(layout: Layout) -> st.SearchStrategy[tuple[tuple[tuple[int, int], ...], ...]]:
    """Per sample, one grid of :data:`QWEN_GRIDS` per image (1-4 visual tokens each, different per image)."""
    return st.tuples(*(st.tuples(*(st.sampled_from(QWEN_GRIDS),) * n) for n in layout.images))


def _draw_host(data, host: st.SearchStrategy[HostSpec] | None, not_on_qwen: str | None) -> HostSpec:
    # the kernel and the family: labelled choices of their own, not second runs of the property
    kernel = data.draw(st.sampled_from(KERNELS), label="attention")
    family = data.draw(families(not_on_qwen), label="family")

    def finish(spec: HostSpec) -> HostSpec:
        spec = replace(spec, attention=kernel)
        return as_qwen(spec) if family == "qwen2.5-vl" else spec

    return data.draw((host if host is not None else hosts()).map(finish), label="host")


def _draw_layout(data, host: HostSpec, layout, needs_text_after: bool) -> Layout:
    value = data.draw(
        layout if layout is not None else layouts(text_after_image=needs_text_after), label="layout"
    )
    if host.is_qwen and value.grids is None:
        value = replace(value, grids=data.draw(qwen_grids(value), label="grids"))
    return value


def draw_case(
    data,
    *,
    host: st.SearchStrategy[HostSpec] | None = None,
    layout: st.SearchStrategy[Layout] | None = None,
    policy: str | None = None,
    scorer: st.SearchStrategy[Scorer] | None = None,
    not_on_qwen: str | None = None,
    **schedule_options,
) -> Case:
    """Draw a complete case, one labelled draw per part; ``schedule_options`` go to :func:`schedules`.

    ``not_on_qwen``: the reason the property does not apply to Qwen2.5-VL hosts (only LLaVA is drawn).
    """
    host_spec = _draw_host(data, host, not_on_qwen)
    scorer_value = data.draw(scorer if scorer is not None else st.just(Scorer()), label="scorer")
    needs_text_after = scorer_value.query == "text-after-image"
    layout_value = _draw_layout(data, host_spec, layout, needs_text_after)
    if needs_text_after and any(
        n and runs[-1] == 0 for n, runs in zip(layout_value.images, layout_value.samples)
    ):
        scorer_value = (
            Scorer()
        )  # the layout strategy given cannot serve the variant: fall back to the default
    routed_n = [n for n in layout_value.num_visual(host_spec) if n]
    min_first = max(
        schedule_options.pop("min_first_layer", 0), 1 if scorer_value.probe_layer == "previous" else 0
    )
    if min_first >= host_spec.num_layers:
        scorer_value, min_first = Scorer(), 0
    schedule = data.draw(
        schedules(
            host_spec.num_layers, min(routed_n, default=1), min_first_layer=min_first, **schedule_options
        ),
        label="schedule",
    )
    policy_value = policy or data.draw(st.sampled_from(["reroute", "remove"]), label="policy")
    dtype = data.draw(dtypes(), label="dtype")
    config = RoutingConfig(schedule, policy=policy_value, scorer=scorer_value)
    return Case(host_spec, layout_value, config, dtype=dtype, device=SETTINGS.device)


def presets(num_layers: int = 32) -> st.SearchStrategy[str]:
    """Names of the presets whose decision layers fit ``num_layers``.

    Presets with absolute keep counts (CLSE's LLaVA ``clse_*``: 110 and more) need more visual tokens than a
    tiny host has; tests/test_clse_generate.py runs them at LLaVA-1.5's 576. Presets of another scorer than
    the attention probe are drawn by that scorer's own properties (CLSE: test_scoring_clse.py, twig:
    test_twig.py); Nüwa presets need a deep CLIP tower (conformance/test_nuwa.py).
    """
    fits = lambda c: (  # noqa: E731  (CLSE's presets: conformance/test_scoring_clse.py)
        max(c.schedule.layers) < num_layers
        and c.schedule.unit == "ratio"
        and c.scorer.kind == "attention"
        and c.reducer == "identity"
    )
    return st.sampled_from(sorted(n for n, c in PRESETS.items() if fits(c)))
