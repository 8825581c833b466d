"""benchmarks/interleaved.py: each repeat runs every implementation once in a rotating order, and a speed-up is the
median of per-repeat ratios (not a ratio of medians taken at different times)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.interleaved import interleave, speedups, spread  # noqa: E402


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
    def variant(name, ms, peak):
        return {"model": "m", "variant": name, "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                "peak_mb": peak, "total_peak_mb": peak + 1000.0, "loss_fgt": 1.0, "loss_rtn": 1.0}
    return [variant("eager", 1000.0, 1000.0), variant("fused", 1000.0 / speed, 1000.0 / saving),
            variant("fused+checkpointing", 1000.0, 1000.0 * checkpointed_share)]


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
    table = e2e.markdown_table(_e2e_rows(_measured("cpu_e2e_speed", factor), 1.0,
                                         _measured("cpu_e2e_checkpointed_memory", factor)), "meta")
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
