"""The one prepared command for a GPU machine: ``make gpu-check`` (``python3 -m benchmarks.gpu_check``).

On a bare GPU machine with its preinstalled stack (torch with CUDA, triton, transformers; no network, no ``datasets``)
it builds the CUDA extension in place, runs the GPU tests of every backend (kernel tests on CUDA tensors; a test
whose package is missing skips with the reason), runs ``python -m benchmarks gpu`` in the time left, and prints a
short pass/fail and timing table last, all inside ``TOTAL_BUDGET_S``. Logs go to ``--out`` (``$OUT`` when set, as on
the lent machines, else ``benchmarks/out/gpu-check``).

``--dry-run`` runs the same steps on a CPU machine so that the command cannot rot (``make test`` runs it): the build
step runs ``setup.py`` (which installs nothing without CUDA), the test step collects the same test files with the
packages the GPU machines lack made unimportable (a module that fails to import without them is caught here), and
the benchmark step runs ``python -m benchmarks gpu --dry-run``.
"""
import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 570
"""The whole command ends inside the 10 minutes a lent machine gives one command."""
STEP_LIMITS_S = {"build": 240, "tests": 270}
"""Hard limits on the first two steps; the benchmark gets what is left."""
BENCH_TAIL_S = 100
"""Kept back from the benchmark's budget: its last case (up to about a minute) and its report run past the budget."""
GPU_TEST_FILES = ("tests/test_lmf.py", "tests/test_cross_entropy.py", "tests/test_kernels_lmf_forward.py",
                  "tests/test_kernels_lmf_backward.py", "tests/test_kernels_ce_forward.py", "tests/test_kernels_tl_utils.py",
                  "tests/test_kernels_contract.py", "tests/test_kernels_triton_backend.py", "tests/test_kernels_cuda.py",
                  "tests/test_compile.py", "tests/test_checks.py", "tests/test_backends.py", "tests/test_ops.py")
"""The tests that run the kernels on CUDA tensors when a GPU is present (every backend through ``device_impls``)."""
TEST_WORKERS = 8
"""pytest-xdist processes for the GPU tests where the plugin is installed (it is on the lent machines)."""
MISSING_ON_GPU_MACHINES = ("datasets", "rouge_score")
"""Packages the lent GPU machines do not have; the dry run makes them unimportable."""


@dataclass
class Step:
    name: str
    status: str
    seconds: float
    detail: str


def run_logged(name: str, command: list[str], out_dir: Path, timeout: float, env: dict | None = None,
               echo: bool = True) -> tuple:
    """Run ``command`` with its output written to ``out_dir/<name>.log`` (and echoed when ``echo``); (return code or
    None on timeout, output)."""
    log = out_dir / f"{name}.log"
    print(f"=== {name}: {' '.join(command)}", flush=True)
    lines = []
    with log.open("w") as sink, subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True) as process:
        deadline = time.monotonic() + timeout
        for line in process.stdout:
            sink.write(line)
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                process.kill()
                return None, "".join(lines)
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            return None, "".join(lines)
    return code, "".join(lines)


def pytest_summary(output: str) -> str:
    """pytest's closing counts ("812 passed, 12 skipped in 93.1s"), or its last line."""
    for line in reversed(output.splitlines()):
        if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected|tests? collected)", line):
            return line.strip("= ").strip()
    return (output.strip().splitlines() or ["no output"])[-1][:120]


def blocked_packages_dir(names) -> str:
    """A folder that, first on ``PYTHONPATH``, makes each named package fail to import as if absent."""
    folder = tempfile.mkdtemp(prefix="ceu-gpu-check-")
    for name in names:
        Path(folder, f"{name}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}' (absent on the GPU machines)\", name='{name}')\n")
    return folder


def build(dry_run: bool, out_dir: Path) -> Step:
    started = time.monotonic()
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    code, output = run_logged("build", command, out_dir, STEP_LIMITS_S["build"], env, echo=not dry_run)
    seconds = time.monotonic() - started
    if code != 0:
        return Step("build", "FAIL", seconds, "timed out" if code is None else f"exit {code}, see build.log")
    if dry_run:
        return Step("build", "ok", seconds, "setup.py ran (no CUDA here: nothing to build)")
    probe = subprocess.run([sys.executable, "-c", "import ceu_kernels._C"], cwd=REPO_ROOT, capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return Step("build", "FAIL", seconds, "ceu_kernels._C does not import: " + probe.stderr.strip()[-120:])
    return Step("build", "ok", seconds, "ceu_kernels._C built in place")


def tests(dry_run: bool, out_dir: Path) -> Step:
    started = time.monotonic()
    env = dict(os.environ)
    if dry_run:
        paths = [blocked_packages_dir(MISSING_ON_GPU_MACHINES), str(REPO_ROOT), env.get("PYTHONPATH", "")]
        command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    else:
        paths = [str(REPO_ROOT), env.get("PYTHONPATH", "")]
        # Kernel compiles (every autotune config of every variant) dominate: spread them over processes.
        workers = ["-n", str(TEST_WORKERS)] if importlib.util.find_spec("xdist") else []
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *workers,
                   f"--junitxml={out_dir / 'tests.xml'}", *GPU_TEST_FILES]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    code, output = run_logged("tests", command, out_dir, STEP_LIMITS_S["tests"], env, echo=not dry_run)
    seconds = time.monotonic() - started
    summary = "timed out" if code is None else pytest_summary(output)
    return Step("tests", "ok" if code == 0 else "FAIL", seconds, summary)


def bench(dry_run: bool, out_dir: Path, seconds_left: float) -> Step:
    started = time.monotonic()
    command = [sys.executable, "-m", "benchmarks", "gpu", "--out", str(out_dir / "bench")]
    if dry_run:
        command.append("--dry-run")
    else:
        command += ["--time-budget", f"{max(30.0, seconds_left - BENCH_TAIL_S):.0f}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    code, output = run_logged("bench", command, out_dir, max(60.0, seconds_left), env, echo=not dry_run)
    seconds = time.monotonic() - started
    if code != 0:
        return Step("bench", "FAIL", seconds, "timed out" if code is None else f"exit {code}, see bench.log")
    return Step("bench", "ok", seconds, f"tables in {out_dir / 'bench'}" + ("" if dry_run else
                                                                           " and benchmarks/RESULTS.md"))


def environment() -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    parts.append(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    parts.append(f"git {sha.stdout.strip() or '?'}")
    return ", ".join(parts)


def table(steps: list[Step], header: str) -> str:
    lines = [header, "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail} |" for s in steps]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on a CPU machine (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else
                        REPO_ROOT / "benchmarks" / "out" / "gpu-check", help="folder for the logs")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; on a CPU machine run it with --dry-run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    header = f"gpu_check{' --dry-run' if args.dry_run else ''}: {environment()}, {time.strftime('%Y-%m-%d %H:%M')}"
    print(header, flush=True)
    steps = [build(args.dry_run, args.out), tests(args.dry_run, args.out)]
    steps.append(bench(args.dry_run, args.out, TOTAL_BUDGET_S - (time.monotonic() - started)))
    summary = table(steps, header + f"; total {time.monotonic() - started:.0f} s")
    (args.out / "summary.md").write_text(summary + "\n")
    for step in steps:
        if step.status != "ok":
            tail = (args.out / f"{step.name}.log").read_text().splitlines()[-40:]
            print(f"\n--- last lines of {args.out / step.name}.log", *tail, sep="\n")
    print("\n" + summary)
    return 0 if all(step.status == "ok" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
