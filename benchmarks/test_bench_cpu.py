"""pytest-benchmark on small CPU cases: ``pytest benchmarks/test_bench_cpu.py`` (add ``--benchmark-json=...`` to
keep the numbers). Not collected by the default ``pytest`` run, whose testpaths are ``tests/``.

Each case is 256 tokens on the foundation's target head (H 256, V 128256), float32: the same operations as
``python -m benchmarks cpu``, a few rounds each.
"""
import pytest
import torch

from benchmarks.micro import operation
from benchmarks.providers import MODES, PROVIDERS, make_inputs
from benchmarks.shapes import case

CPU = torch.device("cpu")
PROVIDER_NAMES = ("eager-fp32", "ceu-torch")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider_name", PROVIDER_NAMES)
@pytest.mark.parametrize("loss", ("lmf", "ce"))
def test_loss(benchmark, loss, provider_name, mode):
    bench_case = case(loss, "cpu-target", 256, "float32")
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable(bench_case, CPU)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{loss}-{mode}"
    inputs = make_inputs(bench_case, CPU)
    setup, op = operation(mode, provider.build(bench_case, inputs), inputs)
    if setup is None:
        benchmark.pedantic(op, rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(op, setup=lambda: ((setup(),), {}), rounds=5, warmup_rounds=1)


def test_gemm_floor(benchmark):
    bench_case = case("lmf", "cpu-target", 256, "float32")
    benchmark.group = "floor"
    benchmark.pedantic(PROVIDERS["floor"].build(bench_case, make_inputs(bench_case, CPU)), rounds=5,
                       warmup_rounds=1)
