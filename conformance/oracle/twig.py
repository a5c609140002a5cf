"""The twig oracle (spec/twig.md): TTP cases with a drawn twig, their observation, and SSD's checks.

A twig case is a conformance ``Case`` with a TTP schedule and a ``TwigSpec``: the twig is built once in
float64 from the case's float64 model (``from_base``, ``from_base`` plus seeded noise, or the layer classes'
own seeded init) and cast to each run's dtype, so every run sees the same twig weights, as every run sees the
same base weights.

SSD is checked against the exact greedy decode under teacher forcing ([twig.ssd.lossless]): the float64
reference, with the implementation's own decisions forced, is fed the implementation's SSD tokens, giving
``g*_j``, the exact greedy-step logits after SSD's first j tokens; the yardstick (the reference in the dtype
under test, one-token steps) gives the error ``e`` a plain decode makes, ``β = 2e + floor``. Every SSD token
must be ``argmax g*_j`` unless ``g*_j``'s top-2 gap is at most ``2β``, and its logits must lie within ``β``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from rerouting.reference import RoutingConfig, Schedule, Scorer, Twig, decode_step
from rerouting.reference.ssd import SpeculationOptions

from ..impls import Checked, ReferenceImpl
from ..protocol import check
from .hosts import HostSpec, hosts
from .runs import Observation, _rounding_noise, mca_runs
from .strategies import Case, dtypes, layouts
from .tolerance import compare, rounding_floor

_REFERENCE = ReferenceImpl()
TWIG_INITS = ("base", "noisy", "random")


@dataclass(frozen=True)
class TwigSpec:
    """[twig.module] The drawn twig: K, T and how it is initialised (``TWIG_INITS``), with a seed."""

    first_layer: int
    num_layers: int
    init: str = "base"
    seed: int = 0

    def build64(self, model64) -> Twig:
        """[twig.init-from-base] The twig in float64 from the case's float64 model."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.init == "random":
                twig = Twig.empty(model64, self.first_layer, self.num_layers)
                for name, param in twig.named_parameters():  # visible attention, as tiny models get
                    if name.endswith(("q_proj.weight", "k_proj.weight")):
                        param.data.normal_(0.0, 0.3)
                return twig.to(torch.float64)
            twig = Twig.from_base(model64, self.first_layer, self.num_layers)
        if self.init == "noisy":
            generator = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                for param in twig.parameters():
                    scale = 0.3 * float(param.abs().mean())
                    param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * scale)
        return twig


@dataclass(frozen=True)
class TwigCase:
    """A TTP case: the conformance case and its twig."""

    case: Case
    twig: TwigSpec

    @functools.cached_property
    def _twig64(self) -> Twig:
        return self.twig.build64(self.case.model64())

    def twig64(self) -> Twig:
        return copy.deepcopy(self._twig64)

    def twig_in(self, dtype: torch.dtype, device: str = "cpu") -> Twig:
        """The twig in ``dtype`` on ``device`` (the float64 weights, cast)."""
        return copy.deepcopy(self._twig64).to(device=device, dtype=dtype)


def ttp_schedule(data, num_layers: int, min_visual: int, first_layer: int, *, reroute: bool) -> tuple:
    """[twig.ttp.final-wipe] A TTP schedule: ``(K, F)`` keeping ``(R', 0)`` (``(K,)`` at ``F = L``), or with reroute
    decisions between K and F keeping ``R'`` each ([twig.presets]); returns (schedule, policy)."""
    wipe = data.draw(st.integers(first_layer + 1, num_layers), label="final_wipe")
    kept = data.draw(st.integers(1, max(1, min_visual)), label="kept")
    middle: list[int] = []
    if reroute and wipe - first_layer > 1:
        middle = sorted(
            data.draw(st.sets(st.integers(first_layer + 1, wipe - 1), max_size=2), label="reroute_layers")
        )
    layers = (first_layer, *middle)
    keep = (kept,) * len(layers)
    if wipe < num_layers:
        layers, keep = (*layers, wipe), (*keep, 0)
    return Schedule(layers, keep, unit="count"), ("reroute" if reroute else "remove")


