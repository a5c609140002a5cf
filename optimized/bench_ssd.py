"""``rerouting bench --decoding ssd``: self-speculative decoding against greedy on the same TTP-routed model.

The model is synthetic, so that the acceptance rate can be set: a random LLaVA whose twig is initialised from
the base (layers K..K+T-1, final norm, ``lm_head``) and whose base layers from K+T on are scaled towards the
identity by ``λ`` (their attention output and MLP down projections times ``λ``): at ``λ = 0`` the base after
K+T adds nothing and the twig drafts what the base would say (up to TTP's pruning, which the twig does not
see), at ``λ = 1`` the base is the random model and drafts are rarely accepted. Both methods decode the same
number of tokens from copies of the same routed prefill; only decoding is timed.

Expected speed-up (Leviathan, Kalman and Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", Theorem 3.8 and Corollary 3.9 / §3.4): with per-token acceptance rate ``α``, ``γ`` drafts per round
and a draft step costing ``c`` of a base step, a round emits ``(1 − α^(γ+1)) / (1 − α)`` tokens on average
and costs ``γ·c + 1`` base steps, so the expected wall-time improvement is
``(1 − α^(γ+1)) / ((1 − α)(γ·c + 1))``. Here ``α`` is estimated from the rounds (accepted drafts over the
drafts examined: a round accepting m of n examined m + 1 positions if m < n, else n), ``γ`` is
``num_speculations`` with the confidence stop off, and ``c = (K + T) / L`` (a draft runs K base layers and T
twig layers of the same shape, a base step L; heads and attention length ignored).

Notation: B batch, S decoded tokens, L base layers, K the twig's first layer, T twig layers.
"""

from __future__ import annotations

import copy

import torch

from rerouting.reference import RoutingConfig, Schedule, Scorer, Twig, host_for
from rerouting.reference.hooks import decoding_strategy
from rerouting.reference.ssd import SpeculationOptions
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

from .bench_timing import timed
from .decode import _decode, last_valid_logits
from .routing import check_attention_implementation, routed_prefill
from .ssd import BatchedSpeculation

SCALES = (0.0, 0.05, 0.1, 0.25, 1.0)  # λ: the base layers after K+T scaled towards the identity
K, T, GAMMA = 2, 3, 5


def expected_speedup(alpha: float, gamma: int, cost: float) -> float:
    """Leviathan et al. 2023, Theorem 3.8 / §3.4: ``(1 − α^(γ+1)) / ((1 − α)(γ·c + 1))`` (α = 1: ``(γ+1)/(γc+1)``)."""
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost + 1)


def acceptance(stats) -> float:
    """Per-token acceptance rate α̂: accepted drafts over the draft positions the base examined."""
    accepted = examined = 0
    for drafted, taken in zip(stats.drafted, stats.accepted):
        for n, m in zip(drafted, taken):
            accepted += m
            examined += m + 1 if m < n else n
    return accepted / examined if examined else 0.0


