"""ceu_kernels.lmf_backward: the Triton LMF gradient launcher (on the CPU through the interpreter when no GPU is
present) against the float64 chunked backward: both dW paths (atomic and write-once), the write-once path's memory,
segments longer than a token block, and only the requested gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import HIDDEN, N_TOKENS, VOCAB, VOCAB_SIZE, assert_close, head, triton_device

DEVICE = triton_device()

from ceu_kernels import chunked  # noqa: E402
from ceu_kernels.contract import stat_dtype  # noqa: E402
from ceu_kernels.lmf_backward import lmf_gradients  # noqa: E402


def lmf_backward_inputs(dtype, n_tokens=N_TOKENS):
    """Coefficients (some zero, as for masked tokens) and argmaxes that crowd a few rows, so some segments are longer
    than a token block and several rows get no token."""
    hidden, weight, _ = head(dtype, n_tokens)
    acc = stat_dtype(dtype)
    generator = torch.Generator().manual_seed(2)
    coef = torch.randn(n_tokens, generator=generator, dtype=torch.float64).to(DEVICE, acc)
    coef[::5] = 0
    argmax = torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=generator)
    argmax[: n_tokens // 2] = 7
    argmax[-3:] = VOCAB_SIZE - 1
    weight_mean = weight[:VOCAB_SIZE].sum(0, dtype=acc) / VOCAB_SIZE
    return coef, argmax.to(DEVICE), hidden, weight, weight_mean


def lmf_reference(inputs, vocab_size=VOCAB_SIZE):
    return chunked.lmf_backward(*[t.double() if t.is_floating_point() else t for t in inputs], vocab_size,
                                True, True, True)


class RecordTensors(TorchDispatchMode):
    """Records the size and dtype of every floating-point tensor an aten op produces while active (the
    interpreter's own byte views of the arguments are left out)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(str(func), t.numel(), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_lmf_backward_write_once_is_repeatable_and_matches_atomic(dtype):
    inputs = lmf_backward_inputs(dtype)
    blocks = (16, 16, 16)
    first = lmf_gradients(*inputs, VOCAB_SIZE, True, True, True, deterministic=True, blocks=blocks)
    second = lmf_gradients(*inputs, VOCAB_SIZE, True, True, True, deterministic=True, blocks=blocks)
    default = lmf_gradients(*inputs, VOCAB_SIZE, True, True, True, deterministic=False, blocks=blocks)
    for name, a, b, c, ref in zip(("hidden", "weight", "bias"), first, second, default, lmf_reference(inputs)):
        assert a.dtype == b.dtype == c.dtype == dtype
        assert torch.equal(a, b), f"grad {name}: write-once run not bitwise repeatable"
        if dtype == torch.float16:
            assert torch.equal(a, c), f"grad {name}: half-precision weights must always take the write-once path"
        assert_close(f"grad {name} (write-once)", a, ref, dtype)
        assert_close(f"grad {name} (deterministic=False)", c, ref, dtype)
    for grads in (first, default):
        assert not grads[1][VOCAB_SIZE:].any() and not grads[2][VOCAB_SIZE:].any(), "padded rows get zero gradient"


@pytest.mark.parametrize("dtype,deterministic", [(torch.float16, False), (torch.float32, True)], ids=str)
def test_write_once_makes_no_float32_weight_sized_tensor(dtype, deterministic):
    """The weight-dtype output is the only ``[V, H]``-sized tensor: no float32 accumulator, no final cast."""
    inputs = lmf_backward_inputs(dtype)
    with RecordTensors() as recorder:
        grads = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True, deterministic=deterministic)
    weight_sized = [(op, tensor_dtype) for op, numel, tensor_dtype in recorder.made if numel >= VOCAB * HIDDEN]
    assert weight_sized and all(tensor_dtype == dtype for _, tensor_dtype in weight_sized), weight_sized
    assert grads[1].dtype == grads[2].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_write_once_sums_one_segment_holding_every_token(dtype):
    """Every token on the last real row: one program walks the whole batch in token blocks; no other row is hit."""
    coef, argmax, hidden, weight, weight_mean = lmf_backward_inputs(dtype, n_tokens=70)
    inputs = (coef, torch.full_like(argmax, VOCAB_SIZE - 1), hidden, weight, weight_mean)
    got = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True, deterministic=True, blocks=(16, 32, 16))
    expected = lmf_reference(inputs)
    assert_close("grad weight", got[1], expected[1], dtype)
    assert_close("grad bias", got[2], expected[2], dtype)
    assert not got[1][VOCAB_SIZE:].any() and not got[2][VOCAB_SIZE:].any(), "padded rows get zero gradient"


def test_deterministic_algorithms_flag_selects_write_once():
    inputs = lmf_backward_inputs(torch.float32)
    explicit = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True, deterministic=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        implied = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert implied[0] is None and torch.equal(explicit[1], implied[1]) and torch.equal(explicit[2], implied[2])


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_lmf_backward_computes_only_requested_grads(needs, deterministic):
    inputs = lmf_backward_inputs(torch.float32)
    got = lmf_gradients(*inputs, VOCAB_SIZE, *needs, deterministic=deterministic)
    expected = chunked.lmf_backward(*inputs, VOCAB_SIZE, *needs)
    for name, g, ref in zip(("hidden", "weight", "bias"), got, expected):
        assert (g is None) == (ref is None)
        if ref is not None:
            assert_close(f"grad {name}", g, ref, torch.float32)
