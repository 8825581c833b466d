"""``python -m benchmarks interleaved``: the CPU speed targets with every compared implementation timed in turn within
each repeat, in one process, and the ratios taken per repeat.

The shared 2-core machine's speed drifts over minutes (other tenants; the host reclaiming page cache, which then has to
be read back). The suite (``python -m benchmarks cpu``) times each provider in its own process, one after another, so
a ratio between two providers carries whatever drift fell between them. Here a repeat runs each one once, in an order
that rotates from repeat to repeat, and a speed-up is the median over repeats of ``eager's time / this one's``: drift
within a repeat hits every provider alike. Memory is not measured here (the suite's fresh processes measure it).

Measured: LMF forward+backward at 2048 tokens and cross-entropy at 512 and 2048 (H 256, V 128256, float32: eager,
``torch.compile``, cut-cross-entropy's ``torch_compile``, ceu's chunked PyTorch backend) through the suite's own
providers, then the PDU step on SmolLM2-135M (:mod:`benchmarks.e2e`'s step, the code users run), eager against fused,
without and then with gradient checkpointing (two models held at a time). The section of ``RESULTS.md`` it writes
replaces only its own; ``--dry-run`` uses tiny shapes and writes only under the output folder.
"""
import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import e2e, report
from .micro import operation
from .providers import PROVIDERS, make_inputs
from .shapes import CPU_CE_TARGET_TOKENS, CPU_TARGET_TOKENS, TARGETS, case, verdict
from .timing import rotation, speedups, spread

BASELINE = "eager-fp32"
MICRO_PROVIDERS = {"lmf": ("eager-fp32", "compile", "ceu-torch"),
                   "ce": ("eager-fp32", "compile", "cce-compile", "ceu-torch")}
SPEED_TARGETS = {"lmf": "cpu_lmf_speed", "ce": "cpu_ce_speed"}  # each loss's target over eager in shapes.TARGETS
E2E_PAIRS = (("eager", "fused"), ("eager+checkpointing", "fused+checkpointing"))
E2E_REPEATS = 3  # timed steps of each variant after e2e.WARMUP_STEPS: ~30 s each on the 2-core CPU


def interleave(ops: dict, repeats: int, log) -> dict[str, list[float]]:
    """Milliseconds of each op per repeat, each op once per repeat in an order rotated by one every repeat."""
    names = list(ops)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in rotation(names, repeat):
            gc.collect()
            start = time.perf_counter()
            result = ops[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
            del result
        log(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.0f} ms" for n in names))
    return times


def micro_case(loss: str, tokens: int, repeats: int, dry_run: bool, log) -> dict:
    bench_case = case(loss, "tiny" if dry_run else "cpu-target", tokens, "float32")
    inputs = make_inputs(bench_case, torch.device("cpu"))
    ops = {}
    for name in MICRO_PROVIDERS[loss]:
        provider = PROVIDERS[name]
        reason = provider.unavailable(bench_case, torch.device("cpu"))
        if reason:
            log(f"{bench_case.key} {name}: {reason}")
            continue
        _, op = operation("full", provider.build(bench_case, inputs), inputs)
        op()  # warm-up (and compilation)
        ops[name] = op
    log(f"{bench_case.key}: warmed up {', '.join(ops)}")
    times = interleave(ops, repeats, log)
    return {"title": f"{loss.upper()} fwd+bwd, tokens {tokens}, H {bench_case.hidden}, V {bench_case.vocab}, float32",
            "loss": loss, "tokens": tokens, "times": times, "speedups": speedups(times, BASELINE)}


def e2e_pair(shape: e2e.ModelShape, pair: tuple[str, str], log) -> dict:
    """Two variants' PDU steps from the same weights and batches, alternated after the warm-up steps of each (their
    first-step losses must agree)."""
    steps = {}
    for variant in pair:
        step = e2e.make_step(shape, variant, torch.device("cpu"))
        for _ in range(e2e.WARMUP_STEPS):
            step()
        steps[variant] = step
    log(f"{pair}: warmed up")
    times = interleave(steps, shape.steps, log)
    first = [steps[variant].first_losses for variant in pair]
    if not all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(*first)):
        raise RuntimeError(f"{pair} disagree on the first step's losses: {first}")
    title = (f"PDU step, {shape.name}, {shape.batch} + {shape.batch} sequences of {shape.seq_len} tokens, "
             f"{shape.dtype}: {pair[1]} against {pair[0]}")
    return {"title": title, "times": times, "speedups": speedups(times, pair[0])}


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}–{max(values):.0f}]"


