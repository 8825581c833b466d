"""Ahead-of-time compile check of every Triton launch path, for GPUs this machine need not have.

Triton compiles for a named GPU target without a GPU or a driver (TTIR -> TTGIR -> PTX -> cubin with the ptxas of the
triton wheel). This module runs the package's own launchers on small CPU tensors with the launches captured instead
of executed, so the arguments, flags, block sizes and autotune configs are exactly those a GPU run would use (after
the launchers' own pruning for the target's shared memory), then compiles each one for each target and reports
registers, stack (register spills), shared memory and how ``tl.dot`` was lowered (wgmma, mma.sync or FMA).

It fails on a compile error, on any launch (an autotune config the autotuner may try, or an explicit block choice)
whose shared memory exceeds the target's per-block limit, and on a 16-bit dot of the main kernels that does not use
wgmma on sm_90. Compiled kernels land in Triton's own cache (keyed by source hash, options and target), so a rerun
only re-captures. ``python -m ceu_kernels.compile_check --help`` for the options; ``--subset`` is what ``make test``
runs, the default the full sweep (``make compile-check``).
"""
import argparse
import contextlib
import itertools
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from . import tl_utils
from .ce_backward import ce_gradients
from .ce_forward import ce_token_losses
from .ce_fused import ce_forward_backward
from .lmf_backward import lmf_gradients
from .lmf_forward import lmf_row_stats


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    shared_memory: int
    """Per-block opt-in shared memory in bytes, the limit Triton checks at launch."""

    def gpu_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)


TARGETS = {
    "sm90": Target("sm90", 90, 232448),  # H100 / H200 (compiled as sm_90a)
    "sm80": Target("sm80", 80, 166912),  # A100
}

WGMMA_KERNELS = ("_lmf_forward_kernel", "_ce_forward_kernel", "_ce_backward_kernel")
"""The GEMM kernels whose 16-bit dots must lower to wgmma on sm_90."""

PRECISIONS = {
    "fp16": (torch.float16, "highest"),
    "bf16": (torch.bfloat16, "highest"),
    "fp32-tf32": (torch.float32, "high"),
    "fp32-ieee": (torch.float32, "highest"),
    "fp64": (torch.float64, "highest"),
}
"""Input dtype and ``torch.set_float32_matmul_precision`` of each swept case (it decides fp32's ``tl.dot``)."""

N_TOKENS, HIDDEN, VOCAB, VOCAB_SIZE = 300, 256, 1024, 1008
"""Capture shapes: a ragged token count, and a padded vocabulary whose real size, like the hidden size, is a multiple
of 16 as LM heads' are (Triton specialises integer arguments on divisibility by 16)."""


@dataclass
class Launch:
    """One captured kernel launch: the kernel, its arguments, and the configs a GPU launch could compile."""

    path: str
    kernel: JITFunction
    args: tuple
    kwargs: dict
    configs: list = field(default_factory=list)
    """Autotune configs left after the launcher's pruning for the target; ``[None]`` for an explicit launch."""


def _launch_paths(full: bool):
    """``(name, precision, call)`` for every way the launchers are driven; ``full=False``: the training flags only
    (no bias, every gradient) for every dtype, which is what ``impl="triton"`` runs in practice."""
    biases = (False, True) if full else (False,)
    gradient_sets = [(True, True, False), (True, False, False), (False, True, False), (True, True, True)]
    gradient_sets = gradient_sets if full else gradient_sets[:1]
    for precision, bias in itertools.product(PRECISIONS, biases):
        yield (f"lmf_row_stats bias={bias}", precision,
               lambda t, bias=bias: lmf_row_stats(t.hidden, t.weight, t.bias(bias), VOCAB_SIZE))
        yield (f"ce_token_losses bias={bias}", precision,
               lambda t, bias=bias: ce_token_losses(t.hidden, t.weight, t.bias(bias), t.labels, VOCAB_SIZE, -100))
        for needs in gradient_sets:
            if needs[2] and not bias:
                continue
            yield (f"ce_gradients bias={bias} needs={needs}", precision,
                   lambda t, bias=bias, needs=needs: ce_gradients(t.grad, t.lse, t.hidden, t.weight, t.bias(bias),
                                                                  t.labels, VOCAB_SIZE, -100, None, *needs))
    # The gradients formed in the forward: the GEMMs run in torch (on these CPU tensors), only the row kernel is
    # Triton's, and it has no tl.dot: the input dtype matters, not the matmul precision.
    for precision in ("fp16", "bf16", "fp32-ieee", "fp64") if full else ("fp16", "bf16", "fp32-ieee"):
        yield ("ce_forward_backward", precision,  # one chunk of all tokens: one launch
               lambda t: ce_forward_backward(t.hidden, t.weight, None, t.labels, VOCAB_SIZE, -100, N_TOKENS, True,
                                             True, False))
    # The LMF backward has no tl.dot: matmul precision does not matter, the input dtype does.
    for precision in ("fp16", "bf16", "fp32-ieee", "fp64") if full else ("fp16", "fp32-ieee"):
        for needs, deterministic in itertools.product(gradient_sets, (False, True)):
            yield (f"lmf_gradients needs={needs} deterministic={deterministic}", precision,
                   lambda t, needs=needs, deterministic=deterministic: lmf_gradients(
                       t.coef, t.argmax, t.hidden, t.weight, t.weight_mean, VOCAB_SIZE, *needs,
                       deterministic=deterministic))


