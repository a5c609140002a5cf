"""Benchmark of the optimized path on a mid-size LLaMA-shaped LLaVA with random weights (``rerouting bench``).

Side by side in one run, per keep tier and batch size:

- ``dense``: the host's own unrouted forward, ``model(**inputs, use_cache=True, logits_to_keep=1)``;
- ``remove``: optimized remove, one decision (FastV-K1 shape: layer 1 keeps k);
- ``reroute``: optimized reroute, a decision every other layer (1, 3, 5, ...) keeping the same k, so both
  policies run exactly the same per-layer token counts ([budget.active-counts]) and differ only by the
  re-probes and re-gathers;
- ``reference``: the reference reroute (batch 1 only, fewer repeats), against ``reroute_full``, the optimized
  reroute producing the same outputs as the reference (logits of every position).

Model: 8 LLaMA layers (hidden 1024, 16 heads, no GQA, intermediate 2816, vocabulary 32064), 576 visual tokens
(one 336 px image, patch 14) + 60 text tokens; the vision tower is ``tiny_llava_config``'s small CLIP (hidden
32, 2 layers), so the times are the decoder's. A tier is the kept count k after each decision; its realized
avg_T over the 8 layers ((576 + 7k) / 8, layer 0 dense) is recorded next to it.

The timed prefills of dense / remove / reroute return the last position's logits (what ``generate`` asks
for). Times are medians over ``--repeats`` runs after a warm-up. Peak memory is the extra memory of one call:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``) above the resident set before the call, with glibc's ``mmap`` threshold
pinned so freed tensors go back to the system (``tracemalloc`` does not see torch's allocations).

The FLOPs bound is the dense/routed ratio of decoder FLOPs from the trace's per-layer token counts
(``rerouting.reference.budget`` and ``rerouting.reference.flops``, [budget.flops.true]); the probes' FLOPs
([budget.flops.probe]) are counted apart, and ``reroute_over_remove_flops`` is the ratio the two policies'
decoder + probe FLOPs predict: reroute re-probes every valid token at each of its decisions, remove probes
once, so this ratio is the floor of what the timed ratio can reach.

On a shared machine, ``--threads 1 --clock cpu`` gives steady ratios (process CPU time of one thread is
barely disturbed by other processes; both clocks are always recorded).

Notation: B batch, T prompt length, N visual tokens per sample, k kept visual tokens, L decoder layers.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import LlavaForConditionalGeneration

from rerouting.reference import Reference, RoutingConfig, Schedule, Trace
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace
from rerouting.reference.flops import avg_visual_tokens, layer_flops_true
from rerouting.reference.tiny import SampleSpec, make_batch, tiny_llava_config

from .routing import routed_prefill

TARGETS = {
    "reroute_over_remove_max": 1.10,
    "speedup_over_bound_min_at_smallest_tier": 0.7,
    "optimized_over_reference_min": 4.0,
}


@dataclass(frozen=True)
class Shape:
    """The benchmarked model and prompt."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    image_size: int
    patch_size: int
    text_runs: tuple[int, int]  # text before and after the image
    tiers: tuple[int, ...]  # kept visual tokens k per tier

    @property
    def num_visual(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prompt_length(self) -> int:
        return self.num_visual + sum(self.text_runs)


FULL = Shape(8, 1024, 16, 16, 2816, 32064, 336, 14, (35, 25), (192, 128, 64))  # 576 visual + 60 text
QUICK = Shape(4, 128, 4, 4, 352, 1000, 64, 8, (10, 6), (21, 14, 7))  # 64 visual; tiers scaled by 64/576


def build_model(shape: Shape, dtype: torch.dtype, device: str) -> LlavaForConditionalGeneration:
    """A LLaVA (LLaMA decoder, CLIP tower) from a real config with random weights, SDPA attention."""
    config = tiny_llava_config(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval()


def schedules(shape: Shape, k: int) -> dict[str, RoutingConfig]:
    """Reroute (decisions 1, 3, 5, ...) and remove (decision 1) keeping the same k: equal per-layer counts."""
    reroute_layers = tuple(range(1, shape.num_layers, 2))
    return {
        "reroute": RoutingConfig(
            Schedule(reroute_layers, (k,) * len(reroute_layers), unit="count"), policy="reroute"
        ),
        "remove": RoutingConfig(Schedule((1,), (k,), unit="count"), policy="remove"),
    }


def flops(trace: Trace, arch: ArchSpec, config: RoutingConfig) -> dict[str, int]:
    """Decoder FLOPs of the batch from the trace ([budget.flops.true], reference/budget.py and
    reference/flops.py): dense (every token at every layer), routed (the trace's per-layer counts) and the
    probes apart ([budget.flops.probe])."""
    routed = budget_from_trace(trace, arch, config=config)
    dense = sum(sum(layer_flops_true(arch, s.seq_len).values()) * trace.num_layers for s in trace.samples)
    return {"dense": dense, "routed": routed.flops_true, "probe": routed.probe_flops}


# --- measurement -----------------------------------------------------------------------------------


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(
    fns: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int, clock: str = "wall"
) -> dict[str, dict]:
    """Median time of each function over ``repeats`` runs after ``warmup`` runs, wall and CPU clocks.

    The functions run round-robin (the order rotating every round), so a slow phase of a shared machine
    hits every method alike and the ratios stay paired. ``median_s`` is the ``clock`` chosen for the ratios:
    ``wall`` (``perf_counter``) or ``cpu`` (``process_time``: the CPU time of this process, which other
    processes on a shared machine barely disturb when torch runs one thread).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            _synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    out = {}
    for name in names:
        runs = {"wall": wall[name], "cpu": cpu[name]}
        out[name] = {
            "median_s": statistics.median(runs[clock]),
            "min_s": min(runs[clock]),
            "wall_median_s": statistics.median(wall[name]),
            "cpu_median_s": statistics.median(cpu[name]),
            "wall_runs_s": wall[name],
            "cpu_runs_s": cpu[name],
        }
    return out


def _proc_status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _pin_mmap_threshold() -> bool:
    """Make glibc hand large freed blocks back at once, so the resident set follows live tensors."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Extra memory (bytes) of one call of ``fn``; None where it cannot be measured."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _proc_status("VmRSS")
        fn()
        return _proc_status("VmHWM") - before
    except (OSError, AttributeError):
        return None


# --- the run ---------------------------------------------------------------------------------------


def run(
    shape: Shape,
    *,
    device: str,
    dtype: torch.dtype,
    batches: tuple[int, ...],
    repeats: int,
    reference_repeats: int,
    warmup: int,
    clock: str = "wall",
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every method at every tier and batch size; return the JSON-ready record."""
    pinned = device == "cpu" and _pin_mmap_threshold()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    model = build_model(shape, dtype, device)
    arch = ArchSpec.from_model(model)
    rows = []
    for batch_size in batches:
        batch = make_batch(model.config, [SampleSpec(shape.text_runs)] * batch_size, seed=batch_size)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)

        def dense(batch=batch):
            with torch.no_grad():
                return model(**batch, use_cache=True, logits_to_keep=1)

        dense_memory = peak_memory(dense, device)
        for k in shape.tiers:
            configs = schedules(shape, k)
            fns = {"dense": dense}
            for policy, config in configs.items():
                fns[policy] = functools.partial(routed_prefill, model, config, **batch, logits_to_keep=1)
            times = timed(fns, device, repeats, warmup, clock)
            memory = {"dense": dense_memory, **{p: peak_memory(fns[p], device) for p in configs}}
            traces = {policy: fns[policy]().trace for policy in configs}
            counts = {policy: [s.layer_visual_counts for s in t.samples] for policy, t in traces.items()}
            assert counts["reroute"] == counts["remove"], counts  # same per-layer work by construction
            budget = {policy: flops(traces[policy], arch, configs[policy]) for policy in configs}
            bound = budget["reroute"]["dense"] / budget["reroute"]["routed"]
            ratios = {
                "reroute_over_remove": times["reroute"]["median_s"] / times["remove"]["median_s"],
                "reroute_over_remove_flops": (budget["reroute"]["routed"] + budget["reroute"]["probe"])
                / (budget["remove"]["routed"] + budget["remove"]["probe"]),
                "dense_over_reroute": times["dense"]["median_s"] / times["reroute"]["median_s"],
                "flops_bound": bound,
            }
            ratios["speedup_over_bound"] = ratios["dense_over_reroute"] / bound
            # The reference runs on CPU in float32/float64: compare it where it runs the same model.
            if batch_size == 1 and device == "cpu" and dtype in (torch.float32, torch.float64):
                reference = Reference(model, configs["reroute"])
                pair = {
                    "reference": functools.partial(reference.prefill, **batch),
                    "reroute_full": functools.partial(routed_prefill, model, configs["reroute"], **batch),
                }
                times.update(timed(pair, device, reference_repeats, min(warmup, 1), clock))
                memory.update({name: peak_memory(fn, device) for name, fn in pair.items()})
                ratios["reference_over_optimized"] = (
                    times["reference"]["median_s"] / times["reroute_full"]["median_s"]
                )
            sample = traces["reroute"].samples[0]
            rows.append(
                {
                    "batch": batch_size,
                    "k": k,
                    "avg_visual_tokens": avg_visual_tokens(sample.layer_visual_counts),
                    "layer_visual_counts": list(sample.layer_visual_counts),
                    "times": times,
                    "peak_memory_bytes": memory,
                    "flops": budget["reroute"],
                    "flops_remove": budget["remove"],
                    "ratios": ratios,
                }
            )
            log(_row_line(rows[-1]))
    record = {
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "shape": {**asdict(shape), "num_visual": shape.num_visual, "prompt_length": shape.prompt_length},
        "arch": arch.to_dict(),
        "schedules": {
            name: {"layers": list(c.schedule.layers), "policy": c.policy, "unit": c.schedule.unit}
            for name, c in schedules(shape, shape.tiers[-1]).items()
        },
        "memory_method": "torch.cuda.max_memory_allocated"
        if device.startswith("cuda")
        else f"VmHWM above VmRSS before the call (glibc mmap threshold pinned: {pinned})",
        "load_average": {"before": load_before, "after": os.getloadavg() if load_before else None},
        "clock": clock,
        "repeats": repeats,
        "reference_repeats": reference_repeats,
        "warmup": warmup,
        "targets": TARGETS,
        "rows": rows,
    }
    record["verdict"] = verdict(rows)
    return record


def verdict(rows: list[dict]) -> dict:
    """Each target against the measured ratios (worst case over rows)."""
    smallest = min(row["k"] for row in rows)
    worst_ratio = max(row["ratios"]["reroute_over_remove"] for row in rows)
    worst_bound = min(row["ratios"]["speedup_over_bound"] for row in rows if row["k"] == smallest)
    reference = [
        row["ratios"]["reference_over_optimized"]
        for row in rows
        if "reference_over_optimized" in row["ratios"]
    ]
    out = {
        "reroute_over_remove_worst": worst_ratio,
        "reroute_over_remove_ok": worst_ratio <= TARGETS["reroute_over_remove_max"],
        "speedup_over_bound_worst_at_smallest_tier": worst_bound,
        "speedup_over_bound_ok": worst_bound >= TARGETS["speedup_over_bound_min_at_smallest_tier"],
    }
    if reference:
        out["reference_over_optimized_worst"] = min(reference)
        out["reference_over_optimized_ok"] = min(reference) >= TARGETS["optimized_over_reference_min"]
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _row_line(row: dict) -> str:
    t, r = row["times"], row["ratios"]
    ms = {name: f"{v['median_s'] * 1e3:.1f}" for name, v in t.items()}
    line = (
        f"B={row['batch']} k={row['k']} avg_T={row['avg_visual_tokens']:.1f} | dense {ms['dense']} ms, "
        f"remove {ms['remove']} ms, reroute {ms['reroute']} ms | reroute/remove {r['reroute_over_remove']:.3f} "
        f"(FLOPs {r['reroute_over_remove_flops']:.3f}) | dense/reroute {r['dense_over_reroute']:.2f}x, "
        f"bound {r['flops_bound']:.2f}x, {r['speedup_over_bound']:.2f} of it"
    )
    if "reference_over_optimized" in r:
        line += f" | reference {ms['reference']} ms vs {ms['reroute_full']} ms: {r['reference_over_optimized']:.2f}x"
    return line


def table(record: dict) -> str:
    """A plain-text table of the record (medians in ms, peak memory in MiB)."""
    head = (
        f"{'B':>2} {'k':>4} {'avg_T':>6} {'dense':>8} {'remove':>8} {'reroute':>8} {'rr/rm':>6} {'flops':>6} "
        f"{'speedup':>7} {'bound':>6} {'eff':>5} {'ref':>8} {'opt_full':>8} {'ref/opt':>7}  "
        "peak MiB dense/remove/reroute[/opt_full/ref]"
    )
    lines = [
        f"device: {record['device']}, dtype {record['dtype']}, {record['clock']} clock, repeats {record['repeats']} "
        f"(reference {record['reference_repeats']}), shape {record['shape']}",
        head,
    ]
    for row in record["rows"]:
        t, r, m = row["times"], row["ratios"], row["peak_memory_bytes"]

        def ms(name, t=t):
            return f"{t[name]['median_s'] * 1e3:8.1f}" if name in t else f"{'-':>8}"

        names = ["dense", "remove", "reroute", "reroute_full", "reference"]
        mib = "/".join("-" if m.get(n) is None else f"{m[n] / 2**20:.0f}" for n in names if n in m)
        ref = f"{r['reference_over_optimized']:7.2f}" if "reference_over_optimized" in r else f"{'-':>7}"
        lines.append(
            f"{row['batch']:>2} {row['k']:>4} {row['avg_visual_tokens']:6.1f} {ms('dense')} {ms('remove')} "
            f"{ms('reroute')} {r['reroute_over_remove']:6.3f} {r['reroute_over_remove_flops']:6.3f} "
            f"{r['dense_over_reroute']:7.2f} {r['flops_bound']:6.2f} {r['speedup_over_bound']:5.2f} "
            f"{ms('reference')} {ms('reroute_full')} {ref}  {mib}"
        )
    lines.append(f"targets: {json.dumps(record['targets'])}")
    lines.append(f"verdict: {json.dumps(record['verdict'])}")
    return "\n".join(lines)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    """``rerouting bench``: run the benchmark, print the table, write the JSON record."""
    parser = argparse.ArgumentParser(prog="rerouting bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per method (default 5; quick 2)"
    )
    parser.add_argument(
        "--reference-repeats", type=int, default=None, help="timed runs of the reference (default 2)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="clock of the medians and ratios (both are recorded); cpu suits a shared machine with --threads 1",
    )
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test in seconds")
    parser.add_argument("--out", default="rerouting-bench/bench.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    reference_repeats = (
        args.reference_repeats if args.reference_repeats is not None else (1 if args.quick else 2)
    )
    batches = tuple(int(b) for b in args.batches.split(","))
    record = run(
        shape,
        device=args.device,
        dtype=_DTYPES[args.dtype],
        batches=batches,
        repeats=repeats,
        reference_repeats=reference_repeats,
        warmup=args.warmup,
        clock=args.clock,
        log=lambda line: print(line, flush=True),
    )
    print(table(record))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
