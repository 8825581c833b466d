"""benchmarks/interleaved.py and the PDU step's rounds (benchmarks/e2e.py): each repeat (round) runs every
implementation once in a rotating order, and a speed-up is the median of per-repeat ratios (not a ratio of medians
taken at different times)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.interleaved import interleave  # noqa: E402
from benchmarks.timing import speedups, spread  # noqa: E402


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


def test_the_spread_gives_the_range_of_per_repeat_ratios_and_the_repeats_won():
    times = {"compile": [100.0, 300.0, 100.0, 90.0], "ours": [80.0, 200.0, 125.0, 90.0]}
    assert spread(times, "compile", "ours") == "per repeat 0.80–1.50, faster in 2 of 4"  # a tie is no win
    assert spread(times, "compile", "ours", repeat="round") == "per round 0.80–1.50, faster in 2 of 4"


# The verdicts of every report (report.key_ratios for the suites, interleaved.section, e2e's table) read one table,
# benchmarks.shapes.TARGETS; the tests below take every bound from that table, never a copy of its numbers.
import math  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

from benchmarks import e2e, interleaved, report, shapes  # noqa: E402
from benchmarks.shapes import TARGETS, verdict  # noqa: E402


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_verdict_flips_at_its_targets_bound(name):
    target = TARGETS[name]
    worse = math.nextafter(target.bound, -math.inf if target.at_least else math.inf)
    better = math.nextafter(target.bound, math.inf if target.at_least else -math.inf)
    assert (verdict(name, worse), verdict(name, target.bound), verdict(name, better)) == ("misses", "meets", "meets")
    assert str(target) == f"{'≥' if target.at_least else '≤'} {target.bound:g}"




def _measured(name: str, factor: float) -> float:
    """A ratio that meets TARGETS[name] by 1% (factor 1.01) or misses it by 1% (0.99)."""
    target = TARGETS[name]
    return target.bound * factor if target.at_least else target.bound / factor


def _row(loss, preset, tokens, dtype, provider, ms, peak=None, mode="full"):
    return {"loss": loss, "preset": preset, "tokens": tokens, "dtype": dtype, "provider": provider, "mode": mode,
            "status": "ok", "median_ms": ms, "peak_mb": peak}


def _e2e_rows(speed: float, saving: float, checkpointed_share: float) -> list[dict]:
    """The rows e2e.combine_rounds makes of one round of run_variant's."""
    def variant(name, ms, peak):
        return {"model": "m", "variant": name, "status": "ok", "median_ms": ms, "step_ms": [ms], "peak_mb": peak,
                "total_peak_mb": peak + 1000.0, "loss_fgt": 1.0, "loss_rtn": 1.0}
    return e2e.combine_rounds({"eager": [variant("eager", 1000.0, 1000.0)],
                               "fused": [variant("fused", 1000.0 / speed, 1000.0 / saving)],
                               "fused+checkpointing": [variant("fused+checkpointing", 1000.0,
                                                               1000.0 * checkpointed_share)]})


def test_pdu_step_rounds_rotate_the_variants_and_take_the_speedup_within_each_round():
    """Three rounds of fresh processes; the machine runs 1.5x slower in the second: the per-round ratios stay 1.25,
    a ratio of pooled medians would not. Memory is the median over rounds; every timed step is pooled."""
    calls, slow = [], {1: 1.5}
    fused_peaks = iter([500.0, 900.0, 600.0])

    def run_one(variant):
        calls.append(variant)
        round_index = len(calls[:-1]) // len(e2e.VARIANTS)
        ms = slow.get(round_index, 1.0) * (1000.0 if variant.startswith("eager") else 800.0)
        return {"model": "m", "variant": variant, "status": "ok", "median_ms": ms, "step_ms": [ms - 1, ms, ms + 1],
                "peak_mb": next(fused_peaks) if variant == "fused" else 1000.0, "total_peak_mb": 3000.0,
                "loss_fgt": 1.0, "loss_rtn": 2.0}

    rows = {row["variant"]: row for row in e2e.run_rounds(run_one, 3, log=lambda message: None)}
    variants = list(e2e.VARIANTS)
    assert calls == variants + variants[1:] + variants[:1] + variants[2:] + variants[:2]
    fused = rows["fused"]
    assert fused["speedup"] == pytest.approx(1.25)
    assert fused["speedup_spread"] == "per round 1.25–1.25, faster in 3 of 3"
    # pooled steps 799, 799, 800, 800, 801, 801, 1199, 1200, 1201
    assert fused["round_ms"] == [800.0, 1200.0, 800.0] and fused["median_ms"] == 801.0 and fused["reps"] == 9
    assert fused["peak_mb"] == 600.0 and fused["round_peak_mb"] == [500.0, 900.0, 600.0]
    assert "step_ms" not in fused and rows["eager"]["speedup"] == 1.0


def test_a_failed_round_makes_the_variant_report_the_failure():
    def run_one(variant, failing=iter([False, True])):
        if variant == "fused" and next(failing):
            return {"model": "m", "variant": variant, "status": "failed: boom"}
        return {"model": "m", "variant": variant, "status": "ok", "median_ms": 10.0, "step_ms": [10.0],
                "peak_mb": 1.0, "total_peak_mb": 2.0, "loss_fgt": 1.0, "loss_rtn": 2.0}

    rows = {row["variant"]: row for row in e2e.run_rounds(run_one, 2, log=lambda message: None)}
    assert rows["fused"]["status"] == "round 2: failed: boom"
    assert rows["eager"]["status"] == "ok" and "speedup" not in rows["fused"]
    assert "round 2: failed: boom" in report.e2e_table(list(rows.values()))


