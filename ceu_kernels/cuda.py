"""The CUDA C++ backend (``impl="cuda"``): cuBLAS GEMMs through torch, then the fused kernels of ``csrc/``.

The kernels are the compiled extension ``ceu_kernels._C``, built by ``pip install --no-build-isolation -e .`` where
torch has CUDA and ``nvcc`` and ``ninja`` are present. An install without it can compile the same sources on first use:
call :func:`build_jit` or set ``CEU_CUDA_JIT=1`` (needs a source checkout, ``nvcc`` and ``ninja``).

The five backend functions follow :class:`ceu_kernels.contract.Backend`. The LMF forward and the cross-entropy forward
run one GEMM per token chunk into a buffer reused across chunks and bounded by :func:`~ceu_kernels.contract.chunk_rows`
(or ``chunk_size`` tokens), then one kernel reads the chunk once. The cross-entropy with gradients in the forward is
the torch backend's chunk loop (:func:`ceu_kernels.chunked.fused_ce_loop`) with one kernel as its row step
(:func:`ce_rows_`). The cross-entropy backward tiles tokens x vocabulary under the same bound, all tokens per tile when
a wide enough vocabulary slice fits, so each slice of ``dW`` is written by one GEMM instead of being re-read and
re-written once per token chunk. A half-precision gradient summed over several tiles accumulates in float32 inside
cuBLAS through ``torch.mm``/``torch.addmm(..., out_dtype=torch.float32)`` (present in torch 2.11).
"""
import importlib
import os
from pathlib import Path

import torch

from .chunked import fused_ce_loop, gemm_into
from .contract import chunk_rows, stat_dtype

BUILD_HINT = ("build it where torch has CUDA and nvcc and ninja are installed, with "
              "`pip install --no-build-isolation -e .` in the source checkout, or compile it on first use with "
              "CEU_CUDA_JIT=1 (or ceu_kernels.cuda.build_jit())")
SOURCES = Path(__file__).resolve().parent.parent / "csrc"
GEMM_TILE = 128
"""Default chunks are whole multiples of cuBLAS's row tile: 261 rows would run three 128-row tiles for 2.04 of work."""
MIN_VOCAB_TILE = 256
"""Narrowest vocabulary slice of a cross-entropy backward tile, so that its GEMMs stay efficient."""

_extension = None


