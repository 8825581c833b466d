"""Benchmarks of ceu's fused LM-head losses against eager PyTorch, ``torch.compile``, the peers (Liger-Kernel,
cut-cross-entropy) and the GEMM floor, plus one end-to-end PDU unlearning step.

    python -m benchmarks cpu              # here, about 45 minutes; updates the CPU section of benchmarks/RESULTS.md
    python -m benchmarks gpu              # on a CUDA machine, inside 10 minutes; the GPU section
    python -m benchmarks cpu --dry-run    # tiny shapes, every code path, writes only under benchmarks/out/
    pytest benchmarks/test_bench_cpu.py   # pytest-benchmark on small CPU cases (not part of `make test`)

Outputs go to ``benchmarks/out/`` (git-ignored): ``<suite>.csv``, ``<suite>-e2e.csv``, ``<suite>.md`` and
``plots/``; the headline plots are also copied to ``benchmarks/plots/`` for RESULTS.md.
"""
