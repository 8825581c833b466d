"""ceu.backends: which backend ``impl=`` runs (``"auto"``'s rules, deterministic algorithms, float32 precision), the
errors for a backend that cannot run, and the deprecated names kept working."""
import pytest
import torch

import ceu
from helpers import head_inputs

H, V = 8, 20


def good():
    return {"hidden": torch.randn(2, 5, H), "weight": torch.randn(V, H), "bias": torch.randn(V),
            "mask": torch.ones(2, 5, dtype=torch.bool)}


def test_unavailable_backend_says_what_to_use():
    args = good()
    with pytest.raises(RuntimeError, match="impl='cuda' is not available"):
        ceu.linear_lmf_loss(args["hidden"], args["weight"], impl="cuda")


def test_auto_is_the_chunked_path_on_cpu_even_with_the_interpreter(monkeypatch):
    from ceu import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.choose("auto", torch.device("cpu")) == "torch"
    assert backends.choose("torch", torch.device("cpu")) == "torch"


def test_deterministic_algorithms_steer_auto_away_from_atomic_backwards(monkeypatch):
    pytest.importorskip("triton")
    from ceu import backends
    from ceu.train import deterministic_algorithms

    monkeypatch.setattr(backends, "AUTO_ORDER_CUDA", ("triton", "torch"))
    cuda = torch.device("cuda")  # choose only reads the device type: this runs without a GPU
    assert backends.choose("auto", cuda, "ce") == "triton"
    with deterministic_algorithms(True):
        assert backends.choose("auto", cuda, "ce") == "torch"
        assert backends.choose("auto", cuda, "lmf") == "triton"  # its dW is written once, repeatable
        with pytest.raises(RuntimeError, match="cross-entropy backward accumulates with atomic adds"):
            backends.choose("triton", cuda, "ce")
    assert not torch.are_deterministic_algorithms_enabled()


def test_auto_keeps_float32_off_triton_unless_tf32_is_allowed(monkeypatch):
    """A float32 ``tl.dot`` under "highest" precision runs on CUDA cores: auto takes the cuBLAS-based backends."""
    pytest.importorskip("triton")
    from ceu import backends

    monkeypatch.setattr(backends, "AUTO_ORDER_CUDA", ("triton", "torch"))
    cuda = torch.device("cuda")  # choose only reads the device type: this runs without a GPU
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert backends.choose("auto", cuda, "lmf", torch.float32) == "torch"
        assert backends.choose("auto", cuda, "lmf", torch.bfloat16) == "triton"
        assert backends.choose("auto", cuda, "ce", torch.float64) == "triton"
        assert backends.choose("triton", cuda, "lmf", torch.float32) == "triton"  # asked for by name
        torch.set_float32_matmul_precision("high")
        assert backends.choose("auto", cuda, "lmf", torch.float32) == "triton"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_deprecated_names_still_work():
    from ceu import backends, chunked
    from ceu_kernels import chunked as kernels_chunked

    with pytest.warns(DeprecationWarning, match="backends.resolve is deprecated"):
        assert backends.resolve("auto", torch.device("cpu")) is kernels_chunked
    assert chunked.lmf_forward is kernels_chunked.lmf_forward and chunked.stat_dtype(torch.float16) == torch.float32


def test_cpu_tensors_are_refused_with_a_clear_error():
    hidden, weight, _ = head_inputs(4, 8, 16, torch.float32)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="impl='cuda'.*CUDA tensors"):
        ceu.linear_lmf_loss(hidden, weight, impl="cuda")
    with pytest.raises(RuntimeError, match="impl='cuda'.*CUDA tensors"):
        ceu.linear_cross_entropy(hidden, weight, labels, impl="cuda")
