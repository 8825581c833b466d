"""ceu_kernels.cuda, the CUDA C++ backend (impl="cuda"): loader errors, its host-side chunk and tile loops, its kernels.

On CPU the compiled kernels are replaced by ``TorchKernels``, their pure-PyTorch twins, so the chunking, tiling and
accumulation logic of ``ceu_kernels.cuda`` is checked against ``ceu_kernels.chunked`` without a GPU. Where CUDA and the
built extension are present, each kernel is checked against its twin (``impl="cuda"`` end to end against the float64
reference is in test_lmf.py and test_cross_entropy.py).
"""
import importlib

import pytest
import torch

from ceu import backends
from ceu_kernels import chunked, cuda
from ceu_kernels.contract import chunk_rows, stat_dtype
from helpers import DTYPES, assert_close, cuda_kernels, head_inputs


class TorchKernels:
    """The ops of ``ceu_kernels._C``, same arguments and in-place outputs, written with torch."""

    @staticmethod
    def lmf_reduce(logits, row_max, argmax, row_sum=None):
        values = logits.to(row_max.dtype)
        found = values.max(dim=1)
        row_max.copy_(found.values)
        argmax.copy_(found.indices)
        if row_sum is not None:
            row_sum.copy_(values.sum(1))

    @staticmethod
    def lmf_grad_hidden(coef, argmax, weight, weight_mean, grad_hidden):
        grad_hidden.copy_(coef[:, None] * (weight[argmax].to(coef.dtype) - weight_mean))

    @staticmethod
    def lmf_scatter(coef, argmax, slot, hidden, acc, column_sum):
        contributions = coef[:, None] * hidden.to(coef.dtype)
        acc.index_add_(0, slot[argmax], contributions)
        column_sum += contributions.sum(0)

    @staticmethod
    def lmf_grad_weight(acc, slot, column_sum, vocab_size, grad_weight):
        values = torch.zeros(grad_weight.shape, dtype=acc.dtype, device=acc.device)
        values[:vocab_size] = -column_sum / vocab_size
        picked = slot >= 0
        values[picked] += acc[slot[picked]]
        grad_weight.copy_(values)

    @staticmethod
    def ce_reduce(logits, labels, ignore_index, loss, lse):
        values = logits.to(lse.dtype)
        lse.copy_(values.logsumexp(1))
        valid = labels != ignore_index
        target = values.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
        loss.copy_(torch.where(valid, lse - target, 0.0))

    @staticmethod
    def ce_grad_(logits, labels, column_offset, lse, token_grad):
        columns = torch.arange(logits.shape[1], device=logits.device) + column_offset
        probability = (logits.to(lse.dtype) - lse[:, None]).exp()
        onehot = (labels[:, None] == columns).to(lse.dtype)
        logits.copy_(token_grad[:, None] * (probability - onehot))

    @staticmethod
    def ce_fused_grad_(logits, labels, ignore_index, loss, lse):
        TorchKernels.ce_reduce(logits, labels, ignore_index, loss, lse)
        TorchKernels.ce_grad_(logits, labels, 0, lse, (labels != ignore_index).to(lse.dtype))


ON_GPU = cuda_kernels() is not None
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and the built extension ceu_kernels._C")


@pytest.fixture
def torch_kernels(monkeypatch):
    monkeypatch.setattr(cuda, "_extension", TorchKernels)


@pytest.fixture
def missing_extension(monkeypatch):
    """ceu_kernels._C fails to import, as on an install without the CUDA build."""
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "ceu_kernels._C":
            raise ImportError("No module named 'ceu_kernels._C'")
        return real_import(name, *args)

    monkeypatch.setattr(cuda, "_extension", None)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.delenv("CEU_CUDA_JIT", raising=False)


# --- dispatch and loader (CPU) ---

