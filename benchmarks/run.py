"""The two commands: every case × provider × mode, then the end-to-end PDU step, then the CSVs, plots, tables and
the suite's section of RESULTS.md, the table printed last.

``cpu`` runs each (case, provider) and each end-to-end variant in a fresh process (memory from the resident set);
``gpu`` runs in this process (memory from the CUDA allocator) and stops starting new cases once its time budget is
spent, so that it ends inside the 10 minutes a GPU command gets. ``--dry-run`` swaps in tiny shapes and writes only
under the output folder; ``gpu --dry-run`` exercises the GPU command's in-process path on the CPU.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import e2e, report
from .micro import ROWS_MARKER, case_row, measure
from .providers import float64_reference, make_inputs, providers_for
from .shapes import GPU_HEADLINE, Case, cpu_cases, gpu_cases
from .timing import Budget

REPO_ROOT = report.BENCH_DIR.parent
BUDGETS = {"cpu": Budget(seconds=2.0, min_reps=3, max_reps=20), "gpu": Budget(seconds=0.2, min_reps=5, max_reps=50),
           "dry-run": Budget(seconds=0.0, min_reps=2, max_reps=2)}
SUBPROCESS_TIMEOUT_S = 900


class Suite:
    """One command's run: where it runs, what it measures, and the rows gathered so far."""

    def __init__(self, name: str, dry_run: bool, out_dir: Path, time_budget_s: float | None,
                 providers: set[str] | None):
        self.name, self.dry_run, self.out_dir = name, dry_run, out_dir
        use_cuda = name == "gpu" and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.isolate = self.device.type == "cpu" and name == "cpu"
        self.budget = BUDGETS["dry-run" if dry_run else name]
        self.cases = (cpu_cases if name == "cpu" else gpu_cases)(tiny=dry_run)
        self.e2e_shape = e2e.E2E_SHAPES["tiny" if dry_run else "llama-3.2-1b" if name == "gpu" else "smollm2-135m"]
        self.time_budget_s, self.providers = time_budget_s, providers
        self.started = time.monotonic()
        self.rows, self.e2e_rows, self.not_run = [], [], []

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", file=sys.stderr, flush=True)

    def out_of_time(self) -> bool:
        return self.time_budget_s is not None and time.monotonic() - self.started > self.time_budget_s

    def run(self) -> str:
        headline = 2 if self.name == "gpu" else len(self.cases)  # the GPU's end-to-end step runs after its headline
        for index, case in enumerate(self.cases):
            if index == headline:
                self.run_e2e()
            if self.out_of_time():
                self.not_run.append(case)
                continue
            self.run_case(case)
        if headline >= len(self.cases):
            self.run_e2e()
        return self.finish()

    def run_case(self, case: Case) -> None:
        reference_path, reference = None, None
        for provider in providers_for(case):
            if self.providers and provider.name not in self.providers:
                continue
            reason = provider.unavailable(case, self.device)
            if reason:
                self.rows.append({**case_row(case, provider.name, "full"), "status": f"skipped: {reason}"})
                continue
            if self.isolate:
                if reference_path is None:
                    reference_path = self._save_reference(case)
                rows = self._measure_in_subprocess(case, provider.name, reference_path)
            else:
                if reference is None:
                    reference = _ReferenceOnce(case, self.device)
                rows = measure(case, provider.name, self.device, self.budget, reference)
            self.rows.extend(rows)
            self.log(f"{case.key} {provider.name}: " + ", ".join(
                f"{r['mode']} {r['median_ms']:.3g} ms" if r["status"] == "ok" else f"{r['mode']} {r['status']}"
                for r in rows))
        if reference_path is not None:
            reference_path.unlink(missing_ok=True)
        _release(self.device)

    def _save_reference(self, case: Case) -> Path:
        path = self.out_dir / "cache" / f"reference-{case.key}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(float64_reference(case, make_inputs(case, self.device)), path)
        return path

    def _measure_in_subprocess(self, case: Case, provider: str, reference_path: Path) -> list[dict]:
        command = [sys.executable, "-m", "benchmarks.micro", "--case", json.dumps(case.to_dict()),
                   "--provider", provider, "--budget", json.dumps(self.budget.__dict__),
                   "--reference", str(reference_path)]
        rows = _run_marked(command, ROWS_MARKER)
        return rows if isinstance(rows, list) else [{**case_row(case, provider, "full"), "status": rows}]

    def run_e2e(self) -> None:
        """Every PDU-step variant: on the CPU in fresh processes, :data:`benchmarks.e2e.ROUNDS` rounds in turn; on
        the GPU once each, in this process."""
        self.e2e_rows = e2e.run_rounds(self._e2e_variant, e2e.ROUNDS if self.isolate else 1, self.log)

    def _e2e_variant(self, variant: str) -> dict:
        if self.out_of_time():
            return {"model": self.e2e_shape.name, "variant": variant, "status": "not run, time budget spent"}
        if self.isolate:
            row = _run_marked([sys.executable, "-m", "benchmarks.e2e", "--shape", self.e2e_shape.name,
                               "--variant", variant], e2e.ROWS_MARKER)
            return row if isinstance(row, dict) else {"model": self.e2e_shape.name, "variant": variant, "status": row}
        row = e2e.run_variant(self.e2e_shape, variant, self.device)
        _release(self.device)
        return row

    def finish(self) -> str:
        report.add_ratios(self.rows)
        meta = report.environment(self.name, self.device)
        stem = self.name + ("-dry-run" if self.dry_run else "")
        report.write_csv(self.out_dir / f"{stem}.csv", report.MICRO_COLUMNS, meta, self.rows)
        report.write_csv(self.out_dir / f"{stem}-e2e.csv", report.E2E_COLUMNS, meta, self.e2e_rows)
        plots = report.plot(self.rows, self.out_dir / "plots", stem)
        kept = []
        if not self.dry_run:
            report.KEPT_PLOTS_DIR.mkdir(exist_ok=True)
            for path in plots:
                if self._headline_plot(path):
                    kept.append(Path(shutil.copy(path, report.KEPT_PLOTS_DIR / path.name)))
        body = report.section(self.name, meta, self.rows, self.e2e_rows, self.not_run, kept,
                              time.monotonic() - self.started, self.dry_run)
        (self.out_dir / f"{stem}.md").write_text(body + "\n")
        if not self.dry_run:
            report.update_results(self.name, body)
        return body

    def _headline_plot(self, path: Path) -> bool:
        preset = GPU_HEADLINE[0] if self.name == "gpu" else "cpu-target"
        return f"-{preset}-" in path.name


class _ReferenceOnce:
    """The float64 reference of a case, computed on first use and kept on the host for the case's other providers
    (so that it takes no device memory from their measurements)."""

    def __init__(self, case: Case, device: torch.device):
        self.case, self.device, self.value = case, device, None

    def __call__(self) -> dict:
        if self.value is None:
            reference = float64_reference(self.case, make_inputs(self.case, self.device))
            self.value = {name: tensor.cpu() for name, tensor in reference.items()}
            _release(self.device)
        return self.value


def _run_marked(command: list[str], marker: str):
    """Run a measuring subprocess; its JSON payload, or a status string saying why there is none."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"error: timed out after {SUBPROCESS_TIMEOUT_S} s"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return f"error: exit {done.returncode}: {last}"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