def section(meta: dict, micro: list[dict], steps: list[dict], wall_s: float, dry_run: bool) -> str:
    out = [f"## CPU, interleaved: `python -m benchmarks interleaved{' --dry-run' if dry_run else ''}`", "",
           f"Measured {meta['timestamp']} on **{meta['device']}**, torch {meta['torch']}, {meta['threads']} threads, "
           f"git `{meta['git_sha']}`; the run took {wall_s / 60:.1f} min. Each repeat times every implementation "
           "once, in an order rotated every repeat, in one process; \"speed-up\" is the median over repeats of the "
           "baseline's time over this one's in the same repeat (see `benchmarks/interleaved.py`). Times in ms: "
           "median [min–max]. Memory: the suite's section above.", "", "Key ratios:", ""]
    for result in micro:
        ours = result["speedups"].get("ceu-torch")
        if ours is None:
            continue
        target = SPEED_TARGETS[result["loss"]]
        scatter = spread(result["times"], BASELINE, "ceu-torch")
        line = (f"- {result['title']}: ceu-torch {ours:.2f}× eager-fp32 "
                f"({scatter}; target {TARGETS[target]}×: {verdict(target, ours)})")
        if "compile" in result["speedups"] and result["loss"] == "ce":
            versus = speedups(result["times"], "compile")["ceu-torch"]
            line += (f", {versus:.2f}× torch.compile's speed ({spread(result['times'], 'compile', 'ceu-torch')}; "
                     f"target {TARGETS['cpu_ce_vs_compile']}×: {verdict('cpu_ce_vs_compile', versus)})")
        out.append(line)
    for result in steps:
        baseline, fused = result["times"]
        speed = result["speedups"][fused]
        target = (f"; target {TARGETS['cpu_e2e_speed']}×: {verdict('cpu_e2e_speed', speed)}"
                  if baseline == "eager" else "")
        out.append(f"- {result['title']}: {fused} {speed:.2f}× {baseline} "
                   f"({spread(result['times'], baseline, fused)}{target})")
    for result in micro + steps:
        out += ["", f"**{result['title']}**, {len(next(iter(result['times'].values())))} repeats", "",
                "| implementation | ms, median [min–max] | speed-up |", "|---|---:|---:|"]
        out += [f"| {name} | {_cell(times)} | {result['speedups'][name]:.2f}× |"
                for name, times in result["times"].items()]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks interleaved", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 repeats; writes only under --out")
    parser.add_argument("--repeats", type=int, default=9, help="repeats of each micro case (default 9)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the PDU step on SmolLM2-135M (~10 min)")
    parser.add_argument("--out", type=Path, default=report.BENCH_DIR / "out")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(message):
        print(f"[{time.monotonic() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    repeats = 2 if args.dry_run else args.repeats
    micro = [micro_case("lmf", 64 if args.dry_run else CPU_TARGET_TOKENS, repeats, args.dry_run, log)]
    micro += [micro_case("ce", tokens // 8 if args.dry_run else tokens, repeats, args.dry_run, log)
              for tokens in CPU_CE_TARGET_TOKENS]
    steps = []
    if not args.no_e2e:
        shape = e2e.E2E_SHAPES["tiny" if args.dry_run else "smollm2-135m"]
        shape = replace(shape, steps=repeats if args.dry_run else E2E_REPEATS)
        steps = [e2e_pair(shape, pair, log) for pair in E2E_PAIRS]
    meta = report.environment("cpu-interleaved", torch.device("cpu"))
    body = section(meta, micro, steps, time.monotonic() - started, args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"interleaved{'-dry-run' if args.dry_run else ''}.md").write_text(body + "\n")
    if not args.dry_run:
        report.update_results("cpu-interleaved", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
