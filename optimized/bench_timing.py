"""Timing and memory measurement for ``rerouting bench``: paired clocks, round-robin order, peak memory.

On a shared machine the ratios of methods measured side by side in one process are what is steady, not
absolute times: every method runs round-robin (the order rotating each round), and both the wall clock and
the process CPU clock are recorded.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(
    fns: dict[str, Callable[..., object]],
    device: str,
    repeats: int,
    warmup: int,
    clock: str = "wall",
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict]:
    """Median time of each function over ``repeats`` runs after ``warmup`` runs, wall and CPU clocks.

    The functions run round-robin (the order rotating every round), so a slow phase of a shared machine
    hits every method alike and the ratios stay paired. ``median_s`` is the ``clock`` chosen for the ratios:
    ``wall`` (``perf_counter``) or ``cpu`` (``process_time``: the CPU time of this process, which other
    processes on a shared machine barely disturb when torch runs one thread). With ``setups``, each run of
    ``fns[name]`` is called as ``fns[name](setups[name]())`` and only the call is timed (e.g. decoding from
    a fresh copy of a prefilled cache).
    """
    names = list(fns)

    def call(name: str) -> Callable[[], object]:
        if setups is None:
            return fns[name]
        state = setups[name]()
        return lambda: fns[name](state)

    for _ in range(warmup):
        for name in names:
            call(name)()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = call(name)
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
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
