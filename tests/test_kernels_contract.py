"""ceu_kernels.contract: every backend takes the contract's arguments, and every backend's LMF backward keeps to it on
an argmax outside the vocabulary."""
import pytest
import torch

from ceu_kernels import contract
from helpers import assert_close, device_impls, head_inputs

DEVICE_IMPLS = device_impls()


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


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "write_once"])
def test_lmf_backward_never_dereferences_a_bad_argmax(device, impl, deterministic):
    """Defence in depth: an argmax outside [0, vocab_size) (-1, a padded row, past the weight, huge) handed to the
    backward is never read or written through: its token's dh is NaN, the others' are exact, and dW/db are the rank-1
    value plus the valid tokens' scatter, zero on padded rows."""
    if impl != "triton" and deterministic:
        pytest.skip(f"the {impl} backward has one path")
    vocab_size, n_rows, n_tokens = 12, 16, 7
    hidden, weight, _ = head_inputs(n_tokens, 8, n_rows, torch.float32, device, seed=5)
    argmax = torch.tensor([3, -1, 12, 16, 2**40, 3, 11], device=device)
    valid = (argmax >= 0) & (argmax < vocab_size)
    coef = torch.linspace(-1.0, 1.5, n_tokens, device=device)
    weight_mean = weight[:vocab_size].mean(0)
    backend = contract.load(impl)
    options = {"deterministic": deterministic} if impl == "triton" else {}
    grad_hidden, grad_weight, grad_bias = backend.lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size,
                                                               True, True, True, **options)
    rows = torch.where(valid, argmax, 0)
    assert grad_hidden[~valid].isnan().all()
    assert_close("grad hidden", grad_hidden[valid], (coef[:, None] * (weight[rows] - weight_mean))[valid],
                 torch.float32)
    expected_weight = torch.zeros_like(weight)
    expected_weight[:vocab_size] = (coef[:, None] * hidden).sum(0) / -vocab_size
    expected_weight.index_add_(0, rows[valid], (coef[:, None] * hidden)[valid])
    expected_bias = torch.zeros(n_rows, device=device)
    expected_bias[:vocab_size] = coef.sum() / -vocab_size
    expected_bias.index_add_(0, rows[valid], coef[valid])
    assert_close("grad weight", grad_weight, expected_weight, torch.float32)
    assert_close("grad bias", grad_bias, expected_bias, torch.float32)