def test_missing_extension_error_says_how_to_build(missing_extension):
    with pytest.raises(RuntimeError, match="ceu_kernels._C") as error:
        backends.choose("cuda", torch.device("cuda"))
    message = str(error.value)
    assert "pip install --no-build-isolation -e ." in message and "CEU_CUDA_JIT=1" in message
    assert "impl='torch'" in message


def test_jit_build_only_when_asked(missing_extension, monkeypatch):
    built = object()
    monkeypatch.setattr(cuda, "build_jit", lambda: built)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        cuda.kernels()
    monkeypatch.setenv("CEU_CUDA_JIT", "1")
    assert cuda.kernels() is built


def test_jit_build_needs_the_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "SOURCES", tmp_path)
    with pytest.raises(RuntimeError, match="source checkout"):
        cuda.build_jit()


# --- host-side loops against ceu_kernels.chunked, kernels replaced by their torch twins (CPU) ---

# (tokens, H, V, vocab_size): ragged everywhere, a padded vocabulary, and an empty batch.
HOST_SHAPES = [(37, 20, 300, 290), (5, 8, 40, None), (0, 8, 40, 33)]
CHUNK_SIZES = [None, 1, 4, 1000]


def assert_same_outputs(names, got, expected, dtype) -> None:
    """The CUDA host loop's outputs against the chunked backend's: the same ones absent, dtypes, shapes and values."""
    assert len(got) == len(expected) == len(names)
    for name, got_value, expected_value in zip(names, got, expected):
        assert (got_value is None) == (expected_value is None), name
        if expected_value is not None:
            assert got_value.dtype == expected_value.dtype and got_value.shape == expected_value.shape, name
            assert_close(name, got_value, expected_value, dtype)


@pytest.mark.parametrize("shape", HOST_SHAPES, ids=str)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_lmf_host_loop_matches_chunked(torch_kernels, shape, chunk_size, dtype, with_bias):
    n_tokens, hidden_size, vocab, vocab_size = shape
    vocab_size = vocab_size or vocab
    hidden, weight, bias = head_inputs(n_tokens, hidden_size, vocab, dtype, bias=with_bias)
    got = cuda.lmf_forward(hidden, weight, bias, vocab_size, chunk_size)
    expected = chunked.lmf_forward(hidden, weight, bias, vocab_size, chunk_size)
    assert_close("max", got[0], expected[0], dtype)
    assert torch.equal(got[1], expected[1])

    coef = torch.randn(n_tokens, generator=torch.Generator().manual_seed(2), dtype=dtype)
    coef[::3] = 0  # masked tokens
    weight_mean = weight[:vocab_size].mean(0)
    args = (coef, expected[1], hidden, weight, weight_mean, vocab_size, True, True, with_bias)
    assert_same_outputs(("grad hidden", "grad weight", "grad bias"), cuda.lmf_backward(*args),
                        chunked.lmf_backward(*args), dtype)


@pytest.mark.parametrize("shape", HOST_SHAPES, ids=str)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_cross_entropy_host_loop_matches_chunked(torch_kernels, shape, chunk_size, dtype, with_bias):
    n_tokens, hidden_size, vocab, vocab_size = shape
    vocab_size = vocab_size or vocab
    hidden, weight, bias = head_inputs(n_tokens, hidden_size, vocab, dtype, bias=with_bias)
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, vocab_size, (n_tokens,), generator=generator)
    labels[::4] = -100
    got = cuda.ce_forward(hidden, weight, bias, labels, vocab_size, -100, chunk_size)
    expected = chunked.ce_forward(hidden, weight, bias, labels, vocab_size, -100, chunk_size)
    for name, got_value, expected_value in zip(("loss", "lse"), got, expected):
        assert_close(name, got_value, expected_value, dtype)

    grad = torch.rand(n_tokens, generator=generator, dtype=dtype) + 0.5
    for needs in [(True, True, with_bias), (False, True, False), (True, False, False)]:
        args = (grad, expected[1], hidden, weight, bias, labels, vocab_size, -100, chunk_size, *needs)
        assert_same_outputs(("grad hidden", "grad weight", "grad bias"), cuda.ce_backward(*args),
                            chunked.ce_backward(*args), dtype)