def build_jit(verbose: bool = False):
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load`` (cached by torch) and use it from now on."""
    global _extension
    from torch.utils.cpp_extension import load

    sources = sorted(map(str, SOURCES.glob("*.cu"))) + sorted(map(str, SOURCES.glob("*.cpp")))
    if not sources:
        raise RuntimeError(f"no CUDA sources under {SOURCES}: the JIT build needs a source checkout of ceu")
    flags = ["-O3", "-std=c++17"]
    _extension = load(name="ceu_kernels_C", sources=sources, extra_cflags=flags, extra_cuda_cflags=flags,
                      verbose=verbose)
    return _extension


def kernels():
    """The compiled kernels: ``ceu_kernels._C``, else the JIT build when ``CEU_CUDA_JIT=1``; RuntimeError otherwise."""
    global _extension
    if _extension is None:
        try:
            _extension = importlib.import_module("ceu_kernels._C")
        except ImportError as error:
            if os.environ.get("CEU_CUDA_JIT") == "1":
                return build_jit()
            message = f"the CUDA extension ceu_kernels._C cannot be imported ({error}); {BUILD_HINT}"
            raise RuntimeError(message) from error
    return _extension


def _token_rows(chunk_size, n_tokens, vocab_size, bytes_per_logit, weight):
    rows = chunk_rows(chunk_size, vocab_size, bytes_per_logit, weight)
    if chunk_size is None and rows > GEMM_TILE:
        rows -= rows % GEMM_TILE
    return min(rows, max(n_tokens, 1))


def _backward_tiles(chunk_size, n_tokens, vocab_size, bytes_per_logit, weight):
    """(token rows, vocabulary columns) of a cross-entropy backward tile holding as many logits as a forward chunk."""
    budget = chunk_rows(chunk_size, vocab_size, bytes_per_logit, weight) * vocab_size
    cols = max(MIN_VOCAB_TILE, budget // max(n_tokens, 1))
    if cols < vocab_size:
        cols -= cols % GEMM_TILE
    else:
        cols = vocab_size
    rows = min(max(n_tokens, 1), max(1, budget // cols))
    return rows, cols


def _logits_into(out, hidden, weight_t, bias):
    """``out = hidden @ weight_t (+ bias)``: one cuBLAS call, the bias fused into it and rounded once."""
    if bias is None:
        return torch.mm(hidden, weight_t, out=out)
    return torch.addmm(bias, hidden, weight_t, out=out)


def lmf_forward(hidden, weight, bias, vocab_size, chunk_size):
    """Per-token max and first-index argmax of ``hidden @ weight[:vocab_size].T + bias``."""
    ops = kernels()
    n_tokens = hidden.shape[0]
    weight_t = weight[:vocab_size].t()
    bias = None if bias is None else bias[:vocab_size]
    rows = _token_rows(chunk_size, n_tokens, vocab_size, hidden.element_size(), weight)
    buffer = hidden.new_empty(rows, vocab_size)
    row_max = hidden.new_empty(n_tokens, dtype=stat_dtype(hidden.dtype))
    argmax = hidden.new_empty(n_tokens, dtype=torch.int64)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        logits = _logits_into(buffer[: stop - start], hidden[start:stop], weight_t, bias)
        ops.lmf_reduce(logits, row_max[start:stop], argmax[start:stop])
    return row_max, argmax


def lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size, needs_hidden, needs_weight, needs_bias):
    """Closed-form LMF gradients from ``coef = dloss/d(max - mean)`` per token (see the contract).

    ``dW`` accumulates in the math dtype only on the rows some token picked: each picked row gets a compact slot.
    """
    ops = kernels()
    n_tokens, hidden_size = hidden.shape
    # The forward only gives real rows; any other index becomes -1, which the kernels skip (and give a NaN dh row),
    # and is never used to index here: a device-side assert would end the CUDA context as surely as a bad access.
    real = (argmax >= 0) & (argmax < vocab_size)
    argmax = torch.where(real, argmax, -1)
    grad_hidden = grad_weight = grad_bias = None
    if needs_hidden:
        grad_hidden = hidden.new_empty(n_tokens, hidden_size)
        ops.lmf_grad_hidden(coef, argmax, weight.contiguous(), weight_mean, grad_hidden)
    if needs_weight:
        # A skipped token marks row 0 picked: an empty slot, and no more slots than tokens.
        picked = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        picked.index_fill_(0, argmax.clamp_min(0), True)
        slot = torch.where(picked, picked.cumsum(0) - 1, -1)
        acc = coef.new_zeros(min(n_tokens, weight.shape[0]), hidden_size)
        column_sum = coef.new_zeros(hidden_size)
        ops.lmf_scatter(coef, argmax, slot, hidden.contiguous(), acc, column_sum)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        ops.lmf_grad_weight(acc, slot, column_sum, vocab_size, grad_weight)
    if needs_bias:
        grad_bias = coef.new_zeros(weight.shape[0]).index_add_(0, argmax.clamp_min(0), torch.where(real, coef, 0.0))
        grad_bias[:vocab_size] -= coef.sum() / vocab_size
        grad_bias = grad_bias.to(weight.dtype)
    return grad_hidden, grad_weight, grad_bias


def ce_forward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size):
    """Per-token cross-entropy (0 where ``labels == ignore_index``) and the log-sum-exp the backward reuses."""
    ops = kernels()
    n_tokens = hidden.shape[0]
    weight_t = weight[:vocab_size].t()
    bias = None if bias is None else bias[:vocab_size]
    labels = labels.to(torch.int64).contiguous()
    rows = _token_rows(chunk_size, n_tokens, vocab_size, hidden.element_size(), weight)
    buffer = hidden.new_empty(rows, vocab_size)
    loss = hidden.new_empty(n_tokens, dtype=stat_dtype(hidden.dtype))
    lse = torch.empty_like(loss)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        logits = _logits_into(buffer[: stop - start], hidden[start:stop], weight_t, bias)
        ops.ce_reduce(logits, labels[start:stop], ignore_index, loss[start:stop], lse[start:stop])
    return loss, lse


def ce_backward(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size,
                needs_hidden, needs_weight, needs_bias):
    """Per tile: recompute the logits, rewrite them in place into ``grad * (softmax - onehot)``, run the two GEMMs.

    A gradient summed over several tiles accumulates in cuBLAS in the math dtype (float32 for half inputs) and is
    cast once; one summed over a single tile is written directly.
    """
    ops = kernels()
    n_tokens, hidden_size = hidden.shape
    acc = stat_dtype(hidden.dtype)
    weight_real = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size]
    labels = labels.to(torch.int64).contiguous()
    token_grad = torch.where(labels != ignore_index, grad, 0.0).to(acc).contiguous()
    rows, cols = _backward_tiles(chunk_size, n_tokens, vocab_size, hidden.element_size(), weight)
    # A float32 twin only for a gradient that sums over several tiles in a half dtype.
    several_token_tiles = n_tokens > rows and hidden.dtype != acc
    several_vocab_tiles = vocab_size > cols and hidden.dtype != acc
    buffer = hidden.new_empty(rows * cols)

    grad_hidden = grad_weight = grad_bias = hidden_acc = weight_acc = None
    if needs_hidden:
        grad_hidden = hidden.new_empty(n_tokens, hidden_size)
        hidden_acc = grad_hidden.new_empty(n_tokens, hidden_size, dtype=acc) if several_vocab_tiles else grad_hidden
    if needs_weight:
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        real_rows = grad_weight[:vocab_size]
        weight_acc = real_rows.new_empty(vocab_size, hidden_size, dtype=acc) if several_token_tiles else real_rows
    if needs_bias:
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)

    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        hidden_tile = hidden[start:stop]
        for first in range(0, vocab_size, cols):
            last = min(first + cols, vocab_size)
            logits = buffer[: (stop - start) * (last - first)].view(stop - start, last - first)
            _logits_into(logits, hidden_tile, weight_real[first:last].t(), None if bias is None else bias[first:last])
            ops.ce_grad_(logits, labels[start:stop], first, lse[start:stop], token_grad[start:stop])
            if needs_hidden:
                gemm_into(hidden_acc[start:stop], logits, weight_real[first:last], accumulate=first > 0)
            if needs_weight:
                gemm_into(weight_acc[first:last], logits.t(), hidden_tile, accumulate=start > 0)
            if needs_bias:
                grad_bias[first:last] += logits.sum(0, dtype=acc)

    if needs_hidden and hidden_acc is not grad_hidden:
        grad_hidden.copy_(hidden_acc)
    if needs_weight and weight_acc is not real_rows:
        real_rows.copy_(weight_acc)
    if needs_bias:
        grad_bias = grad_bias.to(weight.dtype)
    return grad_hidden, grad_weight, grad_bias


def ce_rows_(logits, labels, ignore_index, loss, lse):
    """Row step of :func:`~ceu_kernels.chunked.fused_ce_loop`: one kernel per chunk writes ``loss`` and ``lse``
    and rewrites the logits in place into ``softmax - onehot(label)``, zero at ignored tokens (so it returns
    None)."""
    kernels().ce_fused_grad_(logits, labels, ignore_index, loss, lse)
    return None


def ce_forward_backward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden,
                        needs_weight, needs_bias):
    """``ce_forward`` and the gradients of the summed per-token losses from the same logits: cuBLAS GEMMs
    through torch and the :func:`ce_rows_` kernel between them (see :class:`ceu_kernels.contract.Backend`)."""
    return fused_ce_loop(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden,
                         needs_weight, needs_bias, row_step=ce_rows_, upcast=False)
