"""Unit tests of spec/twig.md and schedule.keep-zero: the twig module, TTP, the twig presets, SSD and its mutants."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from rerouting.conformance.impls import Checked, OptimizedImpl, ReferenceImpl
from rerouting.conformance.oracle.hosts import HostSpec
from rerouting.conformance.oracle.strategies import Case, Layout
from rerouting.conformance.oracle.twig import TwigCase, TwigSpec
from rerouting.conformance.protocol import ConformanceFailure
from rerouting.conformance.test_twig import check_lossless
from rerouting.optimized import routed_prefill
from rerouting.optimized.ssd import ssd_generate as optimized_ssd
from rerouting.reference import PRESETS, Reference, RoutingConfig, RoutingError, Schedule, Scorer, Twig
from rerouting.reference import ssd as reference_ssd
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget_twig import twig_budget
from rerouting.reference.decode import greedy_generate
from rerouting.reference.flops import layer_flops_true
from rerouting.reference.presets import ttp_config, ttp_keep
from rerouting.reference.ssd import SpeculationOptions, ssd_generate, twig_prefill
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config
from rerouting.reference.twig import release_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

L = 6
CONFIG = tiny_llava_config(num_layers=L)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(CONFIG)


@pytest.fixture(scope="module")
def batch():
    return make_batch(CONFIG, [SampleSpec((5, 3)), SampleSpec((7, 2)), SampleSpec((2, 1))], padding="left")


def ttp(kept: int, wipe: int, T: int, K: int = 2) -> RoutingConfig:
    schedule = Schedule((K,) if wipe == L else (K, wipe), (kept,) if wipe == L else (kept, 0), unit="count")
    return RoutingConfig(schedule, policy="remove", scorer=Scorer(kind="twig", twig_layers=T))


# --- the twig module -------------------------------------------------------------------------------


@pytest.mark.spec("twig.init-from-base", "twig.module")
def test_a_full_twig_from_the_base_gives_the_base_logits(model, batch):
    twig = Twig.from_base(model, 2, L - 2)
    assert [layer.self_attn.layer_idx for layer in twig.layers] == list(range(2, L))
    assert all(type(a) is type(b) for a, b in zip(twig.layers, model.model.language_model.layers))
    reference = Reference(model, ttp(16, L, L - 2), twig=twig)
    dense = Reference(model, RoutingConfig(Schedule((2,), (1.0,)))).prefill(**batch)
    for b, (_, logits) in enumerate(twig_prefill(reference, **batch)):
        valid = batch["attention_mask"][b].bool()
        assert torch.equal(
            logits, dense.logits[b, valid]
        )  # the same layers on the same inputs: bit-identical
    with torch.no_grad():
        twig.layers[0].mlp.up_proj.weight.add_(1.0)  # a copy: the base is untouched
    assert not torch.equal(
        twig.layers[0].mlp.up_proj.weight, model.model.language_model.layers[2].mlp.up_proj.weight
    )


@pytest.mark.spec("twig.ttp.score", "twig.ttp.final-wipe", "routing.equiv.keep-all")
def test_ttp_keeping_every_token_without_a_wipe_is_the_unrouted_base(model, batch):
    twig = Twig.from_base(model, 2, 2)
    routed = Reference(model, ttp(16, L, 2), twig=twig).prefill(**batch)
    dense = Reference(model, RoutingConfig(Schedule((2,), (1.0,)))).prefill(**batch)
    assert torch.equal(routed.logits, dense.logits)
    with torch.no_grad():
        host = model(**batch, use_cache=False).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(routed.logits[mask], host[mask], atol=1e-5)
    fast = routed_prefill(model, ttp(16, L, 2), **batch, twig=twig)
    assert torch.allclose(fast.logits[mask], host[mask], atol=1e-5)


@pytest.mark.spec("twig.module", "twig.ttp.score", "twig.ttp.final-wipe")
def test_bad_twigs_and_schedules_name_value_and_rule(model, batch):
    with pytest.raises(RoutingError, match=r"T=5 layers from K=2 .*K \+ T <= L=6.*twig.module"):
        Twig.from_base(model, 2, 5)
    other = tiny_llava(tiny_llava_config(num_layers=L, hidden_size=48, num_heads=4))
    with pytest.raises(RoutingError, match=r"hidden size 48 does not match the base's 32.*twig.module"):
        Reference(model, ttp(4, L, 2), twig=Twig.from_base(other, 2, 2))
    with pytest.raises(RoutingError, match=r"F=2 must satisfy K < F <= L \(K=2, L=6\).*twig.ttp.final-wipe"):
        ttp_config(8, num_layers=L, first_layer=2, final_wipe=2, num_visual=16)
    with pytest.raises(RoutingError, match=r"F=7 .*twig.ttp.final-wipe"):
        ttp_config(8, num_layers=L, first_layer=2, final_wipe=7, num_visual=16)
    twig = Twig.from_base(model, 2, 2)
    with pytest.raises(RoutingError, match=r"needs a twig.*twig.ttp.score"):
        Reference(model, ttp(4, L, 2))
    with pytest.raises(
        RoutingError, match=r"K=1 but the schedule's first decision layer is 2.*twig.ttp.score"
    ):
        routed_prefill(model, ttp(4, L, 2), **batch, twig=Twig.from_base(model, 1, 2))
    with pytest.raises(RoutingError, match=r"twig_layers=3 layers, the twig has T=2.*twig.ttp.score"):
        Reference(model, ttp(4, L, 3), twig=twig)
    with pytest.raises(RoutingError, match=r"probe_layer='previous' with kind='twig'.*twig.ttp.score"):
        Scorer(kind="twig", probe_layer="previous")
    with pytest.raises(RoutingError, match=r"twig_layers=2 needs kind='twig'.*twig.ttp.score"):
        Scorer(twig_layers=2)
    with pytest.raises(RoutingError, match=r"scorer is 'attention'.*would do nothing.*twig.ttp.score"):
        Reference(model, RoutingConfig(Schedule((2,), (0.5,))), twig=twig)


@pytest.mark.spec("twig.format")
def test_twig_folder_round_trip_and_the_release_key_mapping(model, tmp_path, batch):
    twig = Twig.from_base(model, 2, 3)
    twig.save(tmp_path / "twig")
    meta = json.loads((tmp_path / "twig" / "twig.json").read_text())
    assert meta == {"format": "rerouting-twig", "version": 1, "first_layer": 2, "num_layers": 3,
                    "hidden_size": 32, "vocab_size": 96}  # fmt: skip
    loaded = Twig.load(tmp_path / "twig", model)
    assert all(torch.equal(a, b) for a, b in zip(twig.state_dict().values(), loaded.state_dict().values()))
    # the release's layout: model.twig_layers.i.*, model.twig_norm.weight, twig_head.weight, among base weights
    release = {
        f"model.twig_layers.{k.removeprefix('layers.')}": v
        for k, v in twig.state_dict().items()
        if k.startswith("layers.")
    }
    release |= {"model.twig_norm.weight": twig.norm.weight, "twig_head.weight": twig.head.weight}
    release["model.embed_tokens.weight"] = torch.zeros(3)
    mapped, rest = release_state_dict(release)
    assert rest == ["model.embed_tokens.weight"]
    assert mapped.keys() == twig.state_dict().keys()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in mapped.items()}, str(tmp_path / "twig" / "twig.safetensors"))
    assert torch.equal(Twig.load(tmp_path / "twig", model).head.weight, twig.head.weight)
    save_file({"norm.weight": twig.norm.weight.contiguous()}, str(tmp_path / "twig" / "twig.safetensors"))
    with pytest.raises(RoutingError, match=r"missing keys \['head.weight'.*twig.format"):
        Twig.load(tmp_path / "twig", model)
    (tmp_path / "twig" / "twig.json").write_text(json.dumps(meta | {"hidden_size": 64}))
    with pytest.raises(
        RoutingError, match=r"hidden_size=64 does not match the base's hidden_size=32.*twig.module"
    ):
        Twig.load(tmp_path / "twig", model)


# --- R', k = 0, presets ----------------------------------------------------------------------------


@pytest.mark.spec("twig.ttp.budget")
def test_kept_count_from_the_target_average():
    llava = {"num_layers": 32, "first_layer": 2, "final_wipe": 24, "num_visual": 576}
    assert [ttp_keep(r, **llava) for r in (64, 128, 192)] == [41, 134, 227]  # README: attention_rank 41
    realized = [(2 * 576 + 22 * k) / 32 for k in (41, 134, 227)]
    assert [round(a, 2) for a in realized] == [64.19, 128.12, 192.06]
    assert ttp_keep(64, **(llava | {"final_wipe": 32})) == 30  # no wipe: ceil(29.87)
    with pytest.raises(RoutingError, match=r"R̄=36 gives R'=0, outside 1..N=576.*twig.ttp.budget"):
        ttp_keep(36, **llava)
    with pytest.raises(RoutingError, match=r"R'=578, outside .*\(36, 432\].*twig.ttp.budget"):
        ttp_keep(433, **llava)
    with pytest.raises(RoutingError, match=r"not an integer or a Fraction.*twig.ttp.budget"):
        ttp_keep(64.5, **llava)


@pytest.mark.spec("schedule.keep-zero")
def test_keep_zero_only_at_the_last_decision(model, batch):
    assert Schedule((1, 3), (4, 0), unit="count").keep_count(1, 16) == 0
    assert Schedule((3,), (0,), unit="count").keep_count(0, 16) == 0
    with pytest.raises(RoutingError, match=r"keep ratio 0.0 is outside \(0, 1\].*schedule.keep-ratio"):
        Schedule((1, 3), (0.5, 0.0))
    with pytest.raises(
        RoutingError,
        match=r"keep target 0 at decision layer 1: .*last decision \(layer 3\).*schedule.keep-zero",
    ):
        Schedule((1, 3), (0, 4), unit="count")
    for policy in ("remove", "reroute"):
        for kind in ("attention", "random"):
            config = RoutingConfig(
                Schedule((1, 4), (8, 0), unit="count"), policy=policy, scorer=Scorer(kind=kind)
            )
            ref = Reference(model, config).prefill(**batch)
            fast = routed_prefill(model, config, **batch)
            for sample, other in zip(ref.trace.samples, fast.trace.samples):
                wipe = sample.decisions[-1]
                assert (wipe.k, wipe.selected, wipe.probe_keys, wipe.probe_queries) == (0, (), 0, 0)
                assert not wipe.scores.any() and sample.active_visual[4:] == ((),) * (L - 4)
                assert [d.selected for d in sample.decisions] == [d.selected for d in other.decisions]
            mask = batch["attention_mask"].bool()
            assert torch.allclose(ref.logits[mask], fast.logits[mask], atol=1e-5)


@pytest.mark.spec("twig.presets", "twig.budget", "budget.avg-tokens")
def test_twig_presets_on_a_576_token_llava():
    config = tiny_llava_config(num_layers=32, image_size=96)  # 24 x 24 = 576 visual tokens
    big = tiny_llava(config)
    inputs = make_batch(config, [SampleSpec((4, 3))])
    twig = Twig.from_base(big, 2, 3)
    from rerouting.reference.budget import avg_visual_tokens

    for name, kept in (("twig_K2_T3_avg64", 41), ("twig_reroute_K2_T3_avg64", 41)):
        result = routed_prefill(big, PRESETS[name], **inputs, twig=twig)
        sample = result.trace.samples[0]
        counts = [len(a) for a in sample.active_visual]
        assert counts == [576] * 2 + [kept] * 22 + [0] * 8
        assert round(avg_visual_tokens(counts), 2) == 64.19
        assert [int(e) for e in result.twig_cache.entries[2:5]] == [583] * 3  # the twig's full-prompt KV
        b = twig_budget(sample, ArchSpec.from_model(big), first_layer=2, twig_layers=3)
        assert b.kv_entries["base_prefix"] == (583, 583) and b.kv_entries["twig"] == (583,) * 3
        assert list(b.kv_entries["base_routed"]) == [
            int(e) for e in result.cache.entries[2:]
        ]  # the real cache
        assert b.twig_visual_token_layers == 3 * 576 and round(b.avg_visual_tokens, 2) == 64.19
        assert b.twig_flops_true == 3 * sum(layer_flops_true(ArchSpec.from_model(big), 583).values())
    with pytest.raises(RoutingError, match=r"twig_layers=3 layers, the twig has T=2"):
        routed_prefill(big, PRESETS["twig_K2_T3_avg64"], **inputs, twig=Twig.from_base(big, 2, 2))


# --- SSD ---------------------------------------------------------------------------------------------


@pytest.mark.spec("twig.ssd.lossless", "twig.ssd.batch", "twig.ssd.rollback", "cache.decoding-strategy")
@pytest.mark.parametrize("T", [4, 2])
def test_ssd_equals_greedy_in_both_implementations(model, batch, T):
    twig = Twig.from_base(model, 2, T)
    config = ttp(6, 5, T)
    reference = Reference(model, config, twig=twig)
    greedy, _ = greedy_generate(reference, **batch, max_new_tokens=9)
    options = SpeculationOptions(draft_confidence=0.0)
    mine, stats = ssd_generate(reference, **batch, max_new_tokens=9, options=options)
    fast, fast_stats, _ = optimized_ssd(model, config, twig, **batch, max_new_tokens=9, options=options)
    assert torch.equal(greedy, mine) and torch.equal(greedy, fast)
    assert stats.drafted == fast_stats.drafted and stats.accepted == fast_stats.accepted
    assert stats.lengths == fast_stats.lengths
    assert 0 < stats.acceptance_rate <= 1 and stats.mean_accepted_length >= 1


@pytest.mark.spec("cache.decoding-strategy", "twig.ssd.draft")
def test_ssd_strategy_needs_a_speculation_and_valid_options():
    from rerouting.reference.hooks import decoding_strategy

    with pytest.raises(RoutingError, match=r"'ssd' needs a twig's speculation.*cache.decoding-strategy"):
        decoding_strategy("ssd")(torch.zeros(1, 4), lambda tokens, j: torch.zeros(1, 4), 3)
    with pytest.raises(RoutingError, match=r"num_speculations=0 .*twig.ssd.draft"):
        SpeculationOptions(num_speculations=0)
    with pytest.raises(RoutingError, match=r"draft_confidence=1.5 .*twig.ssd.draft"):
        SpeculationOptions(draft_confidence=1.5)


MUTANT_CASE = TwigCase(
    Case(
        HostSpec(
            num_layers=4,
            hidden_size=32,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            intermediate_size=40,
            grid=3,
        ),
        Layout(((3, 4), (2, 3), (1, 2)), "left", 7),
        ttp(4, 3, 2, K=1),
    ),
    TwigSpec(1, 2, "base"),
)
OPTIONS = SpeculationOptions(num_speculations=3, draft_confidence=0.0)


@contextlib.contextmanager
def patched(target, name: str, value):
    saved = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, saved)


@pytest.mark.spec("twig.ssd.lossless", "twig.ssd.rollback")
@pytest.mark.parametrize("impl", [ReferenceImpl(), OptimizedImpl()], ids=["reference", "optimized"])
def test_the_fixed_ssd_case_passes(impl):
    check_lossless(Checked(impl), MUTANT_CASE.case, MUTANT_CASE, 8, OPTIONS)


@pytest.mark.spec("twig.ssd.lossless")
def test_accepting_one_draft_too_many_is_caught():
    def one_too_many(drafts, base_tokens):
        m = 0
        while m < len(drafts) and drafts[m] == base_tokens[m]:
            m += 1
        return min(m + 1, len(drafts))

    with patched(reference_ssd, "accepted_count", one_too_many), pytest.raises(ConformanceFailure) as caught:
        check_lossless(Checked(OptimizedImpl()), MUTANT_CASE.case, MUTANT_CASE, 8, OPTIONS)
    assert caught.value.rule == "twig.ssd.lossless", caught.value


@pytest.mark.spec("twig.ssd.rollback")
def test_forgetting_to_roll_back_the_twig_cache_is_caught():
    """The twig keeps its rejected drafts: its tokens stay lossless (the base verifies), its lengths do not."""

    def base_only(self, kept):
        for b, (fed, states) in enumerate(self.round):
            drop = len(fed) - int(kept[b]) if states else 0
            for layer in self.caches[b].layers:
                reference_ssd._drop(layer, drop)
            self.fed[b] += int(kept[b])

    with (
        patched(reference_ssd.ReferenceSpeculation, "rollback", base_only),
        pytest.raises(ConformanceFailure) as caught,
    ):
        check_lossless(Checked(ReferenceImpl()), MUTANT_CASE.case, MUTANT_CASE, 8, OPTIONS)
    assert caught.value.rule == "twig.ssd.rollback", caught.value
    assert "twig layer" in str(caught.value)


@pytest.mark.spec("twig.budget", "twig.ssd.lossless")
def test_ssd_bench_formula_and_a_settable_acceptance():
    from rerouting.optimized.bench_ssd import _measure, acceptance, expected_speedup, synthetic
    from rerouting.reference.ssd import SpeculationStats

    assert expected_speedup(1.0, 5, 0.0) == 6.0  # every draft accepted, free drafts: γ + 1 tokens per step
    assert abs(expected_speedup(0.5, 1, 0.5) - 1.5 / 1.5) < 1e-12  # (1 - α²)/(1 - α) = 1.5 tokens, 1.5 steps
    stats = SpeculationStats(drafted=[[5, 5]], accepted=[[5, 2]])
    assert acceptance(stats) == 7 / 8  # 5 of 5 examined, then 2 of 3
    model, twig, routings, config = synthetic(0.0, quick=True, dtype=torch.float32, device="cpu")
    batch = make_batch(config, [SampleSpec((6, 4)), SampleSpec((3, 2))], padding="left", seed=5)
    row = _measure(model, twig, routings["R'=N"], batch, 8, ("cpu", 1, 0, "cpu"))
    assert row["ssd_equals_greedy"] and row["alpha"] == 1.0  # λ = 0, nothing pruned: the twig is the base
