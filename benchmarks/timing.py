"""Wall time of one operation: warm-up, then repeats until a time budget, summarised as median and p20/p80; and
speed-ups between operations timed in turn (a rotating order, ratios taken within each repeat), so that drift of the
machine's speed between repeats hits both sides of a ratio alike.

On a GPU each repeat is bracketed by CUDA events after a write that flushes the L2 cache (as
``triton.testing.do_bench`` does), so every repeat starts cold; on the CPU by ``time.perf_counter``, the operation
being synchronous there.
"""
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Budget:
    seconds: float  # stop repeating once the repeats add up to this much...
    min_reps: int  # ...but never before this many
    max_reps: int


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    samples_ms: tuple[float, ...]


def summarize(samples_ms: list[float]) -> Timing:
    samples = tuple(samples_ms)
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1, samples)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), deciles[1], deciles[7], len(samples), samples)


def rotation(names: list, repeat: int) -> list:
    """The order of ``names`` in a given repeat: rotated by one every repeat, so none always runs first."""
    shift = repeat % len(names)
    return names[shift:] + names[:shift]


def ratios(times: dict[str, list[float]], baseline: str, name: str) -> list[float]:
    """The baseline's time over ``name``'s, one per repeat (both timed in that repeat)."""
    return [b / t for b, t in zip(times[baseline], times[name])]


def speedups(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over repeats of the baseline's time over each op's, in the same repeat."""
    return {name: statistics.median(ratios(times, baseline, name)) for name in times}


def spread(times: dict[str, list[float]], baseline: str, name: str, repeat: str = "repeat") -> str:
    """How far the per-repeat ratios scatter around their median, and how many repeats ``name`` won: where the
    median sits near a bound, whether it is a tie or a lead. ``repeat`` names what a repeat is."""
    per_repeat = ratios(times, baseline, name)
    wins = sum(ratio > 1 for ratio in per_repeat)
    return f"per {repeat} {min(per_repeat):.2f}–{max(per_repeat):.2f}, faster in {wins} of {len(per_repeat)}"


def time_op(op: Callable, device: torch.device, budget: Budget, setup: Callable | None = None,
            first_rep: contextlib.AbstractContextManager | None = None) -> Timing:
    """Time ``op()`` (already warmed up), or ``op(setup())`` with ``setup`` run outside the timed region (a fresh
    autograd graph for a backward, say); what ``op`` returns is dropped after each repeat, untimed.

    On the CPU, ``first_rep`` (a memory probe) is entered around the first repeat, its result still alive at exit:
    the slow CPU cases then need no separate call for their memory figures.
    """
    if device.type == "cuda":
        return _time_cuda(op, budget, setup)
    samples = []
    while len(samples) < budget.min_reps or (sum(samples) < budget.seconds * 1e3 and len(samples) < budget.max_reps):
        args = () if setup is None else (setup(),)
        with first_rep if first_rep is not None and not samples else contextlib.nullcontext():
            start = time.perf_counter()
            result = op(*args)
            samples.append((time.perf_counter() - start) * 1e3)
        del result, args
    return summarize(samples)


def _time_cuda(op: Callable, budget: Budget, setup: Callable | None) -> Timing:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    args = () if setup is None else (setup(),)
    start.record()
    op(*args)
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.seconds * 1e3 / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for rep_start, rep_end in zip(starts, ends):
        args = () if setup is None else (setup(),)
        flush.zero_()
        rep_start.record()
        result = op(*args)
        rep_end.record()
        del result, args
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])
