"""``python -m benchmarks cpu|gpu|interleaved|unlearning [--dry-run]``: run a suite, write its outputs, print its Markdown last."""
import argparse
import sys
from pathlib import Path

import torch

from .report import BENCH_DIR
from .run import Suite

GPU_TIME_BUDGET_S = 420  # no new case after this: room for the last case (up to ~1 min at 32768 tokens) and the report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["unlearning"]:  # the methods' comparison has its own options (benchmarks/unlearning.py)
        from .unlearning import main as unlearning

        return unlearning(argv[1:])
    if argv[:1] == ["interleaved"]:  # the CPU speed targets, implementations alternated (benchmarks/interleaved.py)
        from .interleaved import main as interleaved

        return interleaved(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=("cpu", "gpu", "interleaved", "unlearning"))
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes through every code path; writes only under the output folder "
                             "(with gpu and no CUDA device: the GPU command's in-process path on the CPU)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default benchmarks/out)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help=f"seconds after which no new case starts (gpu default {GPU_TIME_BUDGET_S})")
    parser.add_argument("--providers", help="comma-separated subset of providers, e.g. floor,eager-fp32,ceu-torch")
    args = parser.parse_args(argv)
    if args.suite == "gpu" and not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device here: run `python -m benchmarks gpu` on a GPU machine, or add --dry-run",
              file=sys.stderr)
        return 2
    time_budget = args.time_budget if args.time_budget is not None else (
        GPU_TIME_BUDGET_S if args.suite == "gpu" and not args.dry_run else None)
    providers = set(args.providers.split(",")) if args.providers else None
    print(Suite(args.suite, args.dry_run, args.out, time_budget, providers).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
