"""Helpers shared by the Triton kernels: the logits-tile GEMM, tile scheduling, first-index max, 64-bit offsets,
and the launch side (:class:`GemmKernel`, one launch path for every GEMM kernel: explicit blocks or autotuned,
interpreter-aware; dot precision, accumulator dtype, row-major inputs)."""
import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .contract import interpreting, stat_dtype

INT64_MIN = -(2**63)
"""Initial value of a packed (max, index) word: below every real packed key."""


@dataclass(frozen=True)
class GemmKernel:
    """A kernel whose tiles are the constexprs ``BLOCK_M`` (tokens), ``BLOCK_V`` (vocabulary), ``BLOCK_H`` (hidden),
    with its autotuned twin (None under the interpreter, where autotune fails) and the blocks used without it.
    Every launcher runs its GEMM kernel through :meth:`launch`."""

    kernel: triton.JITFunction
    tuned: object
    default_blocks: tuple[int, int, int]

    def blocks(self, blocks: tuple[int, int, int] | None, fixed: bool = False) -> tuple[int, int, int] | None:
        """The blocks a launch will use, None for autotuned: ``blocks`` when given, else ``default_blocks`` when
        there is no autotuning (the interpreter) or the launch is ``fixed`` (its buffers are sized by the blocks, or
        its dtype is not tuned), else None."""
        if blocks is None and (fixed or self.tuned is None):
            return self.default_blocks
        return blocks

    def launch(self, grid, args: tuple, flags: dict, blocks: tuple[int, int, int] | None, device_of: torch.Tensor):
        """Run the kernel on ``device_of``'s device over ``grid(meta)``: with explicit ``blocks``, or autotuned."""
        with on_device(device_of):
            if blocks is None:
                self.tuned[grid](*args, **flags)
            else:
                block_m, block_v, block_h = blocks
                self.kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h)


