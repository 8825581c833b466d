"""Memory one operation needs beyond what is already resident (inputs, saved graph): peak and what it leaves behind.

GPU: the CUDA caching allocator's counters (exact, bytes of live tensors). CPU: the process's resident set, read
from ``/proc/self/status``, with the high-water mark reset through ``/proc/self/clear_refs`` just before the
operation and freed heap handed back to the system first (``malloc_trim``) so that reused pages do not hide
allocations, and ceu's kept chunk buffer released (:func:`ceu_kernels.chunked.release_workspace`) so that the
operation counts it, as a first call would. The CPU runner gives each provider a fresh process, so nothing from
another provider is resident.
"""
import ctypes
import ctypes.util
import gc
from dataclasses import dataclass

import torch

from ceu_kernels.chunked import release_workspace

MIB = 2**20


@dataclass
class MemoryProbe:
    """``with MemoryProbe(device) as probe: out = op()``; then ``probe.peak_mb`` (peak over the starting point),
    ``probe.delta_mb`` (still held at exit, e.g. a saved graph or gradients) and ``probe.total_peak_mb`` (the peak
    counting what was already there). ``None`` where it cannot be measured."""

    device: torch.device
    peak_mb: float | None = None
    delta_mb: float | None = None
    total_peak_mb: float | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            release_workspace()
            _malloc_trim()
            self._start = _status_kib("VmRSS")
            self._peak_reset = _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.total_peak_mb = torch.cuda.max_memory_allocated() / MIB
            self.peak_mb = self.total_peak_mb - self._start / MIB
            self.delta_mb = (torch.cuda.memory_allocated() - self._start) / MIB
        else:
            self.delta_mb = (_status_kib("VmRSS") - self._start) / 1024
            if self._peak_reset:
                self.total_peak_mb = _status_kib("VmHWM") / 1024
                self.peak_mb = self.total_peak_mb - self._start / 1024
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
