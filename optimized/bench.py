"""Benchmark of the optimized path on a mid-size LLaVA or Qwen2.5-VL with random weights (``rerouting bench``).

Side by side in one run, per keep tier and batch size:

- ``dense``: the host's own unrouted forward, ``model(**inputs, use_cache=True, logits_to_keep=1)``;
- ``remove``: optimized remove, one decision (FastV-K1 shape: layer 1 keeps k);
- ``reroute``: optimized reroute, a decision every other layer (1, 3, 5, ...) keeping the same k, so both
  policies run exactly the same per-layer token counts ([budget.active-counts]) and differ only by the
  re-probes and re-gathers;
- ``reference``: the reference reroute (batch 1 only, fewer repeats), against ``reroute_full``, the optimized
  reroute producing the same outputs as the reference (logits of every position).

Models (``--host``, ``bench_hosts``): ``llava`` (default), 8 LLaMA layers (hidden 1024, 16 heads, no GQA,
intermediate 2816, vocabulary 32064), 576 visual tokens (one 336 px image, patch 14) + 60 text tokens; or
``qwen2.5-vl``, Qwen2.5-VL-7B's text config scaled to 8 layers (hidden 1024, GQA 16/2, intermediate 5376,
q/k/v biases, mRoPE [8, 12, 12]), two images of different grids (256 + 320 = 576 visual tokens) + 60 text
tokens. Both vision towers are tiny, so the times are the decoder's. A tier is the kept count k after each
decision (of each sample's N); its realized avg_T over the 8 layers ((576 + 7k) / 8, layer 0 dense) is
recorded next to it.

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
import functools
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from rerouting.reference import Reference, RoutingConfig, RoutingError, Schedule, Trace
from rerouting.reference.archs import ArchSpec
from rerouting.reference.budget import budget_from_trace
from rerouting.reference.flops import avg_visual_tokens, layer_flops_true

from .bench_decode import decode_row, decode_table
from .bench_hosts import (
    FULL,
    HOST_NAMES,
    QUICK,
    QwenShape,
    Shape,
    build_model,
    dense_inputs,
    make_inputs,
    shapes,
)
from .bench_report import row_line, table
from .bench_targets import TARGETS, verdict
from .bench_timing import _pin_mmap_threshold, peak_memory, timed
from .routing import routed_prefill

__all__ = ["FULL", "QUICK", "Shape", "build_model", "main", "run"]


def schedules(shape: Shape | QwenShape, k: int) -> dict[str, RoutingConfig]:
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


# --- the run ---------------------------------------------------------------------------------------


def _against_reference(model, config: RoutingConfig, batch: dict, settings: dict) -> tuple[dict, dict]:
    """Times and peak memory of the reference reroute and of ``reroute_full``, its optimized twin."""
    reference, device = Reference(model, config), settings["device"]
    pair = {
        "reference": functools.partial(reference.prefill, **batch),
        "reroute_full": functools.partial(routed_prefill, model, config, **batch),
    }
    times = timed(pair, device, settings["reference_repeats"], min(settings["warmup"], 1), settings["clock"])
    return times, {name: peak_memory(fn, device) for name, fn in pair.items()}


def _prefill_row(
    model, arch: ArchSpec, shape: Shape, batch: dict, k: int, dense: tuple, settings: dict
) -> dict:
    """One (batch, k) row: ``dense`` (its forward and peak memory), remove and reroute; the reference at B=1."""
    device, dtype, batch_size = settings["device"], settings["dtype"], batch["input_ids"].shape[0]
    configs = schedules(shape, k)
    fns = {"dense": dense[0]}
    for policy, config in configs.items():
        fns[policy] = functools.partial(routed_prefill, model, config, **batch, logits_to_keep=1)
    times = timed(fns, device, settings["repeats"], settings["warmup"], settings["clock"])
    memory = {"dense": dense[1], **{p: peak_memory(fns[p], device) for p in configs}}
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
        reference_times, reference_memory = _against_reference(model, configs["reroute"], batch, settings)
        times.update(reference_times)
        memory.update(reference_memory)
        ratios["reference_over_optimized"] = (
            times["reference"]["median_s"] / times["reroute_full"]["median_s"]
        )
    sample = traces["reroute"].samples[0]
    return {
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


def _prefill_rows(model, arch: ArchSpec, shape: Shape, batch_size: int, settings: dict, log) -> list[dict]:
    """Every tier's row at one batch size, the dense forward's peak memory measured once for all."""
    batch = make_inputs(model, shape, batch_size, settings["device"], settings["dtype"])

    inputs = dense_inputs(model, batch)  # the host's own forward: Qwen's also get mm_token_type_ids

    def dense(inputs=inputs):
        with torch.no_grad():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    dense_memory = peak_memory(dense, settings["device"])
    rows = []
    for k in shape.tiers:
        rows.append(_prefill_row(model, arch, shape, batch, k, (dense, dense_memory), settings))
        log(row_line(rows[-1]))
    return rows


def _record(shape: Shape, arch: ArchSpec, settings: dict, pinned: bool, load_before, rows, decode) -> dict:
    """The JSON-ready record: the setup (versions, shape, schedules, timing) around the measured rows."""
    device = settings["device"]
    return {
        "host": "qwen2.5-vl" if isinstance(shape, QwenShape) else "llava",
        "device": _device_name(device),
        "dtype": str(settings["dtype"]).removeprefix("torch."),
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
        "clock": settings["clock"],
        "repeats": settings["repeats"],
        "reference_repeats": settings["reference_repeats"],
        "warmup": settings["warmup"],
        "targets": TARGETS,
        "rows": rows,
        "decode": decode,
    }


def run(
    shape: Shape | QwenShape,
    *,
    device: str,
    dtype: torch.dtype,
    batches: tuple[int, ...],
    repeats: int,
    reference_repeats: int,
    warmup: int,
    clock: str = "wall",
    decode_batches: tuple[int, ...] = (),
    decode_steps: int = 32,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every method at every tier and batch size; return the JSON-ready record."""
    pinned = device == "cpu" and _pin_mmap_threshold()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    model = build_model(shape, dtype, device)
    arch = ArchSpec.from_model(model)
    timing = {"device": device, "repeats": repeats, "warmup": warmup, "clock": clock}
    settings = {**timing, "dtype": dtype, "reference_repeats": reference_repeats}
    rows = [row for b in batches for row in _prefill_rows(model, arch, shape, b, settings, log)]
    decode = []
    for batch_size in decode_batches:
        batch = make_inputs(model, shape, batch_size, device, dtype)
        for k in shape.tiers:
            config = schedules(shape, k)["reroute"]
            decode.append(decode_row(model, config, batch, decode_steps, timing, dense_inputs(model, batch)))
            log(decode_table(decode[-1:]).splitlines()[-1])
    record = _record(shape, arch, settings, pinned, load_before, rows, decode)
    record["verdict"] = verdict(rows)
    return record


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rerouting bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="llava", choices=HOST_NAMES, help="the benchmarked model family (default llava)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per method (default 5; quick 2)"
    )
    parser.add_argument(
        "--reference-repeats", type=int, default=None, help="timed runs of the reference (default 2; quick 1)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (CPU default 1: threads of a shared machine contend and skew the ratios)",
    )
    parser.add_argument(
        "--clock",
        default=None,
        choices=("wall", "cpu"),
        help="clock of the medians and ratios, both are recorded (default: cpu on CPU, wall on CUDA)",
    )
    parser.add_argument("--batches", default=None, help="prefill batch sizes (default 1,4; quick 1)")
    parser.add_argument("--decode-batches", default="1,8", help="decode batch sizes ('' skips decode)")
    parser.add_argument("--decode-steps", type=int, default=None, help="decoded tokens (default 32; quick 8)")
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and few runs: a smoke test in seconds"
    )
    parser.add_argument("--out", default="rerouting-bench", help="folder for bench.json and bench.txt")
    parser.add_argument(
        "--decoding",
        default=None,
        choices=("ssd",),
        help="ssd: self-speculative decoding vs greedy on a synthetic TTP-routed model (optimized/bench_ssd.py)",
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "reference_repeats", "decode_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} is not a positive integer")
    on_cpu = not args.device.startswith("cuda")
    if on_cpu and args.threads is not None and args.threads > 1 and args.clock is None:
        parser.error(
            f"--threads {args.threads} on CPU needs an explicit --clock (cpu time then adds up threads)"
        )
    args.threads = args.threads if args.threads is not None else (1 if on_cpu else None)
    args.clock = args.clock or ("cpu" if on_cpu else "wall")
    quick = args.quick
    args.repeats = args.repeats or (2 if quick else 5)
    args.reference_repeats = args.reference_repeats or (1 if quick else 2)
    args.decode_steps = args.decode_steps or (8 if quick else 32)
    args.batches = _sizes(parser, "--batches", args.batches or ("1" if quick else "1,4"))
    args.decode_batches = (
        _sizes(parser, "--decode-batches", args.decode_batches) if args.decode_batches else ()
    )
    return args