def row_major(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` with unit stride along its last dimension (copied only if needed), the kernels' one layout rule."""
    return tensor if tensor is None or tensor.stride(-1) == 1 else tensor.contiguous()


def autotuned(kernel, configs, key, shared_memory, default_blocks, **options) -> GemmKernel:
    """``kernel`` with a ``triton.autotune`` twin on a GPU, and none under the interpreter, where autotune fails.

    ``shared_memory(config, element_size)`` bounds a config's shared memory from above; the autotuner only tries the
    configs that fit the launch device (a config that does not would be timed as infinitely slow or, when none fits,
    make the launch raise), and the configs are chosen so that one fits every dtype on an A100 or an H100.
    """
    if interpreting():
        return GemmKernel(kernel, None, default_blocks)

    def fitting(configs, named_args, **_):
        limit = shared_memory_limit(named_args["hidden"].device)
        element_size = named_args["hidden"].element_size()
        fits = [config for config in configs if shared_memory(config, element_size) <= limit]
        if not fits:
            raise RuntimeError(f"{kernel.__name__}: no autotune config fits {limit} bytes of shared memory for "
                               f"{element_size}-byte inputs")
        return fits

    tuned = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": fitting}, **options)(kernel)
    return GemmKernel(kernel, tuned, default_blocks)


def pipelined_operands_bytes(config, element_size: int) -> int:
    """Shared memory of a K-pipelined ``[BLOCK_M, BLOCK_H] x [BLOCK_H, BLOCK_V]`` dot: ``num_stages`` copies of both
    operand tiles (Hopper's wgmma pipeline keeps that many, Ampere's one fewer; the epilogue reuses the ring)."""
    blocks = config.kwargs
    return config.num_stages * (blocks["BLOCK_M"] + blocks["BLOCK_V"]) * blocks["BLOCK_H"] * element_size


def on_device(tensor: torch.Tensor):
    """Context in which a launch runs on ``tensor``'s GPU (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def shared_memory_limit(device: torch.device) -> int:
    """Per-block shared memory of ``device`` in bytes, the limit Triton checks when it loads a kernel."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 inputs follow ``torch.get_float32_matmul_precision()``."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """:func:`ceu_kernels.contract.stat_dtype` for inputs of ``dtype``, as a torch and a Triton dtype."""
    acc = stat_dtype(dtype)
    return acc, (tl.float64 if acc == torch.float64 else tl.float32)


@triton.jit
def offsets64(index, stride):
    """``index * stride`` in 64 bits: tokens x V and V x H pass 2**31 at LM-head sizes."""
    return index.to(tl.int64) * stride


@triton.jit
def grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (tile_m, tile_n) so that neighbouring programs share operand tiles in L2."""
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def logits_tile(hidden, weight, rows, cols, row_ok, col_ok, dim, stride_hidden, stride_weight,
                ACC: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """``hidden[rows] @ weight[cols].T`` as a [rows, cols] tile accumulated in ``ACC``; out-of-range entries are 0."""
    hidden_rows = hidden + offsets64(rows, stride_hidden)[:, None]
    weight_rows = weight + offsets64(cols, stride_weight)[None, :]
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=ACC)
    for k0 in range(0, dim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < dim
        h = tl.load(hidden_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(weight_rows + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w_t, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def head_logits_tile(hidden, weight, bias, n_tokens, vocab_size, dim, stride_hidden, stride_weight,
                     HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (token tile, vocab tile) in grouped order and its logits ``h W^T + b`` in ``ACC``:
    the prologue every head kernel shares. Returns ``rows, cols, row_ok, col_ok, tile_v, logits``."""
    tile_m, tile_v = grouped_tile(tl.program_id(0), tl.cdiv(n_tokens, BLOCK_M), tl.cdiv(vocab_size, BLOCK_V),
                                  GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_tokens
    col_ok = cols < vocab_size
    logits = logits_tile(hidden, weight, rows, cols, row_ok, col_ok, dim, stride_hidden, stride_weight,
                         ACC, BLOCK_H, PRECISION)
    if HAS_BIAS:
        logits += tl.load(bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return rows, cols, row_ok, col_ok, tile_v, logits


@triton.jit
def row_max_first_index(values, cols):
    """Per-row max of a tile and the column index attaining it, by ``torch.max(dim)``'s rule: a row holding NaN has
    max NaN at its first NaN; otherwise the largest value (+/-inf ordered as usual) at its smallest column. ``cols``
    must be increasing along the row, and the index is always one of ``cols`` (never a sentinel)."""
    is_nan = values != values
    best = tl.max(tl.where(is_nan, float("-inf"), values), axis=1)  # tl.max's own NaN handling is never relied on
    first_nan = tl.min(tl.where(is_nan, cols[None, :], 2147483647), axis=1)
    first_best = tl.min(tl.where(values == best[:, None], cols[None, :], 2147483647), axis=1)
    has_nan = first_nan != 2147483647
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, first_nan, first_best)


@triton.jit
def pack_max_index(value, index):
    """A signed 64-bit word whose order is (value, then lower index): ``atomic_max`` on it is an exact argmax.

    High 32 bits: the float32 bits remapped so signed-integer order is float order (-0.0 folded into +0.0), and any
    NaN (whatever its sign bit) mapped to the quiet NaN ``0x7FC00000``, above +inf, as ``torch.max`` ranks NaN;
    low 32 bits: ``2**32 - 1 - index``, so a tie (NaN ties included) keeps the smallest index.
    """
    value = value.to(tl.float32)
    value = tl.where(value == 0.0, 0.0, value)
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(value != value, 0x7FC00000, key)
    return (key.to(tl.int64) << 32) | (4294967295 - index.to(tl.int64))


def unpack_max_index(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_max_index` on the host side: float32 max (NaN for the NaN key) and int64 index."""
    key = (packed >> 32).to(torch.int32)
    value = torch.where(key >= 0, key, key ^ 0x7FFFFFFF).view(torch.float32)
    return value, 4294967295 - (packed & 4294967295)
