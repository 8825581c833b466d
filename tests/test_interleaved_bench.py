"""benchmarks/interleaved.py: each repeat runs every implementation once in a rotating order, and a speed-up is the
median of per-repeat ratios (not a ratio of medians taken at different times)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.interleaved import interleave, speedups  # noqa: E402


def test_every_repeat_runs_each_op_once_in_a_rotating_order():
    calls = []
    ops = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleave(ops, 4, log=lambda message: None)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {name: len(values) for name, values in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_speedups_are_medians_of_per_repeat_ratios():
    """The machine slows down 4x in the last two repeats: per-repeat ratios stay 2, a ratio of medians would not."""
    times = {"eager": [100.0, 100.0, 400.0, 400.0, 100.0], "ours": [50.0, 50.0, 200.0, 200.0, 50.0],
             "late": [60.0, 60.0, 60.0, 60.0, 60.0]}
    got = speedups(times, "eager")
    assert got["eager"] == 1.0 and got["ours"] == 2.0
    assert abs(got["late"] - 100 / 60) < 1e-12
