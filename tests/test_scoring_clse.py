"""The CLSE scorer in the reference (spec/clse.md): spectral score, evolution, gate, variants, stages."""

from __future__ import annotations

import math

import pytest
import torch

from rerouting.reference import (
    ImageSpan,
    Reference,
    RoutingConfig,
    RoutingError,
    Schedule,
    Scorer,
    scoring_clse,
)
from rerouting.reference.schedule import ClseParams
from rerouting.reference.scoring_clse import clse_gates, evolution, gate, high_pass_mask, spectral_scores
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")

GRIDS = [(4, 4), (3, 5), (6, 2), (5, 7), (1, 4), (2, 3), (24, 24)]


def direct_high_pass(z: torch.Tensor, rows: int, cols: int, cutoff: float) -> torch.Tensor:
    """The high-pass magnitude by explicit DFT sums in float64 (no FFT): ``[n, C]`` -> ``[n]``."""
    z = z.to(torch.float64).T.reshape(-1, rows, cols)  # [C, H, W]

    def dft(n: int, sign: float) -> torch.Tensor:
        k = torch.arange(n, dtype=torch.float64)
        angle = sign * 2 * math.pi * k[:, None] * k[None, :] / n
        return torch.complex(torch.cos(angle), torch.sin(angle))  # [n, n]

    def centred(n: int) -> torch.Tensor:  # the frequency of bin f, measured from the shifted centre
        f = torch.arange(n, dtype=torch.float64)
        return torch.remainder(f + n // 2, n) - n // 2

    d2 = centred(rows)[:, None] ** 2 + centred(cols)[None, :] ** 2
    sigma = cutoff * min(rows // 2, cols // 2)
    mask = (d2 > 0).double() if sigma == 0 else 1 - torch.exp(-d2 / (2 * sigma**2))
    spectrum = dft(rows, -1) @ z.to(torch.complex128) @ dft(cols, -1).T  # [C, H, W]
    back = dft(rows, 1) @ (spectrum * mask) @ dft(cols, 1).T / (rows * cols)
    return back.abs().mean(dim=0).reshape(-1)


@pytest.mark.spec("clse.spectral")
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cutoff", [0.1, 0.5])
def test_fft_score_equals_direct_high_pass(grid, cutoff):
    rows, cols = grid
    z = torch.randn(
        rows * cols, 6, generator=torch.Generator().manual_seed(rows * 31 + cols), dtype=torch.float64
    )
    torch.testing.assert_close(spectral_scores(z, grid, cutoff), direct_high_pass(z, rows, cols, cutoff))
    single = spectral_scores(z.float(), grid, cutoff)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), direct_high_pass(z, rows, cols, cutoff), rtol=1e-4, atol=1e-5)


@pytest.mark.spec("clse.spectral")
def test_mask_is_a_centred_gaussian_high_pass():
    mask = high_pass_mask(24, 24, 0.1, torch.float64)
    assert mask[12, 12] == 0 and mask.min() == 0  # zero at DC only
    assert mask[12, 13] == pytest.approx(1 - math.exp(-1 / (2 * 1.2**2)))  # sigma = 0.1 * 12 = 1.2 bins
    thin = high_pass_mask(1, 5, 0.1, torch.float64)  # sigma = 0: the limit, only the mean removed
    assert thin.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0]]


@pytest.mark.spec("clse.spectral")
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_spectral_score_invariances(grid):
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    base = spectral_scores(z, grid, 0.1)
    shifted = z + torch.randn(1, 8, generator=gen, dtype=torch.float64) * 10  # one constant feature for all
    torch.testing.assert_close(spectral_scores(shifted, grid, 0.1), base)
    permuted = z[:, torch.randperm(8, generator=gen)]  # channels permuted
    torch.testing.assert_close(spectral_scores(permuted, grid, 0.1), base)
    assert not torch.allclose(spectral_scores(z.roll(1, dims=0), grid, 0.1), base)  # tokens are not channels


@pytest.mark.spec("clse.evolution", "clse.gate")
def test_evolution_and_gate_formulas():
    s_ref = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    s_dec = torch.tensor([1.5, 2.0, 9.0, 4.0], dtype=torch.float64)
    e = evolution(s_ref, s_dec, 1e-6)
    mean = 1.5
    expected = [0.5 / (mean + 1 + 1e-6), 0.0, 1.0, min(1.0, 4 / (mean + 1e-6))]
    torch.testing.assert_close(e, torch.tensor(expected, dtype=torch.float64))
    g = gate(e, 0.1, 1e-6)
    z = (e - e.mean()) / (e.std(unbiased=True) + 1e-6)
    torch.testing.assert_close(g, torch.sigmoid(z / 0.1))
    assert gate(torch.tensor([0.3]), 0.1, 1e-6).tolist() == [0.5]  # one token: z = 0


@pytest.mark.spec("clse.images", "clse.grid")
def test_images_are_gated_on_their_own_grids():
    gen = torch.Generator().manual_seed(5)
    ref, dec = torch.randn(16 + 15, 4, generator=gen), torch.randn(16 + 15, 4, generator=gen)
    params = ClseParams()
    images = (ImageSpan(0, 16, (4, 4)), ImageSpan(16, 31, (3, 5)))
    both = clse_gates(ref, dec, images, params)
    first = clse_gates(ref[:16], dec[:16], (ImageSpan(0, 16, (4, 4)),), params)
    second = clse_gates(ref[16:], dec[16:], (ImageSpan(0, 15, (3, 5)),), params)
    torch.testing.assert_close(both, torch.cat([first, second]))
    for bad in ((ImageSpan(0, 31, None),), (ImageSpan(0, 16, (4, 4)), ImageSpan(16, 31, (4, 4))), images[:1]):
        with pytest.raises(RoutingError, match=r"clse\.grid"):
            clse_gates(ref, dec, bad, params)


