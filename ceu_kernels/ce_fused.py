"""The Triton backend's ``ce_forward_backward``: the chunked loop of :func:`ceu_kernels.chunked.fused_ce_loop` (the
logits and both gradient GEMMs by cuBLAS through torch) with one Triton kernel as its row step.

The row kernel reads a chunk's logits row twice and writes it once: a first sweep keeps an online max and sum of
exponentials (and reads the target logit), a second overwrites the row with ``softmax - onehot(label)`` computed in
float32 (float64 for float64 inputs) and stored in the logits' own dtype, zero at ignored tokens. Unlike the fused
kernels of ``ce_forward``/``ce_backward`` it writes logits, which is why it follows the token-chunk budget
(``chunk_size``) like the torch and CUDA backends.
"""
import triton
import triton.language as tl

from .chunked import fused_ce_loop
from .tl_utils import accumulator, offsets64, on_device

BLOCK_V = 1024
"""Columns per step of each sweep over a row."""
NUM_WARPS = 4
LANE_FLOOR: tl.constexpr = tl.constexpr(-3.0e38)
"""Start of every lane's running max: below every finite float32 logit but not -inf, so that a lane that sees only
-inf (columns past the row's end) never computes ``exp(-inf - -inf)``."""


@triton.jit
def _ce_rows_kernel(logits, labels, loss, lse, stride_row, vocab_size, ignore_index,
                    ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_logits = logits + offsets64(row, stride_row)
    label = tl.load(labels + row)
    valid = label != ignore_index
    # First sweep: per-lane online max and sum of exp(x - max), merged across lanes at the end.
    lane_max = tl.full((BLOCK_V,), LANE_FLOOR, dtype=ACC)
    lane_sum = tl.zeros((BLOCK_V,), dtype=ACC)
    for v0 in range(0, vocab_size, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_logits + cols, mask=cols < vocab_size, other=float("-inf")).to(ACC)
        new_max = tl.maximum(lane_max, x)
        lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    total = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
    row_lse = row_max + tl.log(total)
    target = tl.load(row_logits + tl.where(valid, label, 0)).to(ACC)
    tl.store(lse + row, row_lse)
    tl.store(loss + row, tl.where(valid, row_lse - target, 0.0))
    # Second sweep: the row becomes softmax - onehot(label), zero at an ignored token.
    for v0 in range(0, vocab_size, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size
        x = tl.load(row_logits + cols, mask=col_ok, other=0.0).to(ACC)
        dlogits = tl.exp(x - row_lse) - (cols == label).to(ACC)
        dlogits = tl.where(valid, dlogits, 0.0)
        tl.store(row_logits + cols, dlogits.to(logits.dtype.element_ty), mask=col_ok)


def ce_rows_(logits, labels, ignore_index, loss, lse):
    """Row step of :func:`~ceu_kernels.chunked.fused_ce_loop`: per row of ``logits [rows, V]`` (unit column
    stride), ``loss`` and ``lse`` (statistics dtype) and, in place, ``softmax - onehot(label)`` (zero where
    ``labels == ignore_index``). Returns None: the ignored rows are zeroed here."""
    n_rows, vocab_size = logits.shape
    if n_rows:
        _, acc_tl = accumulator(logits.dtype)
        with on_device(logits):
            _ce_rows_kernel[(n_rows,)](logits, labels, loss, lse, logits.stride(0), vocab_size, ignore_index,
                                       ACC=acc_tl, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return None


def ce_forward_backward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden,
                        needs_weight, needs_bias):
    """The Triton backend's ``ce_forward_backward`` (:class:`ceu_kernels.contract.Backend`): the shared chunk
    loop with :func:`ce_rows_` as its row step."""
    return fused_ce_loop(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden,
                         needs_weight, needs_bias, row_step=ce_rows_, upcast=False)
