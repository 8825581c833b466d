"""Peak bytes of live tensors over one PDU step on the CPU, from the PyTorch profiler's memory events.

The suite's CPU memory column is the process's peak resident set, which the C allocator shapes as much as the tensors
do: it hands large freed blocks back to the system at once and keeps smaller ones in its heap, so two steps holding
the same tensors can differ in resident peak. This counts the tensors alone (what a GPU's caching-allocator peak
counts): the highest total the profiler records over one warmed step, from the total before it.

    python -m benchmarks.live_memory --variant eager --variant fused --threads 2
"""
import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import e2e
from .memory import MIB


def peak_live_bytes(memory_events: list[dict]) -> int:
    """The highest "Total Allocated" over the profiler's ``[memory]`` events, from the total before the first one."""
    if not memory_events:
        return 0
    ordered = sorted(memory_events, key=lambda event: event["ts"])
    start = ordered[0]["args"]["Total Allocated"] - ordered[0]["args"]["Bytes"]
    return max(event["args"]["Total Allocated"] for event in ordered) - start


def step_peak_live_mb(shape: e2e.ModelShape, variant: str, impl: str = "auto") -> float:
    """One untimed warm-up step (AdamW and any kept buffers exist after it), then one step under the profiler."""
    step = e2e.make_step(shape, variant, torch.device("cpu"), impl)
    step()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        profiler.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    return peak_live_bytes([event for event in events if event.get("name") == "[memory]"]) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(e2e.E2E_SHAPES), default="smollm2-135m")
    parser.add_argument("--variant", choices=e2e.VARIANTS, action="append", help="repeat for several (default: all)")
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = e2e.E2E_SHAPES[args.shape]
    peaks = {}
    for variant in args.variant or e2e.VARIANTS:
        peaks[variant] = step_peak_live_mb(shape, variant, args.impl)
        print(f"{variant}: peak live tensors over one step {peaks[variant]:.0f} MiB", file=sys.stderr, flush=True)
    baseline_variant, baseline = next(iter(peaks.items()))
    print(f"| variant | peak MiB of live tensors over one step | vs {baseline_variant} |\n|---|---:|---:|")
    for variant, peak in peaks.items():
        print(f"| {variant} | {peak:.0f} | {peak / baseline:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