@pytest.mark.spec("clse.params", "clse.scorer")
@pytest.mark.parametrize(
    "kwargs",
    [
        {"cutoff": 0.0},
        {"cutoff": 1.5},
        {"tau": 0},
        {"eps": -1.0},
        {"reference_layer": -1},
        {"reference_layer": 1.0},
        {"variant": "hybrid"},
        {"spectral_stages": "some"},
        {"cutoff": True},
    ],
)
def test_params_are_validated(kwargs):
    with pytest.raises(RoutingError, match=r"clse\.params"):
        ClseParams(**kwargs)


@pytest.mark.spec("clse.params", "clse.scorer")
def test_params_defaults_and_scorer():
    params = Scorer(kind="clse").clse
    assert (params.cutoff, params.tau, params.eps, params.reference_layer) == (0.1, 0.1, 1e-6, 0)
    assert (params.variant, params.spectral_stages) == ("clse_attn", "first")
    with pytest.raises(RoutingError, match=r"clse\.scorer"):
        Scorer(kind="attention", clse=ClseParams())


@pytest.mark.spec("clse.reference-layer", "clse.stages", "clse.variants")
def test_config_checks():
    three = Schedule((1, 3, 5), (8, 6, 4), unit="count")
    with pytest.raises(RoutingError, match=r"clse\.reference-layer"):
        RoutingConfig(
            Schedule((2,), (8,), unit="count"), scorer=Scorer(kind="clse", clse=ClseParams(reference_layer=2))
        )
    every = Scorer(kind="clse", clse=ClseParams(spectral_stages="every"))
    RoutingConfig(three, policy="reroute", scorer=every)
    with pytest.raises(RoutingError, match=r"clse\.stages"):
        RoutingConfig(three, policy="remove", scorer=every)
    with pytest.raises(RoutingError, match=r"clse\.variants"):
        RoutingConfig(three, scorer=Scorer(kind="clse", clse=ClseParams(variant="clse")))


@pytest.fixture(scope="module")
def model_and_batch():
    config = tiny_llava_config(num_layers=6)
    batch = make_batch(config, [SampleSpec((5, 3)), SampleSpec((2, 4, 6))], padding="left", seed=4)
    return tiny_llava(config, seed=1), batch


def _scores(model, batch, scorer, policy="reroute", layers=(1, 3, 4), keep=(12, 8, 4)):
    config = RoutingConfig(Schedule(layers, keep, unit="count"), policy=policy, scorer=scorer)
    trace = Reference(model, config).prefill(**batch).trace
    return [[d.scores for d in s.decisions] for s in trace.samples], trace


@pytest.mark.spec("clse.variants")
@pytest.mark.parametrize("probe_layer", ["decision", "previous"])
def test_attn_variant_is_the_attention_probe(model_and_batch, probe_layer):
    model, batch = model_and_batch
    clse, _ = _scores(
        model, batch, Scorer(kind="clse", probe_layer=probe_layer, clse=ClseParams(variant="attn"))
    )
    probe, _ = _scores(model, batch, Scorer(probe_layer=probe_layer))
    for a, b in zip(clse, probe):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.spec("clse.variants", "clse.stages")
def test_gate_forced_to_one_is_the_attention_probe(model_and_batch, monkeypatch):
    model, batch = model_and_batch
    probe, _ = _scores(model, batch, Scorer(probe_layer="previous"))
    real, _ = _scores(model, batch, Scorer(kind="clse", probe_layer="previous"))
    monkeypatch.setattr(scoring_clse, "clse_gates", lambda ref, dec, images, params: torch.ones(ref.shape[0]))
    forced, _ = _scores(model, batch, Scorer(kind="clse", probe_layer="previous"))
    for a, b, r in zip(forced, probe, real):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        assert not torch.equal(r[0], b[0])  # the real gate changes decision 0


@pytest.mark.spec("clse.scorer", "clse.reference-layer", "clse.images")
def test_first_decision_is_gate_of_embeddings_vs_layer_one_input_times_attention(model_and_batch):
    model, batch = model_and_batch
    scores, _ = _scores(model, batch, Scorer(kind="clse"))
    probe, _ = _scores(model, batch, Scorer())
    with torch.no_grad():  # the unrouted model: decision 0 at layer 1 follows the dense layer 0
        states = model(**batch, output_hidden_states=True).hidden_states  # [0]: decoder input, [1]: layer 1's
    host = Reference(model, RoutingConfig(Schedule((1,), (4,), unit="count"))).host
    for b, layout in enumerate(host.layouts(batch["input_ids"], batch["attention_mask"])):
        visual = layout.valid[list(layout.visual)]
        gates = clse_gates(states[0][b, visual], states[1][b, visual], layout.images, ClseParams())
        torch.testing.assert_close(scores[b][0], gates * probe[b][0], rtol=1e-4, atol=1e-7)
        assert len(layout.images) == 2 if b == 1 else 1


@pytest.mark.spec("clse.variants")
def test_clse_variant_runs_no_probe(model_and_batch):
    model, batch = model_and_batch
    scores, trace = _scores(
        model, batch, Scorer(kind="clse", clse=ClseParams(variant="clse")), layers=(1,), keep=(6,)
    )
    assert all(d.probe_keys == d.probe_queries == 0 for s in trace.samples for d in s.decisions)
    assert all(((s[0] >= 0) & (s[0] <= 1)).all() and s[0].std() > 0.1 for s in scores)  # a near-hard gate
