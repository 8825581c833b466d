"""ceu_kernels.tl_utils: the Triton helpers (packed max/index word, 64-bit offsets, grouped tile order) through tiny
kernels, on the CPU through the interpreter when no GPU is present."""
import pytest
import torch

from helpers import triton_device

DEVICE = triton_device()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ceu_kernels import tl_utils  # noqa: E402


@triton.jit
def _pack_kernel(values, indices, out):
    slots = tl.arange(0, 16)
    tl.store(out + slots, tl_utils.pack_max_index(tl.load(values + slots), tl.load(indices + slots)))


def test_packed_word_orders_by_value_then_lower_index():
    values = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, 2.0, 7.0, 7.0,
                           float("inf"), -2.0, 1.0, 1.0, 0.5], device=DEVICE)
    indices = torch.tensor([5, 0, 9, 4, 3, 1, 70000, 12, 2**31 - 1, 8, 6, 0, 1, 3, 2, 0], dtype=torch.int32,
                           device=DEVICE)
    packed = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _pack_kernel[(1,)](values, indices, packed)
    value, index = tl_utils.unpack_max_index(packed)
    assert torch.equal(value, values + 0.0) and torch.equal(index, indices.long())
    order = sorted(range(16), key=lambda i: (values[i].item(), -indices[i].item()))
    assert torch.equal(packed.argsort().cpu(), torch.tensor(order))


@triton.jit
def _offsets_kernel(indices, stride, out):
    slots = tl.arange(0, 16)
    tl.store(out + slots, tl_utils.offsets64(tl.load(indices + slots), stride))


def test_offsets_are_64_bit():
    """Row index times stride past 2**31 (a 128256 x 4096 head, a 600k-token batch) must not wrap."""
    indices = torch.tensor([0, 1, 128255, 2**20 + 3, 2**31 - 1] + [7] * 11, dtype=torch.int32, device=DEVICE)
    stride = 128256
    out = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](indices, stride, out)
    expected = [i * stride for i in indices.tolist()]
    assert max(expected) > 2**31 and out.tolist() == expected


@triton.jit
def _tile_kernel(out, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tile_m, tile_n = tl_utils.grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_M)
    tl.store(out + pid, tile_m * n_tiles_n + tile_n)


@pytest.mark.parametrize("n_tiles_m,n_tiles_n", [(1, 1), (3, 5), (11, 4), (8, 1)])
def test_grouped_tiles_cover_each_tile_once(n_tiles_m, n_tiles_n):
    out = torch.empty(n_tiles_m * n_tiles_n, dtype=torch.int32, device=DEVICE)
    _tile_kernel[(out.numel(),)](out, n_tiles_m, n_tiles_n, GROUP_M=4)
    assert sorted(out.tolist()) == list(range(out.numel()))
