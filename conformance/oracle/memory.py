"""Device memory sampled through NVML (``pynvml`` from nvidia-ml-py) in a background thread.

NVML has no peak-memory query for a live process, so a daemon thread polls the device's used
memory (``nvmlDeviceGetMemoryInfo``, v1 ``used``) every ``interval_s`` and keeps the maximum; the
result is the peak minus a baseline taken just before the workload (absolute values include the
CUDA context and other processes). Spikes shorter than the interval can be missed: the interval is
reported with the result. ``torch.cuda.max_memory_allocated`` is reported next to it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


def nvml_unavailable_reason() -> str | None:
    """None when CUDA and an NVML-visible driver are present, else why not (a skip reason)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import pynvml
    except ImportError:
        return "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:  # LibraryNotFound, DriverNotLoaded, NoPermission, ...
        return f"NVML unavailable: {error}"
    pynvml.nvmlShutdown()
    return None


def _handle(pynvml, device_index: int):
    """The NVML handle of CUDA device ``device_index`` (by UUID: NVML indices ignore CUDA_VISIBLE_DEVICES)."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device_index).uuid)
    for candidate in (uuid, f"GPU-{uuid}"):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(candidate)
        except pynvml.NVMLError:
            continue
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


@dataclass
class MemorySample:
    baseline: int = 0
    peak: int = 0
    samples: int = 0
    interval_s: float = 0.0
    torch_peak_allocated: int = 0

    @property
    def delta(self) -> int:
        """NVML peak used minus the baseline, bytes."""
        return max(0, self.peak - self.baseline)


class NvmlSampler:
    """``with NvmlSampler() as s: work()`` then ``s.result.delta``: peak device memory above the baseline."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.0005):
        self.device_index, self.interval_s = device_index, interval_s
        self.result = MemorySample(interval_s=interval_s)
        self._stop = threading.Event()

    def _used(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._device).used)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.result.peak = max(self.result.peak, self._used())
            self.result.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> NvmlSampler:
        import pynvml
        import torch

        self._pynvml = pynvml
        pynvml.nvmlInit()
        self._device = _handle(pynvml, self.device_index)
        torch.cuda.synchronize(self.device_index)
        torch.cuda.reset_peak_memory_stats(self.device_index)
        self.result.baseline = self.result.peak = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        import torch

        torch.cuda.synchronize(self.device_index)
        self._stop.set()
        self._thread.join()
        self.result.peak = max(self.result.peak, self._used())
        self.result.torch_peak_allocated = int(torch.cuda.max_memory_allocated(self.device_index))
        self._pynvml.nvmlShutdown()
