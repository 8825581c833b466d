"""Bad input fails early with an error that names the argument."""
import pytest
import torch

import ceu

H, V = 8, 20


def good():
    return {"hidden": torch.randn(2, 5, H), "weight": torch.randn(V, H), "bias": torch.randn(V),
            "mask": torch.ones(2, 5, dtype=torch.bool)}


LMF_CASES = [
    ({"hidden": [[1.0] * H]}, TypeError, "hidden must be a torch.Tensor"),
    ({"hidden": torch.ones(2, H, dtype=torch.int64)}, TypeError, "hidden must be a floating-point"),
    ({"hidden": torch.tensor(1.0)}, ValueError, "hidden must have shape"),
    ({"weight": torch.randn(V, H + 1)}, ValueError, "weight must be [V, H]"),
    ({"weight": torch.randn(V, H, 1)}, ValueError, "weight must have 2 dimension"),
    ({"weight": torch.randn(V, H, dtype=torch.float64)}, TypeError, "weight dtype torch.float64 does not match"),
    ({"weight": torch.randn(V, H, device="meta")}, ValueError, "weight is on meta"),
    ({"weight": torch.randn(0, H)}, ValueError, "empty vocabulary"),
    ({"bias": torch.randn(V + 1)}, ValueError, "bias must be [V]"),
    ({"bias": torch.randn(V, dtype=torch.float16)}, TypeError, "bias dtype"),
    ({"mask": torch.ones(2, 5)}, TypeError, "mask must be a bool tensor"),
    ({"mask": torch.ones(10, dtype=torch.bool)}, ValueError, "mask must have shape"),
    ({"vocab_size": V + 1}, ValueError, "vocab_size must be an int in [1, V = 20]"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be an int"),
    ({"vocab_size": 3.0}, ValueError, "vocab_size must be an int"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"impl": "cutlass"}, ValueError, "impl must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
]


@pytest.mark.parametrize("change,error,message", LMF_CASES, ids=[m for _, _, m in LMF_CASES])
def test_lmf_bad_input(change, error, message):
    args = good() | change
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        ceu.linear_lmf_loss(args.pop("hidden"), args.pop("weight"), args.pop("bias"), **args)


CE_CASES = [
    ({"labels": torch.zeros(2, 5)}, TypeError, "labels must be an int64 or int32"),
    ({"labels": torch.zeros(10, dtype=torch.long)}, ValueError, "labels must have shape"),
    ({"labels": torch.full((2, 5), V, dtype=torch.long)}, ValueError, "labels must lie in"),
    ({"labels": torch.full((2, 5), -1, dtype=torch.long)}, ValueError, "labels must lie in"),
    ({"labels": torch.full((2, 5), 15, dtype=torch.long), "vocab_size": 15}, ValueError, "labels must lie in"),
    ({"weight": torch.randn(V, H - 1)}, ValueError, "weight must be"),
]


@pytest.mark.parametrize("change,error,message", CE_CASES, ids=[m for _, _, m in CE_CASES])
def test_cross_entropy_bad_input(change, error, message):
    args = good() | {"labels": torch.zeros(2, 5, dtype=torch.long)} | change
    del args["mask"]
    with pytest.raises(error, match=message):
        ceu.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("bias"), **args)


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


def test_deprecated_triton_backend_module_still_works():
    import importlib
    import sys

    pytest.importorskip("triton")
    from ceu_kernels import contract

    sys.modules.pop("ceu_kernels.triton_backend", None)
    with pytest.warns(DeprecationWarning, match="contract.load"):
        triton_backend = importlib.import_module("ceu_kernels.triton_backend")
    assert triton_backend.lmf_forward is contract.load("triton").lmf_forward


def test_the_backward_runs_on_the_forwards_backend(monkeypatch):
    """The backend is chosen once, in the public function: the ops only look the name up, and the backward uses the
    name the forward kept, even if the rules that chose it have changed in between."""
    from ceu import backends
    from ceu_kernels import contract

    looked_up = []
    real_load = contract.load
    monkeypatch.setattr("ceu.ops.load", lambda name: looked_up.append(name) or real_load(name))
    chosen = []
    real_choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda *args: chosen.append(args[0]) or real_choose(*args))
    hidden, weight = torch.randn(4, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    loss = ceu.linear_lmf_loss(hidden, weight) + ceu.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=int))
    monkeypatch.setattr(backends, "choose", lambda *args: pytest.fail("the backward chose a backend again"))
    loss.backward()
    assert chosen == ["auto", "auto"] and looked_up == ["torch"] * 4


def test_every_backend_follows_the_contract():
    """Each backend's four functions take the contract's arguments, in its order (extra keyword-only options
    allowed): the registry hands the Triton launchers to the ops as they are, with no renaming adapter."""
    import inspect

    import importlib.util

    from ceu_kernels import contract

    for name in contract.NAMES:
        if name == "triton" and importlib.util.find_spec("triton") is None:
            continue
        backend = contract.load(name)
        for function in ("lmf_forward", "lmf_backward", "ce_forward", "ce_backward"):
            expected = list(inspect.signature(getattr(contract.Backend, function)).parameters)[1:]  # minus self
            parameters = inspect.signature(getattr(backend, function)).parameters.values()
            positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
            assert positional == expected, (name, function)
