"""LMF backward: the closed-form gradients from ``coef = dloss/d(max - mean)`` per token, with no GEMM.

``dlogits = coef * (onehot(argmax) - 1/V)`` gives ``dh = coef * (W[a] - w_mean)`` (a row gather),
``dW = scatter_add(rows a, coef * h) - (1/V) 1 (x) sum(coef * h)`` on the real rows, and ``db`` alike.

dW and db take one of two paths, chosen for memory first:

* write-once: tokens are stably sorted by argmax, and one program per (vocab tile, hidden tile) sums each row's
  segment in token order in fp32 (fp64 for fp64), adds the rank-1 value and stores the tile once in the weight's
  dtype. The output is the only ``[V, H]`` tensor, and dW/db are bitwise repeatable by construction. Half-precision
  weights always take it, as does every dtype under ``deterministic=True`` or
  ``torch.use_deterministic_algorithms(True)``.
* atomic: for float32/float64 weights otherwise, where the accumulator is the output itself. Every real row gets the
  rank-1 value, then each token ``atomic_add``-s ``coef * h`` into its argmax row; the summation order within a row
  varies from run to run.

An argmax outside ``[0, vocab_size)`` (the forward never produces one) is never dereferenced: that token's dh row is
NaN, so the fault shows, and it adds nothing to any row of dW/db beyond the rank-1 value.
"""
import torch
import triton
import triton.language as tl

from .tl_utils import accumulator, offsets64, on_device, row_major

DEFAULT_BLOCKS = (32, 64, 64)
"""(BLOCK_M tokens, BLOCK_V vocab rows, BLOCK_H hidden) of the backward kernels."""


