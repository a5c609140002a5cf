"""Hypothesis strategies for conformance cases, and the cached tiny models they run on.

A :class:`Case` is everything one example needs, as plain frozen data whose ``repr`` is a valid
constructor, so a failing example is reproduced by pasting it:

- :class:`HostSpec`: a tiny ``LlavaForConditionalGeneration`` (LLaMA decoder with GQA, CLIP tower),
  including ``ties``, which makes ties on purpose (below), and ``attention``, the decoder's attention
  kernel (``eager`` or ``sdpa``, drawn as its own labelled choice: an implementation that leaves
  causality to SDPA's implicit mask fails under ``eager``, [routing.active.causal]);
- :class:`Layout`: each sample's text runs around its images, the padding side and the seed of the
  token ids and pixels (drawn from a local ``torch.Generator``, never the global RNG);
- a ``RoutingConfig`` (schedule, policy, scorer) and the dtype under test.

Tests draw the parts one by one with :func:`draw_case`, each draw labelled, so Hypothesis prints
``Draw 1 (host): HostSpec(...)``, ``Draw 2 (layout): ...`` for a falsifying example.

**Ties on purpose.** Attention-probe scores of random weights never tie by chance. ``ties="exact"``
zeroes every ``q_proj``: each probe logit is exactly 0, so every key visible to the query row gets
exactly ``1/P``: all visual tokens tie, bit for bit, in every dtype, and the tie-break decides.
``ties="near-e"`` scales ``q_proj`` by ``10**-e``: logits of order ``10**-e`` make scores within a few
ulps (e = 7) to ~1e-3 relative (e = 3) of each other, which exercises the near-tie band.

Models are built once per ``(HostSpec, dtype, device)`` (``functools.lru_cache``), so examples are
cheap; implementations must not modify the model they are given.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, replace

import torch
from hypothesis import strategies as st
from transformers import LlavaConfig

from rerouting.reference import PRESETS, RoutingConfig, Schedule, Scorer
from rerouting.reference.routing import KERNELS
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
PATCH = 2  # CLIP patch size; an image of grid x grid patches gives grid**2 visual tokens
VOCAB = 64
TIE_MODES = ("none", "exact", "near-3", "near-5", "near-7")


@dataclass
class SuiteSettings:
    """What the run targets; set by the pytest plugin from ``--dtypes`` and ``--device``."""

    dtypes: tuple[str, ...] = ("float32",)
    device: str = "cpu"


SETTINGS = SuiteSettings()


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """A tiny LLaVA host. ``grid**2`` visual tokens per image; ``ties`` in :data:`TIE_MODES`; ``attention``
    the decoder's attention implementation, one of ``KERNELS`` (``eager``, ``sdpa``)."""

    num_layers: int = 4
    hidden_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 48
    grid: int = 2
    seed: int = 0
    ties: str = "none"
    attention: str = "sdpa"

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2

    def llava_config(self) -> LlavaConfig:
        config = tiny_llava_config(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=VOCAB,
            image_size=self.grid * PATCH,
            patch_size=PATCH,
        )
        config.text_config.head_dim = self.head_dim  # independent of hidden_size / num_heads
        return config


@functools.lru_cache(maxsize=64)
def build_model(host: HostSpec, dtype: str = "float32", device: str = "cpu"):
    """The model of ``host`` in ``dtype`` on ``device`` (cached; the weights are the float32 ones, cast)."""
    if dtype != "float32" or device != "cpu":
        return copy.deepcopy(build_model(host)).to(device=device, dtype=DTYPES[dtype])
    model = tiny_llava(host.llava_config(), seed=host.seed)
    model.set_attn_implementation({"text_config": host.attention})
    if host.ties != "none":
        factor = 0.0 if host.ties == "exact" else 10.0 ** -int(host.ties.split("-")[1])
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(factor)
    return model