def draw_twig_case(data, *, max_batch: int = 4, padding: str | None = None, max_layers: int = 5) -> TwigCase:
    """A LLaVA twig case: host, left/right padded batch of 1..``max_batch`` with images, K, T, init, schedule."""
    host: HostSpec = data.draw(hosts(min_layers=2, max_layers=max_layers, ties=st.just("none")), label="host")
    layout = data.draw(layouts(max_batch=max_batch, min_images=0, max_images=2), label="layout")
    if padding is not None:
        layout = type(layout)(layout.samples, padding, layout.seed)
    L = host.num_layers
    K = data.draw(st.integers(0, L - 1), label="K")
    T = data.draw(st.integers(1, L - K), label="T")
    init = data.draw(st.sampled_from(TWIG_INITS), label="twig_init")
    routed = [n for n in layout.num_visual(host) if n]
    reroute = data.draw(st.booleans(), label="reroute")
    schedule, policy = ttp_schedule(data, L, min(routed, default=1), K, reroute=reroute)
    scorer = Scorer(kind="twig", twig_layers=T, query=data.draw(st.sampled_from(["last"]), label="query"))
    config = RoutingConfig(schedule, policy=policy, scorer=scorer)
    case = Case(host, layout, config, dtype=data.draw(dtypes(), label="dtype"))
    return TwigCase(case, TwigSpec(K, T, init, data.draw(st.integers(0, 3), label="twig_seed")))


class TwigObservation(Observation):
    """[twig.ttp.score] The implementation's TTP prefill with its truth and yardsticks, all with the case's twig."""

    def __init__(self, impl: Checked, twig_case: TwigCase):
        self.twig_case = twig_case
        case = twig_case.case
        out = impl.prefill(
            case.model(),
            case.config,
            **case.inputs(case.device),
            twig=twig_case.twig_in(case.torch_dtype, case.device),
        )
        super().__init__(impl, case, out=out)

    def _reference(self, model, dtype, twig, kernel="eager"):
        inputs = self.inputs
        return _REFERENCE.prefill(
            model,
            self.case.config,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            forced_selection=self.selections,
            twig=twig,
            compute_dtype=dtype,
            attention=kernel,
        )

    @functools.cached_property
    def truth(self):
        return self._reference(self.case.model64(), torch.float64, self.twig_case.twig64())

    @functools.cached_property
    def yardstick(self):
        dtype = self.case.torch_dtype
        return self._reference(self.case.model_lp(), dtype, self.twig_case.twig_in(dtype))

    @functools.cached_property
    def yardsticks(self):
        case, dtype = self.case, self.case.torch_dtype
        sdpa = self._reference(case.model_lp(), dtype, self.twig_case.twig_in(dtype), "sdpa")
        mca = mca_runs(case, lambda: self._reference(case.model64(), torch.float64, self.twig_case.twig64()))
        return [self.yardstick, sdpa, *mca]


# ---------------------------------------------------------------------------------------------
# SSD
# ---------------------------------------------------------------------------------------------


def forced_decode_logits(obs: TwigObservation, tokens: torch.Tensor, dtype: torch.dtype, *, noise=None):
    """[twig.ssd.lossless] The reference greedy-step logits ``[B, n, V]`` fed ``tokens`` (teacher forcing).

    Step 0 is the prefill's last valid row; step j feeds ``tokens[:, j-1]``. Decisions are forced to the
    implementation's. ``noise``: the unit roundoff of a Monte Carlo arithmetic run on the float64 model.
    """
    case, twig_case = obs.case, obs.twig_case
    model = case.model64() if dtype == torch.float64 else case.model_lp()
    twig = twig_case.twig64() if dtype == torch.float64 else twig_case.twig_in(dtype)

    def run():
        out = obs._reference(model, dtype, twig)
        reference, result = out.state
        layouts = obs.layouts
        rows = [result.logits[b, layout.valid[-1]] for b, layout in enumerate(layouts)]
        steps = [torch.stack(rows)]
        for j in range(tokens.shape[1] - 1):
            steps.append(decode_step(reference, result, tokens[:, j].cpu(), j))
        return torch.stack(steps, dim=1)  # [B, n, V]

    if noise is None:
        return run()
    with _rounding_noise(model, noise[0], seed=noise[1]):
        return run()