class _Inputs:
    """Small CPU tensors of one dtype in the shapes the launchers expect; nothing is ever computed on them."""

    def __init__(self, dtype):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        generator = torch.Generator().manual_seed(0)
        self.hidden = torch.randn(N_TOKENS, HIDDEN, generator=generator).to(dtype)
        self.weight = torch.randn(VOCAB, HIDDEN, generator=generator).to(dtype)
        self._bias = torch.randn(VOCAB, generator=generator).to(dtype)
        self.labels = torch.randint(0, VOCAB_SIZE, (N_TOKENS,), generator=generator)
        self.grad = torch.ones(N_TOKENS, dtype=acc)
        self.lse = torch.ones(N_TOKENS, dtype=acc)
        self.coef = torch.ones(N_TOKENS, dtype=acc)
        self.argmax = torch.randint(0, VOCAB_SIZE, (N_TOKENS,), generator=generator)
        self.weight_mean = torch.zeros(HIDDEN, dtype=acc)

    def bias(self, wanted):
        return self._bias if wanted else None


@contextlib.contextmanager
def _captured(sink: list, path: str, target: Target):
    """Record launches instead of running them; the launchers' autotune pruning sees ``target``'s shared memory."""

    def jit_run(kernel, *args, grid, warmup, **kwargs):
        sink.append(Launch(path, kernel, args, kwargs, [None]))

    def autotuner_run(tuner, *args, grid, warmup, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs)
        tuner.nargs = None
        sink.append(Launch(path, tuner.fn, args, kwargs, list(configs)))

    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", autotuner_run), \
            mock.patch.object(tl_utils, "shared_memory_limit", lambda device: target.shared_memory):
        yield


def capture(target: Target, full: bool, only: str = "") -> tuple[list[tuple[str, Launch]], list[dict]]:
    """Every launch of every launch path whose name contains ``only``, as ``(precision, launch)``, and a failing row
    for each launch path whose launcher raised (as when no autotune config fits the target)."""
    launches, errors = [], []
    inputs = {}
    for path, precision, call in _launch_paths(full):
        if only not in path:
            continue
        dtype, matmul_precision = PRECISIONS[precision]
        if dtype not in inputs:
            inputs[dtype] = _Inputs(dtype)
        found = []
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            with _captured(found, path, target):
                call(inputs[dtype])
        except Exception as error:  # the launcher's own refusal is a finding of this check
            errors.append(dict(target=target.name, kernel="(launcher)", path=path, precision=precision, config="",
                               error=f"{type(error).__name__}: {error}"))
        finally:
            torch.set_float32_matmul_precision(previous)
        launches += [(precision, launch) for launch in found]
    return launches, errors


class _CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(warmup=True)``: compile for ``target``, never launch."""

    def __init__(self, target: Target):
        self.target = target

    def get_current_device(self):
        return self.target.name  # the binder cache is per device: one per target

    def get_current_stream(self, device=None):
        return None

    def get_current_target(self):
        return self.target.gpu_target()


def dot_lowering(kernel) -> str:
    """How the kernel's ``tl.dot`` became machine code: wgmma, mma.sync, FMA, or '-' without a dot."""
    ptx = kernel.asm["ptx"]
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma" if "tt.dot" in kernel.asm["ttir"] else "-"


def resource_usage(kernel) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) from the cubin; in these kernels the stack holds only spills."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(item.split(":", 1) for item in usage.split() if item.startswith(("REG:", "STACK:")))
    return int(fields["REG"]), int(fields["STACK"])