def _sizes(parser: argparse.ArgumentParser, option: str, text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        parser.error(f"{option} {text!r} is not a comma-separated list of integers")
    if any(b < 1 for b in sizes):
        parser.error(f"{option} {text!r}: batch sizes must be at least 1")
    return sizes


def main(argv: list[str] | None = None) -> int:
    """``rerouting bench``: run the benchmark, print the tables, write ``OUT/bench.json`` and ``OUT/bench.txt``."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.decoding == "ssd":
        return _main_ssd(args)
    try:
        record = run(
            shapes(args.host, args.quick),
            device=args.device,
            dtype=_DTYPES[args.dtype],
            batches=args.batches,
            repeats=args.repeats,
            reference_repeats=args.reference_repeats,
            warmup=args.warmup,
            clock=args.clock,
            decode_batches=args.decode_batches,
            decode_steps=args.decode_steps,
            log=lambda line: print(line, flush=True),
        )
    except RoutingError as error:  # e.g. a host this transformers cannot serve: one line, not a traceback
        print(f"rerouting bench: {error}", file=sys.stderr)
        return 2
    if args.quick:  # the targets are about the full shape; a smoke test's ratios say nothing about them
        record["verdict"] = {
            "judged": False,
            "why": "--quick runs toy shapes: a smoke test, not a measurement",
        }
    text = table(record)
    if record["decode"]:
        text += "\n\ndecode (greedy, tokens/s; bound: dense / routed KV entries)\n" + decode_table(
            record["decode"]
        )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    (out / "bench.txt").write_text(text + "\n")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.txt'}")
    return 0


def _main_ssd(args: argparse.Namespace) -> int:
    """``--decoding ssd``: the SSD table, ``OUT/bench_ssd.json`` and ``OUT/bench_ssd.txt``."""
    from .bench_ssd import run_ssd_bench, ssd_table

    rows = run_ssd_bench(
        quick=args.quick,
        device=args.device,
        dtype=_DTYPES[args.dtype],
        batches=args.decode_batches or (1,),
        steps=args.decode_steps,
        repeats=args.repeats,
        warmup=args.warmup,
        clock=args.clock,
        log=lambda line: print(line, flush=True),
    )
    text = "self-speculative decoding vs greedy (decode only, same TTP-routed model)\n" + ssd_table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ssd.json").write_text(json.dumps(rows, indent=2))
    (out / "bench_ssd.txt").write_text(text + "\n")
    print(f"wrote {out / 'bench_ssd.json'} and {out / 'bench_ssd.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