@pytest.mark.parametrize("shape", HOST_SHAPES, ids=str)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_cross_entropy_gradients_in_the_forward_match_chunked(torch_kernels, shape, chunk_size, dtype, with_bias):
    """cuda.ce_forward_backward: the shared chunk loop with the CUDA row step (its twin here) gives the torch
    backend's loss, log-sum-exp and gradients; ignored rows are zeroed by the row step (no row scale)."""
    n_tokens, hidden_size, vocab, vocab_size = shape
    vocab_size = vocab_size or vocab
    hidden, weight, bias = head_inputs(n_tokens, hidden_size, vocab, dtype, bias=with_bias)
    labels = torch.randint(0, vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(4))
    labels[::4] = 7
    for needs in [(True, True, with_bias), (False, True, False), (True, False, False)]:
        args = (hidden, weight, bias, labels, vocab_size, 7, chunk_size, *needs)
        assert_same_outputs(("loss", "lse", "grad hidden", "grad weight", "grad bias"),
                            cuda.ce_forward_backward(*args), chunked.ce_forward_backward(*args), dtype)


def test_backward_tiles_stay_within_the_chunk_budget():
    """Every tile holds at most as many logits as a forward chunk, and all tokens at once where that is possible."""
    for chunk_size, n_tokens, vocab_size in [(None, 8192, 128256), (4, 37, 290), (1, 5, 40), (None, 10**6, 50000)]:
        weight = torch.empty(vocab_size, 4096, dtype=torch.float16, device="meta")
        rows, cols = cuda._backward_tiles(chunk_size, n_tokens, vocab_size, 2, weight)
        budget = chunk_rows(chunk_size, vocab_size, 2, weight) * vocab_size
        assert rows * cols <= max(budget, cuda.MIN_VOCAB_TILE) and 1 <= cols <= vocab_size and 1 <= rows <= n_tokens
    assert cuda._backward_tiles(None, 8192, 128256, 2, torch.empty(128256, 4096, device="meta"))[0] == 8192


# --- the kernels against their twins (GPU) ---

def unaligned(tensor, shift):
    """The same values in a view whose rows start ``shift`` elements past a 16-byte boundary."""
    storage = tensor.new_empty(tensor.numel() + shift)
    view = storage[shift:].view(tensor.shape)
    return view.copy_(tensor)


