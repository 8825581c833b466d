"""Fused linear cross-entropy backward (after cut-cross-entropy, arXiv 2411.09009): recompute each logits tile,
turn it into ``dlogits = g * (softmax - onehot(label))`` with the saved log-sum-exp, and feed both GEMMs from it.

One program per (token tile, vocab tile): ``dh[rows] += dlogits @ W[cols]`` and ``dW[cols] += dlogits.T @ h[rows]``
by fp32 (fp64 for fp64 inputs) atomic adds into accumulators that are cast once at the end, ``db`` alike. The logits
never reach memory; the summation order of the atomics varies from run to run.
"""
import torch
import triton
import triton.language as tl

from .tl_utils import (accumulator, autotuned, dot_precision, head_logits_tile, offsets64, pipelined_operands_bytes,
                       row_major)

DEFAULT_BLOCKS = (32, 64, 32)
"""(BLOCK_M tokens, BLOCK_V vocab, BLOCK_H hidden) when none is given and autotuning is off (interpreter, fp64)."""
GROUP_M = 8


@triton.jit
def _ce_backward_kernel(hidden, weight, bias, labels, lse, grad, grad_hidden, grad_weight, grad_bias,
                        n_tokens, vocab_size, dim, ignore_index, stride_hidden, stride_weight,
                        HAS_BIAS: tl.constexpr, WRITE_HIDDEN: tl.constexpr, WRITE_WEIGHT: tl.constexpr,
                        WRITE_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_M: tl.constexpr):
    rows, cols, row_ok, col_ok, _, logits = head_logits_tile(
        hidden, weight, bias, n_tokens, vocab_size, dim, stride_hidden, stride_weight, HAS_BIAS, ACC, PRECISION,
        BLOCK_M, BLOCK_V, BLOCK_H, GROUP_M)
    label = tl.load(labels + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (label != ignore_index)
    scale = tl.where(valid, tl.load(grad + rows, mask=valid, other=0.0).to(ACC), 0.0)
    row_lse = tl.load(lse + rows, mask=valid, other=float("inf"))
    probs = tl.where(col_ok[None, :], tl.exp(logits - row_lse[:, None]), 0.0)
    onehot = (cols[None, :] == label[:, None]) & valid[:, None]
    dlogits = (probs - onehot.to(ACC)) * scale[:, None]
    if WRITE_BIAS:
        tl.atomic_add(grad_bias + cols, tl.sum(dlogits, axis=0), mask=col_ok)
    dlogits_in = dlogits.to(hidden.dtype.element_ty)
    hidden_rows = hidden + offsets64(rows, stride_hidden)[:, None]
    weight_rows = weight + offsets64(cols, stride_weight)[:, None]
    grad_hidden_rows = grad_hidden + offsets64(rows, dim)[:, None]
    grad_weight_rows = grad_weight + offsets64(cols, dim)[:, None]
    for k0 in range(0, dim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < dim
        if WRITE_HIDDEN:
            w = tl.load(weight_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            tl.atomic_add(grad_hidden_rows + ks[None, :],
                          tl.dot(dlogits_in, w, input_precision=PRECISION, out_dtype=ACC),
                          mask=row_ok[:, None] & k_ok[None, :])
        if WRITE_WEIGHT:
            h = tl.load(hidden_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            tl.atomic_add(grad_weight_rows + ks[None, :],
                          tl.dot(tl.trans(dlogits_in), h, input_precision=PRECISION, out_dtype=ACC),
                          mask=col_ok[:, None] & k_ok[None, :])


def backward_shared_bytes(config, element_size: int) -> int:
    """The prologue's pipelined logits GEMM plus ``dlogits`` staged twice (as is and transposed) for the two dots."""
    blocks = config.kwargs
    return pipelined_operands_bytes(config, element_size) + 2 * blocks["BLOCK_M"] * blocks["BLOCK_V"] * element_size


_CE_BACKWARD = autotuned(
    _ce_backward_kernel,
    [triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_H": h}, num_warps=w, num_stages=s)
     for m, v, h, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 64, 32, 4, 3),
                           (64, 128, 32, 4, 3), (64, 64, 32, 4, 3)]],
    key=["vocab_size", "dim"], shared_memory=backward_shared_bytes, default_blocks=DEFAULT_BLOCKS,
    reset_to_zero=["grad_hidden", "grad_weight", "grad_bias"])


def ce_gradients(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden,
                 needs_weight, needs_bias, *, blocks=None):
    """The Triton backend's ``ce_backward`` (:class:`ceu_kernels.contract.Backend`): ``(grad_hidden, grad_weight,
    grad_bias)`` of the summed per-token cross-entropy weighted by ``grad``, None where not needed. ``lse`` is the
    forward's log-sum-exp; padded rows (``>= vocab_size``) get zero gradient.

    ``chunk_size`` is the contract's and ignored: the kernel tiles tokens itself. ``blocks``:
    ``(BLOCK_M, BLOCK_V, BLOCK_H)``, each >= 16; default: autotuned on a GPU, ``DEFAULT_BLOCKS`` otherwise.
    """
    hidden, weight, bias = row_major(hidden), row_major(weight), row_major(bias)
    labels, lse, grad = labels.contiguous(), lse.contiguous(), grad.contiguous()
    n_tokens, dim = hidden.shape
    acc_dtype, acc_tl = accumulator(hidden.dtype)
    device = hidden.device
    grad_hidden = torch.zeros(n_tokens, dim, dtype=acc_dtype, device=device) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if needs_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=device) if needs_bias else None
    if n_tokens and (needs_hidden or needs_weight or needs_bias):
        def grid(meta):
            return (triton.cdiv(n_tokens, meta["BLOCK_M"]) * triton.cdiv(vocab_size, meta["BLOCK_V"]),)

        outputs = (lse.new_empty(0) if out is None else out for out in (grad_hidden, grad_weight, grad_bias))
        args = (hidden, weight, hidden if bias is None else bias, labels, lse, grad, *outputs, n_tokens, vocab_size,
                dim, ignore_index, hidden.stride(0), weight.stride(0))
        flags = dict(HAS_BIAS=bias is not None, WRITE_HIDDEN=needs_hidden, WRITE_WEIGHT=needs_weight,
                     WRITE_BIAS=needs_bias, ACC=acc_tl, PRECISION=dot_precision(hidden.dtype), GROUP_M=GROUP_M)
        _CE_BACKWARD.launch(grid, args, flags, _CE_BACKWARD.blocks(blocks, fixed=hidden.dtype == torch.float64),
                            hidden)
    grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
    grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
    return grad_hidden, grad_weight, grad_bias
