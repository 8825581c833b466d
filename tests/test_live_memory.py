"""benchmarks/live_memory.py: the peak of live tensors over a step, from the profiler's memory events."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import e2e  # noqa: E402
from benchmarks.live_memory import MIB, peak_live_bytes, step_peak_live_mb  # noqa: E402


def _event(ts, size, total):
    return {"name": "[memory]", "ts": ts, "args": {"Bytes": size, "Total Allocated": total}}


def test_the_peak_counts_from_the_total_before_the_first_event_in_time_order():
    """Given out of order, starting from 1000 bytes already allocated: +500, +300, -600, +200 peaks 800 above it."""
    events = [_event(3, -600, 1200), _event(1, 500, 1500), _event(4, 200, 1400), _event(2, 300, 1800)]
    assert peak_live_bytes(events) == 800
    assert peak_live_bytes([]) == 0


def test_a_steps_peak_holds_at_least_every_gradient_it_allocates():
    """The step frees its gradients (``set_to_none``) and allocates them anew; AdamW reads them all at once."""
    shape = e2e.E2E_SHAPES["tiny"]
    model = e2e.build_model(shape, torch.device("cpu"))
    gradient_mb = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / MIB
    for variant in ("eager", "fused"):
        peak = step_peak_live_mb(shape, variant)
        assert gradient_mb <= peak < 10 * gradient_mb, (variant, peak, gradient_mb)