@triton.jit
def _grad_hidden_kernel(coef, argmax, weight, weight_mean, grad_hidden, n_tokens, vocab_size, dim, stride_weight,
                        stride_grad, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """``grad_hidden[i] = coef[i] * (weight[argmax[i]] - weight_mean)`` for one (token tile, hidden tile); NaN where
    ``argmax[i]`` is outside ``[0, vocab_size)``, whose row is not read."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < n_tokens
    k_ok = ks < dim
    tile_ok = row_ok[:, None] & k_ok[None, :]
    c = tl.load(coef + rows, mask=row_ok, other=0.0)
    target = tl.load(argmax + rows, mask=row_ok, other=0)
    picked = (target >= 0) & (target < vocab_size)
    target = tl.where(picked, target, 0)
    w = tl.load(weight + offsets64(target, stride_weight)[:, None] + ks[None, :], mask=tile_ok & picked[:, None],
                other=0.0)
    mean = tl.load(weight_mean + ks, mask=k_ok, other=0.0)
    grad = tl.where(picked[:, None], c[:, None] * (w.to(ACC) - mean[None, :]), float("nan"))
    tl.store(grad_hidden + offsets64(rows, stride_grad)[:, None] + ks[None, :],
             grad.to(grad_hidden.dtype.element_ty), mask=tile_ok)


@triton.jit
def _weighted_hidden_sum_kernel(coef, hidden, out, n_tokens, dim, stride_hidden,
                                ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out = sum_i coef[i] * hidden[i]`` over one hidden tile, tokens in a fixed order (repeatable)."""
    ks = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    k_ok = ks < dim
    total = tl.zeros((BLOCK_H,), dtype=ACC)
    for m0 in range(0, n_tokens, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_tokens
        c = tl.load(coef + rows, mask=row_ok, other=0.0)
        h = tl.load(hidden + offsets64(rows, stride_hidden)[:, None] + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        total += tl.sum(c[:, None] * h.to(ACC), axis=0)
    tl.store(out + ks, total, mask=k_ok)


@triton.jit
def _rank_one_kernel(weighted_sum, coef_sum, grad_weight, grad_bias, n_rows, vocab_size, dim, stride_grad,
                     WRITE_WEIGHT: tl.constexpr, WRITE_BIAS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Write ``-(1/V) sum(coef * h)`` (and ``-(1/V) sum(coef)``) to the real rows of a tile, 0 to padded rows."""
    rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    real = rows < vocab_size
    if WRITE_WEIGHT:
        ks = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        k_ok = ks < dim
        mean = -tl.load(weighted_sum + ks, mask=k_ok, other=0.0) / vocab_size
        grad = tl.where(real[:, None], mean[None, :], 0.0)
        tl.store(grad_weight + offsets64(rows, stride_grad)[:, None] + ks[None, :], grad,
                 mask=(rows < n_rows)[:, None] & k_ok[None, :])
    if WRITE_BIAS:
        if tl.program_id(1) == 0:
            mean_b = -tl.load(coef_sum) / vocab_size
            tl.store(grad_bias + rows, tl.where(real, mean_b, 0.0).to(ACC), mask=rows < n_rows)


@triton.jit
def _write_once_kernel(order, argmax_sorted, segment_start, coef, hidden, weighted_sum, coef_sum, grad_weight,
                       grad_bias, n_rows, vocab_size, dim, stride_hidden, stride_grad, WRITE_WEIGHT: tl.constexpr,
                       WRITE_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """One (vocab tile, hidden tile) of dW (and db) whole, stored once in the output dtype: the rank-1 value on the
    real rows plus, on each touched row, the sum of ``coef * h`` over its segment of the argmax-sorted tokens.

    The loop visits only the tile's touched rows and walks each segment in ``BLOCK_M`` chunks in token order, so a
    row holding every token is still one bounded loop. One program owns each output element: no atomics.
    """
    first_row = tl.program_id(0) * BLOCK_V
    rows = first_row + tl.arange(0, BLOCK_V)
    real = rows < vocab_size
    ks = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    k_ok = ks < dim
    if WRITE_WEIGHT:
        rank_one = -tl.load(weighted_sum + ks, mask=k_ok, other=0.0) / vocab_size
        grad = tl.where(real[:, None], rank_one[None, :], 0.0)
    if WRITE_BIAS:
        grad_b = tl.where(real, -tl.load(coef_sum) / vocab_size, 0.0)
    slot = tl.load(segment_start + first_row)
    tile_stop = tl.load(segment_start + tl.minimum(first_row + BLOCK_V, n_rows))
    while slot < tile_stop:
        row = tl.load(argmax_sorted + slot)
        stop = tl.load(segment_start + row + 1)
        total = tl.zeros((BLOCK_H,), dtype=ACC)
        total_c = tl.zeros((BLOCK_M,), dtype=ACC)
        for m0 in range(slot, stop, BLOCK_M):
            slots = m0 + tl.arange(0, BLOCK_M)
            slot_ok = slots < stop
            tokens = tl.load(order + slots, mask=slot_ok, other=0)
            c = tl.load(coef + tokens, mask=slot_ok, other=0.0)
            if WRITE_WEIGHT:
                h = tl.load(hidden + offsets64(tokens, stride_hidden)[:, None] + ks[None, :],
                            mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
                total += tl.sum(c[:, None] * h.to(ACC), axis=0)
            total_c += c
        hit = (rows == row) & real  # a padded row is never an argmax: its tokens are dropped
        if WRITE_WEIGHT:
            grad = tl.where(hit[:, None], grad + total[None, :], grad)
        if WRITE_BIAS:
            grad_b = tl.where(hit, grad_b + tl.sum(total_c, axis=0), grad_b)
        slot = stop
    row_ok = rows < n_rows
    if WRITE_WEIGHT:
        tl.store(grad_weight + offsets64(rows, stride_grad)[:, None] + ks[None, :],
                 grad.to(grad_weight.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])
    if WRITE_BIAS:
        if tl.program_id(1) == 0:
            tl.store(grad_bias + rows, grad_b.to(grad_bias.dtype.element_ty), mask=row_ok)


@triton.jit
def _scatter_kernel(coef, argmax, hidden, grad_weight, grad_bias, n_tokens, vocab_size, dim, stride_hidden,
                    stride_grad, WRITE_WEIGHT: tl.constexpr, WRITE_BIAS: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """``grad_weight[argmax[i]] += coef[i] * hidden[i]`` (and ``grad_bias[argmax[i]] += coef[i]``) by atomics,
    skipping tokens whose argmax is outside ``[0, vocab_size)``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    c = tl.load(coef + rows, mask=row_ok, other=0.0)
    target = tl.load(argmax + rows, mask=row_ok, other=0)
    live = row_ok & (c != 0.0) & (target >= 0) & (target < vocab_size)
    target = tl.where(live, target, 0)
    if WRITE_WEIGHT:
        ks = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        tile_ok = live[:, None] & (ks < dim)[None, :]
        h = tl.load(hidden + offsets64(rows, stride_hidden)[:, None] + ks[None, :], mask=tile_ok, other=0.0)
        tl.atomic_add(grad_weight + offsets64(target, stride_grad)[:, None] + ks[None, :], c[:, None] * h.to(ACC),
                      mask=tile_ok)
    if WRITE_BIAS:
        if tl.program_id(1) == 0:
            tl.atomic_add(grad_bias + target, c, mask=live)


def lmf_gradients(coef, argmax, hidden, weight, weight_mean, vocab_size, needs_hidden, needs_weight, needs_bias,
                  *, deterministic=None, blocks=None):
    """The Triton backend's ``lmf_backward`` (:class:`ceu_kernels.contract.Backend`): ``(grad_hidden, grad_weight,
    grad_bias)``, None where not needed.

    Args:
        coef ``[N]`` (float32, float64 for float64 inputs), argmax ``[N]`` int64, hidden ``[N, H]``,
        weight ``[V, H]``, weight_mean ``[H]`` (the mean of the real rows, in coef's dtype).
        deterministic: bitwise-repeatable dW/db (the write-once path) for every dtype; None follows
            ``torch.are_deterministic_algorithms_enabled()``. Half-precision weights are repeatable regardless.
        blocks: ``(BLOCK_M, BLOCK_V, BLOCK_H)``; default ``DEFAULT_BLOCKS``.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    block_m, block_v, block_h = blocks or DEFAULT_BLOCKS
    hidden, weight = row_major(hidden), row_major(weight)
    coef, argmax, weight_mean = coef.contiguous(), argmax.contiguous(), weight_mean.contiguous()
    n_tokens, dim = hidden.shape
    n_rows = weight.shape[0]
    acc_dtype, acc_tl = accumulator(hidden.dtype)
    coef = coef.to(acc_dtype)
    n_token_tiles, n_hidden_tiles = triton.cdiv(n_tokens, block_m), triton.cdiv(dim, block_h)
    grad_hidden = grad_weight = grad_bias = None
    with on_device(hidden):
        if needs_hidden:
            grad_hidden = torch.empty_like(hidden)
            if n_tokens:
                _grad_hidden_kernel[(n_token_tiles, n_hidden_tiles)](
                    coef, argmax, weight, weight_mean.to(acc_dtype), grad_hidden, n_tokens, vocab_size, dim,
                    weight.stride(0), grad_hidden.stride(0), ACC=acc_tl, BLOCK_M=block_m, BLOCK_H=block_h)
        if not (needs_weight or needs_bias):
            return grad_hidden, None, None

        weighted_sum = torch.zeros(dim if needs_weight else 0, dtype=acc_dtype, device=hidden.device)
        if needs_weight:
            _weighted_hidden_sum_kernel[(n_hidden_tiles,)](
                coef, hidden, weighted_sum, n_tokens, dim, hidden.stride(0), ACC=acc_tl, BLOCK_M=block_m,
                BLOCK_H=block_h)
        coef_sum = coef.sum().reshape(1)
        # The atomic path accumulates in acc_dtype in the output itself: only when that is the weight's dtype.
        out_dtype = weight.dtype
        atomic = not deterministic and out_dtype == acc_dtype
        grad_weight = torch.empty(n_rows, dim, dtype=out_dtype, device=hidden.device) if needs_weight else None
        grad_bias = torch.empty(n_rows, dtype=out_dtype, device=hidden.device) if needs_bias else None
        weight_out = grad_weight if needs_weight else weighted_sum
        bias_out = grad_bias if needs_bias else weighted_sum
        flags = dict(WRITE_WEIGHT=needs_weight, WRITE_BIAS=needs_bias, ACC=acc_tl, BLOCK_H=block_h)
        row_grid = (triton.cdiv(n_rows, block_v), n_hidden_tiles if needs_weight else 1)
        if atomic:
            _rank_one_kernel[row_grid](weighted_sum, coef_sum, weight_out, bias_out, n_rows, vocab_size, dim, dim,
                                       BLOCK_V=block_v, **flags)
            if n_tokens:
                _scatter_kernel[(n_token_tiles, row_grid[1])](
                    coef, argmax, hidden, weight_out, bias_out, n_tokens, vocab_size, dim, hidden.stride(0), dim,
                    BLOCK_M=block_m, **flags)
        else:
            # Segments cover rows [0, n_rows) only: a token whose argmax lies outside is never visited.
            argmax_sorted, order = torch.sort(argmax, stable=True)
            segment_start = torch.searchsorted(argmax_sorted, torch.arange(n_rows + 1, device=argmax.device))
            _write_once_kernel[row_grid](
                order, argmax_sorted, segment_start, coef, hidden, weighted_sum, coef_sum, weight_out, bias_out,
                n_rows, vocab_size, dim, hidden.stride(0), dim, BLOCK_M=block_m, BLOCK_V=block_v, **flags)
    return grad_hidden, grad_weight, grad_bias
