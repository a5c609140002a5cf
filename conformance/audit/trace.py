"""[budget.active-counts] [budget.kv.entries] The audit's real routed prefill on a tiny random LLaVA."""

from __future__ import annotations

import torch

from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace, schedule_trace
from rerouting.reference.schedule import RoutingConfig, Schedule

from .budgets import dtype_name

# The tiny traced run: decisions at layers 1, 2 and 4 of the 6-layer tiny LLaVA, 16 visual tokens (4×4).
TRACE_SCHEDULE = Schedule((1, 2, 4), (0.5, 0.5, 0.25))
TRACE_MODEL_SEED = 0
TRACE_INPUT_SEED = 1
TRACE_TEXT_RUNS = (5, 3)  # 5 text tokens, the image, 3 text tokens


def stages_of(sample, policy: str, bounds: tuple[int, ...]) -> list[dict]:
    """Per stage of one sample's trace: the selected, re-admitted, deferred or removed visual tokens."""
    stages = []
    previous: set[int] | None = None
    for s, decision in enumerate(sample.decisions):
        chosen = set(decision.selected)
        not_chosen = [i for i in range(sample.num_visual) if i not in chosen]
        readmitted = list(sample.readmitted(s))
        stages.append(
            {
                "stage": s,
                "layer": decision.layer,
                "layers": [bounds[s], bounds[s + 1] - 1],
                "k": decision.k,
                "pool": list(decision.pool),
                "selected": list(decision.selected),
                "continuing": [i for i in decision.selected if previous is None or i in previous],
                "readmitted": readmitted,
                "deferred": not_chosen if policy == "reroute" else [],
                "removed": not_chosen if policy == "remove" else [],
                "scores": [round(float(x), 6) for x in decision.scores.tolist()],
                "probe_keys": decision.probe_keys,
            }
        )
        previous = chosen
    return stages


def _policy_run(model, batch: dict, arch: ArchSpec, policy: str, kv_dtype: torch.dtype) -> dict:
    """One routed prefill under ``policy``: its trace, the measured cache lengths and the budget."""
    from rerouting.reference.routing import Reference

    routing = RoutingConfig(TRACE_SCHEDULE, policy=policy)
    result = Reference(model, routing).prefill(**batch)
    sample = result.trace.samples[0]
    measured = [int(result.caches[0].layer_kv(layer)[0].shape[1]) for layer in range(arch.num_layers)]
    model_free = schedule_trace(
        routing,
        num_text=sample.num_text,
        num_visual=sample.num_visual,
        num_layers=arch.num_layers,
        visual_start=sample.visual_positions[0],
    ).samples[0]
    stages = stages_of(sample, policy, (*TRACE_SCHEDULE.layers, arch.num_layers))
    budget = budget_from_trace(result.trace, arch, kv_dtype=kv_dtype, config=routing).samples[0]
    return {
        "policy": policy,
        "num_text": sample.num_text,
        "num_visual": sample.num_visual,
        "visual_positions": list(sample.visual_positions),
        "layer_visual_counts": list(sample.layer_visual_counts),
        "kv_lengths": list(sample.kv_lengths),
        "cache_lengths_measured": measured,
        "cache_matches_trace": measured == list(sample.kv_lengths),
        "model_free_counts_match": model_free.layer_visual_counts == sample.layer_visual_counts
        and model_free.kv_lengths == sample.kv_lengths,
        "readmitted_total": sum(len(stage["readmitted"]) for stage in stages),
        "stages": stages,
        "budget": {
            "avg_visual_tokens": budget.avg_visual_tokens,
            "flops_true": budget.flops_true,
            "probe_flops": budget.probe_flops,
            "kv_entries": budget.kv_entries,
            "kv_bytes": budget.kv_bytes,
            "kv_dtype": dtype_name(kv_dtype),
        },
    }


def traced_run(kv_dtype: torch.dtype = torch.float32) -> dict:
    """[budget.active-counts] [budget.kv.entries] One real routed prefill per policy on a tiny random LLaVA.

    Reference implementation (float32, eager attention) on ``rerouting.reference.tiny``'s 6-layer LLaVA with a
    4×4-patch image (16 visual tokens) between 5 and 3 text tokens, schedule ``TRACE_SCHEDULE``. Per
    stage: the selected, re-admitted, deferred (reroute) or removed (remove) visual tokens. Also checks
    that the model-free trace has the same counts and the real cache the trace's lengths.
    """
    from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava, tiny_llava_config

    config = tiny_llava_config()
    model = tiny_llava(config, seed=TRACE_MODEL_SEED)
    batch = make_batch(config, [SampleSpec(TRACE_TEXT_RUNS)], seed=TRACE_INPUT_SEED)
    arch = ArchSpec.from_model(model, name="tiny-llava")
    side = config.vision_config.image_size // config.vision_config.patch_size
    runs = [_policy_run(model, batch, arch, policy, kv_dtype) for policy in ("reroute", "remove")]
    return {
        "model": {
            "description": "tiny random LLaVA (rerouting.reference.tiny: LLaMA decoder + CLIP tower, random weights)",
            "model_seed": TRACE_MODEL_SEED,
            "input_seed": TRACE_INPUT_SEED,
            "text_runs": list(TRACE_TEXT_RUNS),
            "arch": arch.to_dict(),
            "image_grid": [side, side],
        },
        "implementation": "reference (rerouting.reference.Reference, float32, eager attention)",
        "schedule": {
            "layers": list(TRACE_SCHEDULE.layers),
            "keep": list(TRACE_SCHEDULE.keep),
            "unit": TRACE_SCHEDULE.unit,
        },
        "runs": runs,
    }