def logits_with_ties(rows, cols, dtype, seed=0):
    """Random logits whose rows plant the hard cases: exact ties, constant rows, NaN, -inf, a max in the tail."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=generator).to(dtype)
    logits[0, sorted({min(3, cols - 1), cols // 2, cols - 1})] = 9  # a three-way tie: the first index wins
    logits[1] = 1.5
    logits[2, cols - 1] = 12
    logits[3, sorted({cols // 3, min(cols // 3 + 1, cols - 1)})] = float("nan")
    logits[4] = float("-inf")
    return logits


@needs_gpu
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("cols", [1, 2, 7, 300, 5003, 40000])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_row_reductions_match_twins(dtype, cols, shift):
    rows = 9
    logits = unaligned(logits_with_ties(rows, cols, dtype).cuda(), shift)
    acc = stat_dtype(dtype)
    outputs = {}
    for name, ops in (("kernel", cuda.kernels()), ("twin", TorchKernels)):
        row_max, row_sum = logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)
        argmax = logits.new_empty(rows, dtype=torch.int64)
        ops.lmf_reduce(logits, row_max, argmax, row_sum)
        outputs[name] = (row_max, argmax, row_sum)
    kernel, twin = outputs["kernel"], outputs["twin"]
    assert_close("max", kernel[0], twin[0], acc, equal_nan=True)
    assert kernel[1].tolist() == twin[1].tolist()
    finite = twin[2].isfinite()
    assert_close("sum", kernel[2][finite], twin[2][finite], acc)

    labels = torch.randint(0, cols, (rows,), device="cuda")
    labels[1] = -100
    grad = torch.rand(rows, device="cuda", dtype=acc)
    finite_rows = torch.tensor([r for r in range(rows) if r not in (3, 4)], device="cuda")
    results = {}
    for name, ops in (("kernel", cuda.kernels()), ("twin", TorchKernels)):
        loss, lse = logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)
        ops.ce_reduce(logits, labels, -100, loss, lse)
        dlogits = unaligned(logits, shift)
        ops.ce_grad_(dlogits, labels, 5, lse, grad)
        results[name] = (loss, lse, dlogits)
    for name, got, expected in zip(("loss", "lse", "dlogits"), results["kernel"], results["twin"]):
        assert_close(name, got[finite_rows], expected[finite_rows], got.dtype)
    assert results["kernel"][1][4] == float("-inf") and results["kernel"][1][3].isnan()


@needs_gpu
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("cols", [1, 7, 300, 5003, 40000])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_fused_row_kernel_matches_twin(dtype, cols, shift):
    """ce_fused_grad_ (the row step of the gradients formed in the forward) against its twin, on the hard rows and
    unaligned rows; ignored rows come back zero, the NaN row NaN."""
    rows = 9
    labels = torch.randint(0, cols, (rows,), device="cuda")
    labels[1], labels[6] = -100, cols - 1
    acc = stat_dtype(dtype)
    results = {}
    for name, ops in (("kernel", cuda.kernels()), ("twin", TorchKernels)):
        logits = unaligned(logits_with_ties(rows, cols, dtype).cuda(), shift)
        loss, lse = logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)
        ops.ce_fused_grad_(logits, labels, -100, loss, lse)
        results[name] = (loss, lse, logits)
    finite_rows = torch.tensor([r for r in range(rows) if r not in (3, 4)], device="cuda")
    for name, got, expected in zip(("loss", "lse", "dlogits"), results["kernel"], results["twin"]):
        assert_close(name, got[finite_rows], expected[finite_rows], got.dtype)
    loss, lse, dlogits = results["kernel"]
    assert not dlogits[1].any() and loss[1] == 0 and lse[3].isnan() and dlogits[3].isnan().all()


@needs_gpu
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("hidden_size", [13, 64, 4096])
def test_lmf_backward_kernels_match_twins(dtype, hidden_size):
    n_tokens, vocab, vocab_size = 300, 1000, 990
    hidden, weight, _ = head_inputs(n_tokens, hidden_size, vocab, dtype, "cuda")
    acc = stat_dtype(dtype)
    argmax = torch.randint(0, 40, (n_tokens,), device="cuda")  # many tokens share a row
    coef = torch.randn(n_tokens, device="cuda", dtype=acc)
    coef[::5] = 0
    weight_mean = weight[:vocab_size].to(acc).mean(0)
    picked = torch.zeros(vocab, dtype=torch.bool, device="cuda").index_fill_(0, argmax, True)
    slot = torch.where(picked, picked.cumsum(0) - 1, -1)
    results = {}
    for name, ops in (("kernel", cuda.kernels()), ("twin", TorchKernels)):
        grad_hidden = torch.empty_like(hidden)
        ops.lmf_grad_hidden(coef, argmax, weight, weight_mean, grad_hidden)
        scatter = coef.new_zeros(n_tokens, hidden_size)
        column_sum = coef.new_zeros(hidden_size)
        ops.lmf_scatter(coef, argmax, slot, hidden, scatter, column_sum)
        grad_weight = torch.empty_like(weight)
        ops.lmf_grad_weight(scatter, slot, column_sum, vocab_size, grad_weight)
        results[name] = (grad_hidden, scatter, column_sum, grad_weight)
    for name, got, expected in zip(("grad hidden", "scatter", "column sum", "grad weight"), results["kernel"],
                                   results["twin"]):
        assert_close(name, got, expected, got.dtype)