def synthetic(scale: float, *, quick: bool, dtype: torch.dtype, device: str):
    """The model, its twig (from the base, before scaling), the TTP config and a left-padded batch."""
    layers = 8 if quick else 16
    config = tiny_llava_config(
        num_layers=layers,
        hidden_size=64 if quick else 256,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128 if quick else 688,
        vocab_size=256 if quick else 1024,
        image_size=16 if quick else 32,
    )
    model = tiny_llava(config, seed=3)
    twig = Twig.from_base(model, K, T)
    with torch.no_grad():
        for layer in model.model.language_model.layers[K + T :]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    N, twig_scorer = config.image_seq_length, Scorer(kind="twig", twig_layers=T)
    routings = {  # R' = N: TTP keeping every token (the unrouted base), so λ alone sets the acceptance
        "R'=N": RoutingConfig(Schedule((K,), (N,), unit="count"), policy="remove", scorer=twig_scorer),
        "R'=N/4,F=L-2": RoutingConfig(
            Schedule((K, layers - 2), (max(1, N // 4), 0), unit="count"), policy="remove", scorer=twig_scorer
        ),
    }
    return model.to(device, dtype), twig.to(device, dtype), routings, config


def run_ssd_bench(
    *,
    quick: bool,
    device: str,
    dtype: torch.dtype,
    batches: tuple[int, ...],
    steps: int,
    repeats: int,
    warmup: int,
    clock: str,
    log,
) -> list[dict]:
    """One row per (λ, batch): tokens/s of greedy and SSD, α̂, mean accepted length, measured and expected speed-up."""
    rows = []
    runs = [(scale, "R'=N") for scale in SCALES] + [(0.0, "R'=N/4,F=L-2")]  # the last: pruning's own effect
    for scale, name in runs:
        model, twig, routings, config = synthetic(scale, quick=quick, dtype=dtype, device=device)
        for batch_size in batches:
            specs = [SampleSpec((6 + 3 * b, 4)) for b in range(batch_size)]
            batch = {k: v.to(device) for k, v in make_batch(config, specs, padding="left", seed=5).items()}
            row = _measure(model, twig, routings[name], batch, steps, (device, repeats, warmup, clock))
            row["scale"], row["routing"] = scale, name
            rows.append(row)
            log(
                f"ssd λ={scale:g} {name} B={batch_size}: greedy {row['greedy_tokens_per_s']:.1f} tok/s, ssd "
                f"{row['ssd_tokens_per_s']:.1f} tok/s, α̂={row['alpha']:.2f}, {row['mean_accepted_length']:.2f} per round"
            )
    return rows


def _measure(model, twig, routing: RoutingConfig, batch: dict, steps: int, timing: tuple) -> dict:
    """Greedy and SSD decoding ``steps`` tokens from copies of one routed prefill, timed round-robin."""
    device, repeats, warmup, clock = timing
    host = host_for(model)
    implementation = check_attention_implementation(host)
    options = SpeculationOptions(num_speculations=GAMMA, draft_confidence=0.0)
    result = routed_prefill(model, routing, **batch, twig=twig)
    with torch.no_grad():
        first = last_valid_logits(host, result, batch["attention_mask"])[:, -1]  # [B, V]
    seen = {}

    def fresh():
        state = copy.copy(result)
        state.cache, state.twig_cache = copy.deepcopy(result.cache), copy.deepcopy(result.twig_cache)
        return state

    def greedy(state):
        def step(tokens, j):
            return _decode(host, implementation, state.cache, tokens[:, None])[:, -1]

        with torch.no_grad():
            return decoding_strategy("greedy")(first, step, steps)

    def ssd(state):
        speculation = BatchedSpeculation(model, twig, state, options)
        tokens = decoding_strategy("ssd")(first, speculation, steps)
        seen["stats"] = speculation.stats
        return tokens

    same = torch.equal(greedy(fresh()).cpu(), ssd(fresh()).cpu())
    times = timed({"greedy": greedy, "ssd": ssd}, device, repeats, warmup, clock,
                  setups={"greedy": fresh, "ssd": fresh})  # fmt: skip
    stats, tokens = seen["stats"], first.shape[0] * steps
    alpha, cost = acceptance(stats), (K + T) / len(host.layers)
    return {
        "batch": int(first.shape[0]),
        "steps": steps,
        "greedy_tokens_per_s": tokens / times["greedy"]["median_s"],
        "ssd_tokens_per_s": tokens / times["ssd"]["median_s"],
        "acceptance_rate": stats.acceptance_rate,
        "alpha": alpha,
        "mean_accepted_length": stats.mean_accepted_length,
        "measured_speedup": times["greedy"]["median_s"] / times["ssd"]["median_s"],
        "expected_speedup": expected_speedup(alpha, GAMMA, cost),
        "draft_cost": cost,
        "ssd_equals_greedy": same,
    }


def ssd_table(rows: list[dict]) -> str:
    """The SSD table: one line per (λ, batch)."""
    header = [
        "λ",
        "TTP",
        "B",
        "greedy tok/s",
        "ssd tok/s",
        "accept",
        "α̂",
        "tokens/round",
        "speed-up",
        "expected",
        "same",
    ]
    body = [
        [
            f"{r['scale']:g}",
            r["routing"],
            str(r["batch"]),
            f"{r['greedy_tokens_per_s']:.1f}",
            f"{r['ssd_tokens_per_s']:.1f}",
            f"{r['acceptance_rate']:.2f}",
            f"{r['alpha']:.2f}",
            f"{r['mean_accepted_length']:.2f}",
            f"{r['measured_speedup']:.2f}x",
            f"{r['expected_speedup']:.2f}x",
            "yes" if r["ssd_equals_greedy"] else "NO",
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    cost = rows[0]["draft_cost"] if rows else 0
    note = (
        f"expected: Leviathan et al. 2023 (Thm 3.8), (1 - α^(γ+1)) / ((1 - α)(γc + 1)), γ = {GAMMA}, "
        f"c = (K + T)/L = {cost:.3f}; α̂ from the rounds; accept = accepted / drafted"
    )
    return "\n".join([*lines, note])
