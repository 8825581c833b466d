"""Fused linear cross-entropy forward (after cut-cross-entropy, arXiv 2411.09009): per-token log-sum-exp and target
logit of ``hidden @ weight[:vocab_size].T + bias`` without writing the logits.

The vocabulary is cut into a few contiguous splits. One program per (token tile, split) walks the split's vocab
tiles, running the GEMM tile in fp32 (fp64 for fp64 inputs) and an online log-sum-exp over it, and picks up the
target logit on the way. The per-split (max, sum of exp) pairs (``[n_splits, tokens]``) are merged in a fixed order,
so the result is deterministic.
"""
import torch
import triton
import triton.language as tl

from .tl_utils import (accumulator, autotuned, dot_precision, logits_tile, offsets64, pipelined_operands_bytes,
                       row_major)

DEFAULT_BLOCKS = (32, 64, 32)
"""(BLOCK_M tokens, BLOCK_V vocab, BLOCK_H hidden) when none is given and autotuning is off (interpreter, fp64)."""
SPLIT_ALIGN = 256
"""Autotuned splits start on multiples of this (every tuned BLOCK_V divides it), so no tile straddles two splits."""


@triton.jit
def _ce_forward_kernel(hidden, weight, bias, labels, partial_max, partial_sum, target_logit,
                       n_tokens, vocab_size, dim, split_span, stride_hidden, stride_weight,
                       HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    label = tl.load(labels + rows, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    run_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    target = tl.zeros((BLOCK_M,), dtype=ACC)
    v_start = split * split_span
    v_stop = tl.minimum(v_start + split_span, vocab_size)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_stop
        logits = logits_tile(hidden, weight, rows, cols, row_ok, col_ok, dim, stride_hidden, stride_weight,
                             ACC, BLOCK_H, PRECISION)
        if HAS_BIAS:
            logits += tl.load(bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        target += tl.sum(tl.where(cols[None, :] == label[:, None], logits, 0.0), axis=1)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    slot = offsets64(split, n_tokens) + rows
    tl.store(partial_max + slot, run_max, mask=row_ok)
    tl.store(partial_sum + slot, run_sum, mask=row_ok)
    tl.store(target_logit + rows, target, mask=row_ok & (label >= v_start) & (label < v_stop))


_CE_FORWARD = autotuned(
    _ce_forward_kernel,
    [triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_H": h}, num_warps=w, num_stages=s)
     for m, v, h, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 8, 3),
                           (64, 128, 32, 4, 4)]],
    key=["vocab_size", "dim"], shared_memory=pipelined_operands_bytes, default_blocks=DEFAULT_BLOCKS)


def vocab_splits(n_tokens: int, vocab_size: int, device: torch.device, align: int) -> tuple[int, int]:
    """``(n_splits, split_span)``: enough splits for about two programs per GPU multiprocessor (2 on the CPU),
    each ``split_span`` long, a multiple of ``align``."""
    if device.type == "cuda":
        token_tiles = triton.cdiv(n_tokens, 128)
        wanted = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, token_tiles)
    else:
        wanted = 2
    span = triton.cdiv(triton.cdiv(vocab_size, max(wanted, 1)), align) * align
    return triton.cdiv(vocab_size, span), span


def ce_token_losses(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size=None, *, blocks=None):
    """The Triton backend's ``ce_forward`` (:class:`ceu_kernels.contract.Backend`): per-token cross-entropy (0 where
    ``labels == ignore_index``) and the log-sum-exp, both float32 (float64 for float64 inputs).

    ``chunk_size`` is the contract's and ignored: the kernel tiles tokens itself. ``blocks``:
    ``(BLOCK_M, BLOCK_V, BLOCK_H)``, each >= 16; default: autotuned on a GPU, ``DEFAULT_BLOCKS`` otherwise. The
    vocabulary is cut into :func:`vocab_splits`, on multiples of ``BLOCK_V`` when the blocks are explicit.
    """
    hidden, weight, bias = row_major(hidden), row_major(weight), row_major(bias)
    labels = labels.contiguous()
    n_tokens, dim = hidden.shape
    acc_dtype, acc_tl = accumulator(hidden.dtype)
    device = hidden.device
    if n_tokens == 0:
        empty = torch.empty(0, dtype=acc_dtype, device=device)
        return empty, empty.clone()

    blocks = _CE_FORWARD.blocks(blocks, fixed=hidden.dtype == torch.float64)
    n_splits, span = vocab_splits(n_tokens, vocab_size, device, SPLIT_ALIGN if blocks is None else blocks[1])
    partial_max = torch.empty(n_splits, n_tokens, dtype=acc_dtype, device=device)
    partial_sum = torch.empty_like(partial_max)
    target_logit = torch.zeros(n_tokens, dtype=acc_dtype, device=device)

    def grid(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]), n_splits)

    args = (hidden, weight, hidden if bias is None else bias, labels, partial_max, partial_sum, target_logit,
            n_tokens, vocab_size, dim, span, hidden.stride(0), weight.stride(0))
    flags = dict(HAS_BIAS=bias is not None, ACC=acc_tl, PRECISION=dot_precision(hidden.dtype))
    _CE_FORWARD.launch(grid, args, flags, blocks, hidden)

    top = partial_max.max(0).values
    lse = top + (partial_sum * (partial_max - top).exp()).sum(0).log()
    per_token = torch.where(labels != ignore_index, lse - target_logit, 0.0)
    return per_token, lse