def check_ssd(obs: TwigObservation, tokens: torch.Tensor, stats, options: SpeculationOptions) -> None:
    """[twig.ssd.lossless] [twig.ssd.rollback] [twig.ssd.draft] SSD's tokens, logits, rounds and cache lengths."""
    case = obs.case
    dtype = case.torch_dtype
    B, n = tokens.shape
    truth = forced_decode_logits(obs, tokens, torch.float64)  # [B, n, V]
    yard = forced_decode_logits(obs, tokens, dtype)
    family = [yard]
    if dtype != torch.float64:
        u = torch.finfo(dtype).eps / 2
        family += [forced_decode_logits(obs, tokens, torch.float64, noise=(u, 7 + d)) for d in range(2)]
    e = max(float((f.double() - truth.double()).abs().max()) for f in family)
    floor = rounding_floor(truth, dtype)
    beta = 2.0 * e + floor
    for b in range(B):
        for j in range(n):
            g = truth[b, j].double()
            mine = stats.logits[b][j].detach().cpu()
            result = compare(mine, g, yard[b, j], dtype, family_error=e)
            check(
                result.ok,
                "twig.ssd.lossless",
                f"sample {b}, token {j}: " + result.describe("SSD's verify logits", "twig.ssd.lossless"),
                observed=result.error,
                allowed=result.allowed,
            )
            top2 = torch.topk(g, 2).values if g.numel() > 1 else torch.cat([g, g])
            gap = float(top2[0] - top2[1])
            if gap > 2 * beta:
                check(
                    int(tokens[b, j]) == int(g.argmax()),
                    "twig.ssd.lossless",
                    f"sample {b}, token {j}: SSD emitted {int(tokens[b, j])}, greedy's is {int(g.argmax())} "
                    f"(top-2 gap {gap:.3e} > 2β = {2 * beta:.3e}: not a near tie)",
                    observed=int(tokens[b, j]),
                    allowed=int(g.argmax()),
                )
    check_rounds(obs, tokens, stats, options)


def check_rounds(obs: TwigObservation, tokens: torch.Tensor, stats, options: SpeculationOptions) -> None:
    """[twig.ssd.rollback] [twig.ssd.draft] [twig.ssd.batch] Rounds add up; after every verify each group holds
    exactly its prefill entries plus the sample's accepted tokens."""
    B, n = tokens.shape
    trace, twig = obs.out.trace, obs.twig_case.twig
    for b in range(B):
        drafted, accepted = stats.drafted[b], stats.accepted[b]
        check(
            1 + sum(m + 1 for m in accepted) == n,
            "twig.ssd.verify",
            f"sample {b}: rounds emitted {1 + sum(m + 1 for m in accepted)} tokens, expected {n}",
        )
        for r, (d, m) in enumerate(zip(drafted, accepted)):
            check(
                0 <= m <= d <= options.num_speculations,
                "twig.ssd.draft",
                f"sample {b}, round {r}: {d} drafts, {m} accepted (at most num_speculations="
                f"{options.num_speculations}, accepted <= drafted)",
            )
    for r, (lengths, fed) in enumerate(zip(stats.lengths, stats.fed_history)):
        for b in range(B):
            layout, sample = obs.layouts[b], trace.samples[b]
            for layer, got in enumerate(lengths["base"]):
                expected = len(layout.text) + len(sample.active_visual[layer]) + fed[b]
                check(
                    got[b] == expected,
                    "twig.ssd.rollback",
                    f"round {r}, sample {b}, base layer {layer}: {got[b]} entries, expected {expected} "
                    f"(its prefill entries + {fed[b]} accepted tokens)",
                    observed=got[b],
                    allowed=expected,
                )
            for i, got in enumerate(lengths["twig"]):
                expected = layout.length + fed[b]
                check(
                    got[b] == expected,
                    "twig.ssd.rollback",
                    f"round {r}, sample {b}, twig layer {twig.first_layer + i}: {got[b]} entries, expected "
                    f"{expected} (the full prompt {layout.length} + {fed[b]} accepted tokens)",
                    observed=got[b],
                    allowed=expected,
                )


def run_ssd(impl: Checked, twig_case: TwigCase, max_new_tokens: int, options: SpeculationOptions):
    """The implementation's SSD on the case, and its TTP prefill observation (same decisions: same prefill)."""
    case = twig_case.case
    obs = TwigObservation(impl, twig_case)
    tokens, stats = impl.ssd_generate(
        case.model(),
        case.config,
        twig_case.twig_in(case.torch_dtype, case.device),
        **case.inputs(case.device),
        max_new_tokens=max_new_tokens,
        options=options,
    )
    return obs, tokens.cpu(), stats