@functools.lru_cache(maxsize=64)
def build_model64(host: HostSpec, dtype: str = "float32"):
    """The float64 copy of the ``dtype`` model on the CPU: the truth sees exactly the weights under test."""
    return copy.deepcopy(build_model(host, dtype)).to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Layouts and cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Samples as text runs around images: ``(2, 0, 3)`` is 2 text tokens, image, image, 3 text tokens."""

    samples: tuple[tuple[int, ...], ...]
    padding: str = "left"
    seed: int = 0

    @property
    def images(self) -> tuple[int, ...]:
        return tuple(len(runs) - 1 for runs in self.samples)

    def num_visual(self, host: HostSpec) -> tuple[int, ...]:
        return tuple(n * host.tokens_per_image for n in self.images)

    def batch(self, host: HostSpec, config: LlavaConfig | None = None) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and (if any image) ``pixel_values``, on the CPU."""
        config = config or host.llava_config()
        return make_batch(
            config, [SampleSpec(runs) for runs in self.samples], padding=self.padding, seed=self.seed
        )


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
        """The batch; pixels are rounded to the dtype under test and back, so every run sees the same values."""
        batch = self.layout.batch(self.host)
        pixels = batch.get("pixel_values")
        if pixels is not None:
            pixels = pixels.to(self.torch_dtype).to(torch.float32)
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": None if pixels is None else pixels.to(device),
        }

    def with_config(self, **changes) -> Case:
        return replace(self, config=replace(self.config, **changes))

    def on_samples(self, samples: tuple[tuple[int, ...], ...]) -> Case:
        """The case on other samples, with a ratio schedule (valid for any N) at its first decision layer.

        For error cases: only the error under test can then be raised.
        """
        schedule = Schedule(self.config.schedule.layers[:1], (0.5,))
        layout = replace(self.layout, samples=samples)
        return replace(self, layout=layout, config=replace(self.config, schedule=schedule))

    def sample(self, b: int) -> Case:
        """Sample ``b`` alone, unpadded (its ids and pixels are not those of the batch: use :meth:`sample_inputs`)."""
        return replace(self, layout=replace(self.layout, samples=(self.layout.samples[b],)))


def sample_inputs(
    case: Case, b: int, extra_tokens: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """Sample ``b`` of ``case``'s batch alone and unpadded (CPU), optionally followed by ``extra_tokens``."""
    inputs = case.inputs()
    mask = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b][mask]
    if extra_tokens is not None:
        ids = torch.cat([ids, extra_tokens.to(ids.dtype)])
    images = case.layout.images
    pixels = inputs["pixel_values"]
    if pixels is not None:
        start = sum(images[:b])
        pixels = pixels[start : start + images[b]] if images[b] else None
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "pixel_values": pixels}


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def hosts(
    *, min_layers: int = 2, max_layers: int = 5, ties: st.SearchStrategy[str] | None = None, max_grid: int = 3
) -> st.SearchStrategy[HostSpec]:
    """Tiny hosts: 1-4 KV heads, GQA groups of 1-3, head dim 4 or 8 (independent of hidden / heads), 1-9 visual tokens per image."""
    ties = ties if ties is not None else st.one_of(st.just("none"), st.sampled_from(TIE_MODES))

    @st.composite
    def build(draw) -> HostSpec:
        kv = draw(st.sampled_from([1, 2, 4]))
        heads = kv * draw(st.integers(1, 3))
        return HostSpec(
            num_layers=draw(st.integers(min_layers, max_layers)),
            hidden_size=heads * draw(st.sampled_from([4, 8])),  # transformers wants a multiple of the heads
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=draw(st.sampled_from([4, 8])),
            intermediate_size=draw(st.sampled_from([16, 40])),
            grid=draw(st.integers(1, max_grid)),
            seed=draw(st.integers(0, 2)),
            ties=draw(ties),
        )

    return build()


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


def draw_case(
    data,
    *,
    host: st.SearchStrategy[HostSpec] | None = None,
    layout: st.SearchStrategy[Layout] | None = None,
    policy: str | None = None,
    scorer: st.SearchStrategy[Scorer] | None = None,
    **schedule_options,
) -> Case:
    """Draw a complete case, one labelled draw per part; ``schedule_options`` go to :func:`schedules`."""
    # the kernel the implementation is handed: one more labelled choice, not a second run of the property
    kernel = data.draw(st.sampled_from(KERNELS), label="attention")
    host_spec = data.draw(
        (host if host is not None else hosts()).map(lambda h: replace(h, attention=kernel)), label="host"
    )
    scorer_value = data.draw(scorer if scorer is not None else st.just(Scorer()), label="scorer")
    needs_text_after = scorer_value.query == "text-after-image"
    layout_value = data.draw(
        layout if layout is not None else layouts(text_after_image=needs_text_after), label="layout"
    )
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
    """Names of the presets whose decision layers fit ``num_layers``."""
    return st.sampled_from(sorted(n for n, c in PRESETS.items() if max(c.schedule.layers) < num_layers))
