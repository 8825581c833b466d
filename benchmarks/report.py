"""Everything a run writes: the CSVs (stable schema), the plots drawn from them, the Markdown tables, and the run's
section of ``benchmarks/RESULTS.md`` (only that section is replaced, so the CPU and GPU results live side by side).
"""
import csv
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

from .providers import PROVIDERS
from .shapes import CPU_CE_TARGET_TOKENS, CPU_TARGET_TOKENS, GPU_HEADLINE, HEADS, TARGETS, verdict

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
KEPT_PLOTS_DIR = BENCH_DIR / "plots"

META_COLUMNS = ["timestamp", "git_sha", "device", "torch", "triton", "threads", "suite"]
MICRO_COLUMNS = META_COLUMNS + [
    "loss", "preset", "tokens", "hidden", "vocab", "dtype", "provider", "mode", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "peak_mb", "delta_mb", "tflops", "floor_ratio",
    "loss_err", "grad_hidden_err", "grad_weight_err"]
E2E_COLUMNS = META_COLUMNS + [
    "model", "params_m", "tokens_per_batch", "dtype", "variant", "impl", "status", "median_ms", "p20_ms", "p80_ms",
    "reps", "rounds", "round_ms", "speedup", "speedup_spread", "peak_mb", "round_peak_mb", "total_peak_mb",
    "loss_fgt", "loss_rtn"]
MARKERS = "os^vDx+*"
PROVIDER_ORDER = list(PROVIDERS)
"""Rows, plots and legends list the providers in the order they are declared."""


def environment(suite: str, device: torch.device) -> dict:
    """The columns every row of a run shares: when, which code, which machine and library versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()} ({os.cpu_count()} cores)"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    return {"timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_sha": _git_sha(), "device": name, "torch": torch.__version__, "triton": triton_version,
            "threads": torch.get_num_threads(), "suite": suite}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BENCH_OUTPUTS = ("benchmarks/RESULTS.md", "benchmarks/plots")
"""What the benchmarks write themselves: an edit there leaves the measured code as committed (a second benchmark run
before the first one's results are committed)."""


def _git_sha() -> str:
    """The commit measured, ``+dirty`` when a tracked file outside :data:`BENCH_OUTPUTS` differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                  *(f":(top,exclude){path}" for path in BENCH_OUTPUTS))
    return sha + ("+dirty" if changed else "")


def add_ratios(rows: list[dict]) -> None:
    """Each row's time over the GEMM floor of its case (floor rows come from another process on the CPU)."""
    floors = {_case_key(r): r["median_ms"] for r in rows if r["provider"] == "floor" and r.get("median_ms")}
    for row in rows:
        floor = floors.get(_case_key(row))
        if floor and row.get("median_ms") and row["provider"] != "floor":
            row["floor_ratio"] = row["median_ms"] / floor


def _case_key(row: dict) -> tuple:
    return row["loss"], row["preset"], row["tokens"], row["dtype"]


def write_csv(path: Path, columns: list[str], meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **{k: _csv_value(v) for k, v in row.items()}})


def _csv_value(value):
    if isinstance(value, list):
        return " ".join(str(_csv_value(item)) for item in value)
    return f"{value:.6g}" if isinstance(value, float) else value


def _ms(value) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _lookup(rows: list[dict]) -> dict:
    return {(*_case_key(r), r["provider"], r["mode"]): r for r in rows}