def _cpu_rows(factor: float) -> list[dict]:
    m = lambda name: _measured(name, factor)  # noqa: E731
    ours_ms = 1000.0 / m("cpu_lmf_speed")
    rows = [_row("lmf", "cpu-target", shapes.CPU_TARGET_TOKENS, "float32", "eager-fp32", 1000.0, 1000.0),
            _row("lmf", "cpu-target", shapes.CPU_TARGET_TOKENS, "float32", "ceu-torch", ours_ms,
                 1000.0 * m("cpu_lmf_memory"))]
    for tokens in shapes.CPU_CE_TARGET_TOKENS:
        ours_ms = 1000.0 / m("cpu_ce_speed")
        rows += [_row("ce", "cpu-target", tokens, "float32", "eager-fp32", 1000.0, 1000.0),
                 _row("ce", "cpu-target", tokens, "float32", "ceu-torch", ours_ms, 1000.0 * m("cpu_ce_memory")),
                 _row("ce", "cpu-target", tokens, "float32", "compile", ours_ms * m("cpu_ce_vs_compile"), 1000.0)]
    return rows


def _gpu_rows(factor: float) -> list[dict]:
    m = lambda name: _measured(name, factor)  # noqa: E731
    preset, tokens = shapes.GPU_HEADLINE
    ours_ms = 100.0 * m("gpu_lmf_floor")
    return [_row("lmf", preset, tokens, "bfloat16", "floor", 100.0, mode="forward"),
            _row("lmf", preset, tokens, "bfloat16", "ceu-triton", ours_ms, 10.0),
            _row("lmf", preset, tokens, "bfloat16", "eager-fp32", ours_ms * m("gpu_lmf_speed"), 10.0),
            _row("ce", preset, tokens, "bfloat16", "cce", 100.0, 100.0),
            _row("ce", preset, tokens, "bfloat16", "ceu-triton", 100.0 * m("gpu_ce_vs_cce"),
                 100.0 * m("gpu_ce_vs_cce"))]


def _interleaved_text(factor: float) -> str:
    m = lambda name: _measured(name, factor)  # noqa: E731
    micro = []
    for loss in ("lmf", "ce"):
        ours_ms = 100.0 / m(interleaved.SPEED_TARGETS[loss])
        times = {"eager-fp32": [100.0], "compile": [ours_ms * m("cpu_ce_vs_compile")], "ceu-torch": [ours_ms]}
        micro.append({"title": loss, "loss": loss, "times": times,
                      "speedups": interleaved.speedups(times, "eager-fp32")})
    steps = []
    for pair in interleaved.E2E_PAIRS:
        times = {pair[0]: [1000.0], pair[1]: [1000.0 / m("cpu_e2e_speed")]}
        steps.append({"title": pair[1], "times": times, "speedups": interleaved.speedups(times, pair[0])})
    meta = {"timestamp": "T", "device": "cpu", "torch": "t", "threads": 2, "git_sha": "g"}
    return interleaved.section(meta, micro, steps, 60.0, dry_run=False)


@pytest.fixture(params=["as written", "moved"])
def targets(request, monkeypatch):
    """The shared table as written, or with every bound moved by half: the verdicts must follow it either way."""
    if request.param == "moved":
        for name, target in list(TARGETS.items()):
            monkeypatch.setitem(TARGETS, name, replace(target, bound=target.bound * 1.5))
    return TARGETS


@pytest.mark.parametrize("factor, word", [(1.01, "meets"), (0.99, "misses")])
def test_every_reports_verdict_follows_the_shared_table(targets, factor, word):
    other = {"meets": "misses", "misses": "meets"}[word]
    cpu = "\n".join(report.key_ratios("cpu", _cpu_rows(factor), _e2e_rows(
        _measured("cpu_e2e_speed", factor), 1.0, _measured("cpu_e2e_checkpointed_memory", factor))))
    gpu = "\n".join(report.key_ratios("gpu", _gpu_rows(factor), _e2e_rows(
        _measured("gpu_e2e_speed", factor), _measured("gpu_e2e_memory_saving", factor), 1.0)))
    inter = _interleaved_text(factor)
    rows = _e2e_rows(_measured("cpu_e2e_speed", factor), 1.0, _measured("cpu_e2e_checkpointed_memory", factor))
    table = report.e2e_table(rows) + "\n" + "\n".join(report.e2e_key_ratios("cpu", rows))
    for name, text in [("cpu_lmf_speed", cpu), ("cpu_lmf_memory", cpu), ("cpu_ce_speed", cpu),
                       ("cpu_ce_vs_compile", cpu), ("cpu_ce_memory", cpu), ("cpu_e2e_speed", cpu),
                       ("cpu_e2e_checkpointed_memory", cpu), ("gpu_lmf_floor", gpu), ("gpu_lmf_speed", gpu),
                       ("gpu_ce_vs_cce", gpu), ("cpu_lmf_speed", inter), ("cpu_ce_speed", inter),
                       ("cpu_ce_vs_compile", inter), ("cpu_e2e_speed", inter), ("cpu_e2e_speed", table),
                       ("cpu_e2e_checkpointed_memory", table)]:
        unit = "" if name.endswith("memory") else "×"
        assert f"target {targets[name]}{unit}" in text, name
    assert f"targets {targets['gpu_e2e_speed']}× and {targets['gpu_e2e_memory_saving']}×: {word}, {word}" in gpu
    for text in (cpu, gpu, inter, table):
        assert word in text and other not in text
    # the CPU key ratios judge LMF speed and memory, CE speed and torch.compile at each token count, CE memory once,
    # the PDU step's speed and its checkpointed memory
    assert cpu.count(word) == 2 + 2 * len(shapes.CPU_CE_TARGET_TOKENS) + 1 + 2