def _config_text(launch: Launch, config) -> str:
    values = launch.kwargs if config is None else {**launch.kwargs, **config.all_kwargs()}
    blocks = "x".join(str(values[name]) for name in ("BLOCK_M", "BLOCK_V", "BLOCK_H") if name in values)
    return f"{blocks} w{values.get('num_warps', 4)} s{values.get('num_stages', 3)}" + \
        ("" if config is not None else " (explicit)")


_JOBS: list = []


def _compile_job(index: int) -> dict:
    target, precision, launch, config = _JOBS[index]
    row = dict(target=target.name, kernel=launch.kernel.__name__, path=launch.path, precision=precision,
               config=_config_text(launch, config), error=None)
    dtype, matmul_precision = PRECISIONS[precision]
    torch.set_float32_matmul_precision(matmul_precision)
    kwargs = launch.kwargs if config is None else {**launch.kwargs, **config.all_kwargs()}
    previous_driver = driver._active  # None here: no GPU driver exists on a machine without one
    driver.set_active(_CompileOnlyDriver(target))
    started = time.perf_counter()
    try:
        kernel = launch.kernel.run(*launch.args, grid=None, warmup=True, **kwargs)
    except Exception as error:  # a compile error is a finding, reported with the launch that hit it
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
        return row
    finally:
        driver.set_active(previous_driver)
    registers, stack = resource_usage(kernel)
    row.update(registers=registers, stack=stack, shared=kernel.metadata.shared, limit=target.shared_memory,
               dot=dot_lowering(kernel), seconds=time.perf_counter() - started)
    return row


def failures(row: dict) -> list[str]:
    """Why a compiled launch would fail or be unacceptably slow on its target; empty when it passes."""
    if row["error"]:
        return [f"compile error: {row['error']}"]
    found = []
    if row["shared"] > row["limit"]:
        found.append(f"shared memory {row['shared']} B > {row['limit']} B: the launch raises OutOfResources")
    if (row["target"] == "sm90" and row["kernel"] in WGMMA_KERNELS and row["precision"] in ("fp16", "bf16")
            and row["dot"] != "wgmma"):
        found.append(f"16-bit dot lowered to {row['dot']}, not wgmma")
    return found


def run(targets, full: bool, workers: int, only: str = "") -> list[dict]:
    """Capture and compile every launch for every target; rows in a stable order, launcher errors first."""
    _JOBS.clear()
    rows = []
    for target in targets:
        launches, errors = capture(target, full, only)
        rows += errors
        for precision, launch in launches:
            _JOBS.extend((target, precision, launch, config) for config in launch.configs)
    if workers <= 1:
        return rows + [_compile_job(i) for i in range(len(_JOBS))]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return rows + list(pool.map(_compile_job, range(len(_JOBS)), chunksize=1))


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, failures marked."""
    header = "| target | kernel | launch path | dtype | config | regs | stack B | shared B | dot | status |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        problems = failures(row)
        status = "FAIL: " + "; ".join(problems) if problems else "ok"
        if row["error"]:
            lines.append(f"| {row['target']} | {row['kernel']} | {row['path']} | {row['precision']} | {row['config']}"
                         f" | | | | | {status} |")
            continue
        lines.append(f"| {row['target']} | {row['kernel']} | {row['path']} | {row['precision']} | {row['config']} | "
                     f"{row['registers']} | {row['stack']} | {row['shared']} | {row['dot']} | {status} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ceu_kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true",
                        help="only the training launch paths (no bias, every gradient), every dtype and config")
    parser.add_argument("--targets", default="sm90,sm80", help="comma-separated, from: " + ", ".join(TARGETS))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--paths", default="", help="only the launch paths whose name contains this, e.g. ce_gradients")
    parser.add_argument("--shared-memory", type=int,
                        help="pretend every target has this many bytes of shared memory per block (to test the check)")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if tl_utils.interpreting():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this check compiles")
    targets = [TARGETS[name] for name in args.targets.split(",")]
    if args.shared_memory is not None:
        targets = [Target(t.name, t.capability, args.shared_memory) for t in targets]
    started = time.perf_counter()
    rows = run(targets, full=not args.subset, workers=args.workers, only=args.paths)
    report = table(rows)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
    failed = [row for row in rows if failures(row)]
    print(report if args.output is None else table(failed) if failed else f"table written to {args.output}")
    print(f"compile_check: {len(rows)} launches on {', '.join(t.name for t in targets)} "
          f"({'subset' if args.subset else 'full sweep'}), {len(failed)} failing, "
          f"{time.perf_counter() - started:.0f} s, triton {triton.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