def micro_tables(rows: list[dict]) -> str:
    """One table per (loss, head preset, dtype); a row per token count and provider, fwd+bwd figures beside
    eager-fp32's (the reference implementation's) and the floor's."""
    by_key = _lookup(rows)
    groups = sorted({(r["loss"], r["preset"], r["dtype"]) for r in rows}, key=lambda g: (g[0] != "lmf", g[1], g[2]))
    out = []
    for loss, preset, dtype in groups:
        group_rows = [r for r in rows if (r["loss"], r["preset"], r["dtype"]) == (loss, preset, dtype)]
        first = group_rows[0]
        out.append(f"\n**{loss.upper()}**, head `{preset}` (H {first['hidden']}, V {first['vocab']}), {dtype}\n")
        out.append("| tokens | provider | fwd ms | bwd ms | fwd+bwd ms [p20–p80] | speed-up vs eager-fp32 | × floor "
                   "| TFLOP/s | peak MiB | peak vs eager-fp32 | loss err | grad err |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        tokens_list = sorted({r["tokens"] for r in group_rows})
        for tokens in tokens_list:
            present = {r["provider"] for r in group_rows
                       if r["tokens"] == tokens and not r.get("status", "").startswith("skipped")}
            for provider in [p for p in PROVIDER_ORDER if p in present]:
                get = lambda mode, p=provider: by_key.get((loss, preset, tokens, dtype, p, mode), {})  # noqa: E731
                out.append(_micro_line(tokens, provider, get, by_key.get((loss, preset, tokens, dtype,
                                                                          "eager-fp32", "full"), {})))
    return "\n".join(out)


def _micro_line(tokens, provider, get, eager) -> str:
    if provider == "floor":
        row = get("forward")
        time_ms = _ms(row.get("median_ms")) if row.get("status") == "ok" else row.get("status", "–")
        return f"| {tokens} | floor (1 GEMM) | {time_ms} | – | – | – | 1× | {_num(row.get('tflops'), '.2f')} " \
               f"| – | – | – | – |"
    forward, backward, full = get("forward"), get("backward"), get("full")
    if full.get("status") != "ok":
        status = full.get("status", "not run")
        return f"| {tokens} | {provider} | {_ms(forward.get('median_ms'))} | {_ms(backward.get('median_ms'))} " \
               f"| {status} | – | – | – | – | – | – | – |"
    speedup = eager.get("median_ms") / full["median_ms"] if eager.get("median_ms") else None
    peak = full.get("peak_mb")
    peak_ratio = peak / eager["peak_mb"] if peak is not None and eager.get("peak_mb") else None
    grad_err = max(full.get("grad_hidden_err", math.nan), full.get("grad_weight_err", math.nan))
    return (f"| {tokens} | {provider} | {_ms(forward.get('median_ms'))} | {_ms(backward.get('median_ms'))} "
            f"| {_ms(full['median_ms'])} [{_ms(full['p20_ms'])}–{_ms(full['p80_ms'])}] "
            f"| {_ratio(speedup)} | {_ratio(full.get('floor_ratio'))} | {_num(full.get('tflops'), '.2f')} "
            f"| {_num(peak, '.0f')} | {_ratio(peak_ratio, '.3f')} | {_num(full.get('loss_err'), '.1e')} "
            f"| {_num(grad_err, '.1e')} |")


def _ratio(value, spec: str = ".2f") -> str:
    return "–" if value is None else f"{value:{spec}}×"


def _num(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}"


def e2e_table(rows: list[dict]) -> str:
    """The PDU-step variants (rows of :func:`benchmarks.e2e.combine_rounds`): time per step over every round, each
    round's median, the speed-up over eager within rounds, and peak memory over the model+optimizer state."""
    if not rows:
        return ""
    first = rows[0]
    weights = "the real checkpoint" if first["model"] == "smollm2-135m" else "shape with random weights"
    rounds = max((row.get("rounds", 1) for row in rows), default=1)
    how = (f"each variant in {rounds} fresh processes, taken in turn; speed-up: median over rounds of eager's time "
           "over this variant's in the same round; memory: median over rounds" if rounds > 1 else "one run each")
    out = [f"\n**PDU step** (forget + retain batch, AdamW), `{first['model']}` {weights} "
           f"({first.get('params_m', math.nan):.3g} M parameters), {first.get('tokens_per_batch', '?')} tokens per "
           f"batch, {first.get('dtype', '?')}; {how}\n",
           "| variant | impl | step ms [p20–p80] | median per round, ms | speed-up | peak MiB over model+optimizer "
           "| less memory | total peak MiB | L_fgt | L_rtn |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    eager = next((r for r in rows if r["variant"] == "eager" and r.get("status") == "ok"), {})
    for row in rows:
        if row.get("status") != "ok":
            out.append(f"| {row['variant']} | {row.get('impl', '–')} | {row.get('status')} | – | – | – | – | – | – "
                       "| – |")
            continue
        saving = eager["peak_mb"] / row["peak_mb"] if eager.get("peak_mb") and row.get("peak_mb") else None
        out.append(f"| {row['variant']} | {row.get('impl', '–')} | {_ms(row['median_ms'])} "
                   f"[{_ms(row['p20_ms'])}–{_ms(row['p80_ms'])}] | {', '.join(_ms(ms) for ms in row['round_ms'])} "
                   f"| {_ratio(row.get('speedup'))} | {_num(row['peak_mb'], '.0f')} | {_ratio(saving)} "
                   f"| {_num(row.get('total_peak_mb'), '.0f')} | {row['loss_fgt']:.4f} | {row['loss_rtn']:.4f} |")
    return "\n".join(out)


def skipped_lines(rows: list[dict]) -> str:
    """Providers that did not run, once each with why."""
    reasons = {}
    for row in rows:
        status = row.get("status", "")
        if status.startswith("skipped") or status.startswith("error"):
            reasons.setdefault((row["provider"], status), set()).add(row["loss"])
    if not reasons:
        return ""
    lines = [f"- `{provider}` ({', '.join(sorted(losses))}): {status}"
             for (provider, status), losses in sorted(reasons.items())]
    return "\nNot measured:\n" + "\n".join(lines)


def plot(rows: list[dict], out_dir: Path, suite: str) -> list[Path]:
    """Time and peak memory of forward+backward against tokens, a line per provider, one figure per head and loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = sorted({(r["loss"], r["preset"], r["dtype"]) for r in rows})
    for loss, preset, dtype in groups:
        group = [r for r in rows if (r["loss"], r["preset"], r["dtype"]) == (loss, preset, dtype)
                 and r.get("status") == "ok" and r["mode"] in ("full", "forward") and r.get("median_ms")]
        if len({r["tokens"] for r in group}) < 2:
            continue
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.2))
        for provider in PROVIDER_ORDER:
            mode = "forward" if provider == "floor" else "full"
            points = sorted((r["tokens"], r) for r in group if r["provider"] == provider and r["mode"] == mode)
            if not points:
                continue
            style = ({"linestyle": "--", "color": "grey"} if provider == "floor"
                     else {"marker": MARKERS[PROVIDER_ORDER.index(provider) % len(MARKERS)], "fillstyle": "none"})
            time_axis.plot([t for t, _ in points], [r["median_ms"] for _, r in points], label=provider, **style)
            memory_points = [(t, r["peak_mb"]) for t, r in points if r.get("peak_mb") is not None]
            if memory_points:
                memory_axis.plot(*zip(*memory_points), label=provider, **style)
        for axis, label in ((time_axis, "fwd+bwd ms (floor: 1 GEMM)"), (memory_axis, "fwd+bwd peak MiB over inputs")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("tokens")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
        time_axis.legend(fontsize=7)
        figure.suptitle(f"{loss.upper()} {preset} {dtype} ({suite})", fontsize=9)
        figure.tight_layout()
        path = out_dir / f"{suite}-{loss}-{preset}-{dtype}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=72)
        plt.close(figure)
        paths.append(path)
    return paths


def update_results(suite: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace this suite's section of RESULTS.md (between its markers), appending it the first time."""
    begin, end = f"<!-- BEGIN {suite} -->", f"<!-- END {suite} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def lmf_gradient_mb(tokens: int, preset: str = "cpu-target") -> float:
    """The float32 dW and dh that an LMF forward+backward returns: the floor of its peak memory over the inputs."""
    hidden, vocab = HEADS[preset]
    return (vocab + tokens) * hidden * 4 / 2**20


def key_ratios(suite: str, rows: list[dict], e2e_rows: list[dict]) -> list[str]:
    """The issue's targets (:data:`benchmarks.shapes.TARGETS`), each with the measured figure and whether it is met;
    absent figures say so."""
    by_key = _lookup(rows)
    lines = []

    def full(loss, preset, tokens, dtype, provider):
        row = by_key.get((loss, preset, tokens, dtype, provider, "full"), {})
        return row if row.get("status") == "ok" else None

    if suite == "cpu":
        lmf = ("lmf", "cpu-target", CPU_TARGET_TOKENS, "float32")
        ours, eager = full(*lmf, "ceu-torch"), full(*lmf, "eager-fp32")
        name = f"LMF fwd+bwd, tokens {CPU_TARGET_TOKENS}, H 256, V 128256, float32"
        if ours and eager:
            speedup = eager["median_ms"] / ours["median_ms"]
            lines.append(f"{name}: ceu-torch is {speedup:.2f}× faster than eager-fp32 (target "
                         f"{TARGETS['cpu_lmf_speed']}×: {verdict('cpu_lmf_speed', speedup)})")
            if ours.get("peak_mb") is not None and eager.get("peak_mb"):
                share = ours["peak_mb"] / eager["peak_mb"]
                lines.append(f"{name}: ceu-torch's peak memory over the inputs is {share:.4f} of eager-fp32's "
                             f"({ours['peak_mb']:.1f} vs {eager['peak_mb']:.0f} MiB; target "
                             f"{TARGETS['cpu_lmf_memory']}: {verdict('cpu_lmf_memory', share)}; the returned dW and "
                             f"dh alone are {lmf_gradient_mb(CPU_TARGET_TOKENS):.1f} MiB)")
        else:
            lines.append(f"{name}: not measured in this run")
        for tokens in CPU_CE_TARGET_TOKENS:
            ce = ("ce", "cpu-target", tokens, "float32")
            ours, eager, compiled = (full(*ce, p) for p in ("ceu-torch", "eager-fp32", "compile"))
            name = f"CE fwd+bwd, tokens {tokens}, H 256, V 128256, float32"
            if not (ours and eager):
                lines.append(f"{name}: not measured in this run")
                continue
            speedup = eager["median_ms"] / ours["median_ms"]
            line = f"{name}: ceu-torch is {speedup:.2f}× faster than eager-fp32 (target " \
                   f"{TARGETS['cpu_ce_speed']}×: {verdict('cpu_ce_speed', speedup)})"
            if compiled:
                versus = compiled["median_ms"] / ours["median_ms"]
                line += (f", {versus:.2f}× torch.compile's speed (target {TARGETS['cpu_ce_vs_compile']}×: "
                         f"{verdict('cpu_ce_vs_compile', versus)})")
            if tokens == CPU_TARGET_TOKENS and ours.get("peak_mb") is not None and eager.get("peak_mb"):
                share = ours["peak_mb"] / eager["peak_mb"]
                line += f", peak memory over the inputs {share:.3f} of eager-fp32's (target " \
                        f"{TARGETS['cpu_ce_memory']}: {verdict('cpu_ce_memory', share)})"
            for peer in ("cce-compile",):
                if row := full(*ce, peer):
                    line += f"; {row['median_ms'] / ours['median_ms']:.2f}× {peer}'s speed"
            lines.append(line)
    else:
        preset, tokens = GPU_HEADLINE
        head = (preset, tokens, "bfloat16")
        floor = by_key.get(("lmf", *head, "floor", "forward"), {})
        ours = [r for p in ("ceu-torch", "ceu-triton", "ceu-cuda") if (r := full("lmf", *head, p))]
        eager = full("lmf", *head, "eager-fp32")
        name = f"LMF fwd+bwd, {preset} head, tokens {tokens}, bf16"
        if ours and floor.get("median_ms"):
            best = min(ours, key=lambda r: r["median_ms"])
            ratio = best["median_ms"] / floor["median_ms"]
            lines.append(f"{name}: best backend {best['provider']} takes {ratio:.2f}× the GEMM floor "
                         f"(target {TARGETS['gpu_lmf_floor']}×: {verdict('gpu_lmf_floor', ratio)})")
            if eager:
                speedup = eager["median_ms"] / best["median_ms"]
                lines.append(f"{name}: {best['provider']} is {speedup:.2f}× faster than eager-fp32 (target "
                             f"{TARGETS['gpu_lmf_speed']}×: {verdict('gpu_lmf_speed', speedup)})")
        else:
            lines.append(f"{name}: not measured in this run")
        ours = [r for p in ("ceu-torch", "ceu-triton", "ceu-cuda") if (r := full("ce", *head, p))]
        cce = full("ce", *head, "cce")
        name = f"CE fwd+bwd, {preset} head, tokens {tokens}, bf16"
        if ours and cce:
            best = min(ours, key=lambda r: r["median_ms"])
            time_ratio = best["median_ms"] / cce["median_ms"]
            memory_ratio = best["peak_mb"] / cce["peak_mb"] if cce.get("peak_mb") else float("nan")
            lines.append(f"{name}: best backend {best['provider']} takes {time_ratio:.2f}× cut-cross-entropy's time "
                         f"and {memory_ratio:.2f}× its peak memory (target {TARGETS['gpu_ce_vs_cce']}× both: "
                         f"{verdict('gpu_ce_vs_cce', max(time_ratio, memory_ratio))})")
        else:
            lines.append(f"{name}: no comparison with cut-cross-entropy in this run")
    return lines + e2e_key_ratios(suite, e2e_rows)


def e2e_key_ratios(suite: str, e2e_rows: list[dict]) -> list[str]:
    """The PDU step's targets: the fused step's speed-up over eager (and on a GPU its memory saving), and on the CPU
    the checkpointed fused step's share of eager's peak memory."""
    lines = []
    variants = {r["variant"]: r for r in e2e_rows if r.get("status") == "ok"}
    if "eager" in variants and "fused" in variants:
        eager, fused = variants["eager"], variants["fused"]
        speedup = fused["speedup"]
        saving = eager["peak_mb"] / fused["peak_mb"]
        total_saving = eager["total_peak_mb"] / fused["total_peak_mb"]
        targets = (f" (targets {TARGETS['gpu_e2e_speed']}× and {TARGETS['gpu_e2e_memory_saving']}×: "
                   f"{verdict('gpu_e2e_speed', speedup)}, {verdict('gpu_e2e_memory_saving', saving)})"
                   if suite == "gpu" else
                   f" (target {TARGETS['cpu_e2e_speed']}×: {verdict('cpu_e2e_speed', speedup)})")
        scatter = f" ({fused['speedup_spread']})" if "speedup_spread" in fused else ""
        lines.append(f"PDU step, {eager['model']}: fused over eager, speed-up {speedup:.2f}×{scatter}, peak memory "
                     f"over the model+optimizer state {saving:.2f}× smaller ({total_saving:.2f}× counting that "
                     f"state){targets}")
        checkpointed = variants.get("fused+checkpointing")
        if checkpointed is not None and suite == "cpu":
            share = checkpointed["peak_mb"] / eager["peak_mb"]
            lines.append(f"PDU step, {eager['model']}: fused with gradient checkpointing holds {share:.2f} of eager's "
                         f"peak memory over the model+optimizer state (target "
                         f"{TARGETS['cpu_e2e_checkpointed_memory']}: {verdict('cpu_e2e_checkpointed_memory', share)})")
    return lines


def section(suite: str, meta: dict, rows: list[dict], e2e_rows: list[dict], not_run: list, plots: list[Path],
            wall_s: float, dry_run: bool) -> str:
    """The suite's Markdown: provenance, key ratios, tables, what was not measured, plots."""
    title = {"cpu": "CPU", "gpu": "GPU"}[suite]
    if dry_run:
        how = "tiny shapes, 2 repeats: a check that the harness runs, not a measurement"
    elif suite == "cpu":
        how = ("median of ≥ 3 repeats after a warm-up (`time.perf_counter`); memory: peak resident set over the "
               "inputs, in a fresh process per provider")
    else:
        how = "CUDA events after an L2 flush, ≥ 5 repeats after a warm-up; memory: CUDA allocator peak over the inputs"
    out = [f"## {title}: `python -m benchmarks {suite}{' --dry-run' if dry_run else ''}`",
           "",
           f"Measured {meta['timestamp']} on **{meta['device']}**, torch {meta['torch']}, triton {meta['triton']}, "
           f"{meta['threads']} threads, git `{meta['git_sha']}`; the run took {wall_s / 60:.1f} min. "
           f"Timing: {how}. \"fwd+bwd\" is one forward and backward to the gradients of hidden and weight; "
           f"\"× floor\" divides it by one `torch.mm(h, W.T)` of the head; TFLOP/s counts 2·tokens·H·V per GEMM the "
           f"loss needs (LMF 1, CE 3); errors are relative to a float64 reference (grad err: the worse of hidden "
           f"and weight).",
           "", "Key ratios:", ""]
    out += [f"- {line}" for line in key_ratios(suite, rows, e2e_rows)]
    out.append(micro_tables(rows))
    out.append(e2e_table(e2e_rows))
    out.append(skipped_lines(rows))
    if not_run:
        out.append(f"\n{len(not_run)} case(s) not run, the time budget being spent: "
                   + ", ".join(c.key for c in not_run))
    if plots:
        out.append("\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots))
    return "\n".join(out)
