"""LMF forward: per-token max and first-index argmax of ``hidden @ weight[:vocab_size].T + bias``, fully fused.

One program per (token tile, vocab tile) runs the GEMM tile in fp32 (fp64 for fp64 inputs) and reduces each row of
it to (max, first argmax) in the epilogue; the logits never reach memory. Vocab tiles are combined exactly and
deterministically, by dtype:

* packed (below fp64): each tile row ``atomic_max``-es a 64-bit word holding the float32 max in its high bits and
  ``2**32 - 1 - index`` in its low bits, so ties keep the lowest index whatever the order of the atomics. Extra
  memory: 8 bytes per token.
* partials (fp64, whose max does not fit in 32 bits): each tile writes its (max, argmax) to a
  ``[n_vocab_tiles, tokens]`` buffer and ``argmax`` over tiles (first tile on ties) picks the winner.
"""
import torch
import triton
import triton.language as tl

from .tl_utils import (INT64_MIN, accumulator, autotuned, dot_precision, head_logits_tile, offsets64,
                       pack_max_index, pipelined_operands_bytes, row_major, row_max_first_index, unpack_max_index)

DEFAULT_BLOCKS = (64, 64, 32)
"""(BLOCK_M tokens, BLOCK_V vocab, BLOCK_H hidden) when none is given and autotuning is off (the interpreter, and
fp64, whose partials buffer is sized by BLOCK_V). 64 token rows: the least a Hopper warpgroup's wgmma takes."""
GROUP_M = 8


@triton.jit
def _lmf_forward_kernel(hidden, weight, bias, packed, partial_max, partial_arg,
                        n_tokens, vocab_size, dim, stride_hidden, stride_weight,
                        HAS_BIAS: tl.constexpr, PACKED: tl.constexpr, ACC: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr, GROUP_M: tl.constexpr):
    rows, cols, row_ok, col_ok, tile_v, logits = head_logits_tile(
        hidden, weight, bias, n_tokens, vocab_size, dim, stride_hidden, stride_weight, HAS_BIAS, ACC, PRECISION,
        BLOCK_M, BLOCK_V, BLOCK_H, GROUP_M)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    tile_max, tile_arg = row_max_first_index(logits, cols)
    if PACKED:
        tl.atomic_max(packed + rows, pack_max_index(tile_max, tile_arg), mask=row_ok)
    else:
        slot = offsets64(tile_v, n_tokens) + rows
        tl.store(partial_max + slot, tile_max, mask=row_ok)
        tl.store(partial_arg + slot, tile_arg, mask=row_ok)


_LMF_FORWARD = autotuned(
    _lmf_forward_kernel,
    [triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_H": h}, num_warps=w, num_stages=s)
     for m, v, h, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                           (128, 128, 32, 8, 4), (64, 128, 32, 4, 4)]],
    key=["vocab_size", "dim"], shared_memory=pipelined_operands_bytes, default_blocks=DEFAULT_BLOCKS,
    restore_value=["packed"])


def lmf_row_stats(hidden, weight, bias, vocab_size, chunk_size=None, *, blocks=None):
    """The Triton backend's ``lmf_forward`` (:class:`ceu_kernels.contract.Backend`): per-token (max, first argmax)
    of the head's logits over the first ``vocab_size`` rows of ``weight``, as float32 (float64 for float64 inputs)
    and int64.

    ``chunk_size`` is the contract's and ignored: the kernel tiles tokens itself. ``blocks``:
    ``(BLOCK_M, BLOCK_V, BLOCK_H)``, each >= 16; default: autotuned on a GPU, ``DEFAULT_BLOCKS`` otherwise.
    """
    hidden, weight, bias = row_major(hidden), row_major(weight), row_major(bias)
    n_tokens, dim = hidden.shape
    acc_dtype, acc_tl = accumulator(hidden.dtype)
    device = hidden.device
    if n_tokens == 0:
        return torch.empty(0, dtype=acc_dtype, device=device), torch.empty(0, dtype=torch.int64, device=device)

    packed = hidden.dtype != torch.float64  # a float64 max does not fit the packed word
    blocks = _LMF_FORWARD.blocks(blocks, fixed=not packed)  # the partials buffer is sized by BLOCK_V
    packed_max = torch.full((n_tokens if packed else 0,), INT64_MIN, dtype=torch.int64, device=device)
    n_vocab_tiles = 0 if packed else triton.cdiv(vocab_size, blocks[1])
    partial_max = torch.empty(n_vocab_tiles, n_tokens, dtype=acc_dtype, device=device)
    partial_arg = torch.empty(n_vocab_tiles, n_tokens, dtype=torch.int32, device=device)

    def grid(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]) * triton.cdiv(vocab_size, meta["BLOCK_V"]),)

    args = (hidden, weight, hidden if bias is None else bias, packed_max, partial_max, partial_arg,
            n_tokens, vocab_size, dim, hidden.stride(0), weight.stride(0))
    flags = dict(HAS_BIAS=bias is not None, PACKED=packed, ACC=acc_tl, PRECISION=dot_precision(hidden.dtype),
                 GROUP_M=GROUP_M)
    _LMF_FORWARD.launch(grid, args, flags, blocks, hidden)

    if packed:
        return unpack_max_index(packed_max)
    best_tile = partial_max.argmax(0, keepdim=True)
    return partial_max.gather(0, best_tile).squeeze(0), partial_arg.gather(0, best_tile).squeeze(0).long()
