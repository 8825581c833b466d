"""ceu_kernels.chunked (and contract.chunk_rows): the LMF backward's scatter without a host sync and at its memory
floor, and the chunk size that follows from the head's size."""
import pytest
import torch

from ceu_kernels import chunked, contract
from helpers import assert_close, head_inputs, torch_max_on_float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(), (5,)], ids=["vector", "rows"])
def test_rank_one_plus_scatter_matches_float64(dtype, shape):
    """Repeated rows (summed once, in the values' precision), dropped values (row n_rows), untouched rows (the
    rank-1 value only), padded rows (zero): against float64 index_add, written in ``dtype``."""
    n_rows, vocab_size = 12, 9
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([3, 12, 0, 3, 8, 3, 12, 0, 5, 8, 3])  # 12 = n_rows: dropped
    acc = contract.stat_dtype(dtype)
    values = torch.randn(rows.shape[0], *shape, generator=generator, dtype=torch.float64)
    rank_one = torch.randn(shape, generator=generator, dtype=torch.float64)
    got = chunked.rank_one_plus_scatter(rows, values.to(acc), rank_one.to(acc), n_rows, vocab_size, dtype)
    expected = torch.zeros(n_rows + 1, *shape, dtype=torch.float64)
    expected[:vocab_size] = rank_one
    expected.index_add_(0, rows, values)
    assert got.dtype == dtype and got.shape == (n_rows, *shape)
    assert_close("scatter", got, expected[:n_rows], dtype)
    assert not got[vocab_size:].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(), (3,)], ids=["vector", "rows"])
def test_rank_one_plus_scatter_rounds_a_half_row_once(dtype, shape):
    """100 additions of 4e-4 to 1 on one row: each below half an ulp of 1 in a half dtype, so summing in the output
    dtype would give 1; summed in float32 and rounded once, 1.04."""
    rows = torch.full((100,), 2)
    got = chunked.rank_one_plus_scatter(rows, torch.full((100, *shape), 4e-4), torch.ones(shape), 5, 4, dtype)
    assert_close("row 2", got[2], torch.full(shape, 1.04), dtype)
    assert torch.equal(got[0], torch.ones(shape, dtype=dtype)) and not got[4].any()


def test_lmf_backward_syncs_nothing_with_the_host(monkeypatch):
    """No data-dependent shape (torch.unique, nonzero, boolean indexing) in the LMF backward: on a GPU these would
    wait for the device."""
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the LMF backward")

    hidden, weight, _ = head_inputs(10, 8, 20, torch.float16)
    argmax = torch.tensor([3, 3, 0, 19, 5, 3, 0, 7, 7, 2])
    coef = torch.linspace(-1, 1, 10)
    for name in ("unique", "nonzero", "masked_select", "unique_consecutive"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    grads = chunked.lmf_backward(coef, argmax, hidden, weight, weight.float().mean(0), 18, True, True, True)
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("weights", [1, contract.CE_CHUNK_WEIGHTS], ids=["lmf", "ce"])
@pytest.mark.parametrize("vocab_size,hidden_size,dtype", [(128256, 256, torch.float32), (128256, 4096, torch.bfloat16),
                                                          (50, 8, torch.float32), (1000, 3, torch.float16)])
def test_chunk_rows_follow_the_head(vocab_size, hidden_size, dtype, weights):
    """A chunk's logits never outgrow ``weights`` times the smaller of CHUNK_BUDGET_BYTES and the head's real rows (so
    an LMF chunk buffer is no larger than the dW the backward returns), and fill it but for a row; chunk_size wins
    when given."""
    weight = torch.empty(vocab_size + 6, hidden_size, dtype=dtype, device="meta")
    bytes_per_logit = torch.finfo(dtype).bits // 8
    rows = contract.chunk_rows(None, vocab_size, bytes_per_logit, weight, weights)
    limit = weights * min(contract.CHUNK_BUDGET_BYTES, vocab_size * hidden_size * weight.element_size())
    buffer = rows * vocab_size * bytes_per_logit
    assert rows >= 1 and (buffer <= limit or rows == 1) and buffer + vocab_size * bytes_per_logit > limit
    assert contract.chunk_rows(7, vocab_size, bytes_per_logit, weight, weights) == 7


def _planted_rows(kind, width, dtype):
    """Six rows of ``width`` logits with a planted hazard for the max and its first index."""
    generator = torch.Generator().manual_seed(width)
    rows = torch.randn(6, width, generator=generator)
    if kind == "ties":  # few distinct values: the max repeats within and across blocks and in the tail
        rows = torch.randint(-2, 3, (6, width), generator=generator).float()
    elif kind == "nan-columns":
        rows[:, 1::3] = float("nan")
    elif kind == "nan-scattered":
        rows[torch.rand(6, width, generator=generator) < 0.02] = float("nan")
    elif kind == "nan-last":  # a NaN only in the last column: the tail's, or the last block's
        rows[:, -1] = float("nan")
    elif kind == "all-minus-inf":
        rows[:] = float("-inf")
    elif kind == "inf-first-and-last":
        rows[:, 0] = rows[:, -1] = float("inf")
    elif kind == "signed-zeros":  # -0 and +0 compare equal: the first one's sign comes back
        rows = torch.zeros(6, width)
        rows[:, ::2] = -0.0
    elif kind == "max-in-tail":
        rows[:, -1] = 10.0
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [1, 5, chunked.ARGMAX_BLOCK - 1, chunked.ARGMAX_BLOCK, chunked.ARGMAX_BLOCK + 1,
                                   2 * chunked.ARGMAX_BLOCK, 3 * chunked.ARGMAX_BLOCK + 47])
@pytest.mark.parametrize("kind", ["random", "ties", "nan-columns", "nan-scattered", "nan-last", "all-minus-inf",
                                  "inf-first-and-last", "signed-zeros", "max-in-tail"])
def test_row_max_argmax_is_torch_max(kind, width, dtype):
    """The blocked max/argmax of the LMF forward gives torch.max's values (sign of zero included) and indices: the
    first index of the max, the first NaN of a row holding one, whether the max sits in a block or the tail."""
    rows = _planted_rows(kind, width, dtype)
    row_max, argmax = torch.empty(6, dtype=dtype), torch.empty(6, dtype=torch.int64)
    chunked.row_max_argmax(rows, row_max, argmax)
    expected_max, expected_argmax = torch.max(rows, dim=1)
    assert torch.equal(argmax, expected_argmax)
    nan = expected_max.isnan()
    assert torch.equal(row_max.isnan(), nan)
    assert torch.equal(row_max[~nan], expected_max[~nan])
    assert torch.equal(row_max[~nan].signbit(), expected_max[~nan].signbit())


@pytest.mark.parametrize("n_tokens,chunk_size", [(2048, None), (256, None), (40, None), (10**6, None), (2048, 100)])
def test_lmf_tiles_stay_in_the_chunk_buffer(n_tokens, chunk_size):
    """The LMF forward's tile is never larger than the buffer chunk_rows sizes and fills it but for a column; past
    one chunk of whole rows it takes a vocabulary tile of at least MIN_TILE_COLUMNS; a given chunk_size keeps whole
    rows."""
    vocab_size, weight = 128256, torch.empty(128256, 256, device="meta")
    rows, columns = chunked.lmf_tile(chunk_size, n_tokens, vocab_size, 4, weight)
    chunk = contract.chunk_rows(chunk_size, vocab_size, 4, weight)
    budget = chunk * vocab_size
    assert 1 <= rows <= n_tokens and rows * columns <= budget
    if chunk_size is not None or n_tokens <= chunk:
        assert (rows, columns) == (min(chunk, n_tokens), vocab_size)
    else:
        assert chunked.MIN_TILE_COLUMNS <= columns < vocab_size
        assert rows == n_tokens or rows * columns > budget - columns


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("n_tokens", [5, 23, 64])
def test_lmf_forward_over_vocabulary_tiles_is_torch_max(monkeypatch, dtype, with_bias, n_tokens):
    """Tiles of tokens by vocabulary columns (narrow ones here) give torch.max of the whole logits row. Integer
    logits, exact in every dtype and summation order: the max repeats across tile borders and the first index must
    win. Weight row 45 is (inf, 0, 0, 0): NaN (0 * inf) for tokens whose first hidden component is 0, +inf or -inf
    for the others; row 70 is NaN: every row's max is NaN, at its first NaN, in one tile or a later one."""
    monkeypatch.setattr(chunked, "MIN_TILE_COLUMNS", 8)
    generator = torch.Generator().manual_seed(n_tokens)
    vocab_size, hidden_size = 83, 4  # 4 rows of logits per chunk (the weight's size), tiles of 8 columns
    hidden = torch.randint(-1, 2, (n_tokens, hidden_size), generator=generator).to(dtype)
    weight = torch.randint(-1, 2, (vocab_size + 5, hidden_size), generator=generator).to(dtype)
    weight[45] = torch.tensor([float("inf"), 0, 0, 0])
    weight[70] = float("nan")
    bias = torch.randint(-2, 3, (vocab_size + 5,), generator=generator).to(dtype) if with_bias else None
    rows, columns = chunked.lmf_tile(None, n_tokens, vocab_size, hidden.element_size(), weight)
    assert columns < vocab_size  # several vocabulary tiles
    row_max, argmax = chunked.lmf_forward(hidden, weight, bias, vocab_size, None)
    expected_max, expected_argmax = torch_max_on_float64(hidden, weight, bias, vocab_size)
    assert torch.equal(argmax, expected_argmax)
    assert {45, 70} <= set(argmax.tolist()) or n_tokens == 5  # a first NaN in either tile (but in the smallest case)
    assert bool(row_max.isnan().all()) and bool(expected_max.isnan().all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_tokens", [23, 64])
def test_lmf_forward_ties_across_tiles_keep_the_first_index(monkeypatch, dtype, n_tokens):
    """Without NaN: integer logits tie across tile borders; values and first indices equal torch.max's."""
    monkeypatch.setattr(chunked, "MIN_TILE_COLUMNS", 8)
    generator = torch.Generator().manual_seed(n_tokens + 1)
    hidden = torch.randint(-1, 2, (n_tokens, 4), generator=generator).to(dtype)
    weight = torch.randint(-1, 2, (88, 4), generator=generator).to(dtype)
    row_max, argmax = chunked.lmf_forward(hidden, weight, None, 83, None)
    expected_max, expected_argmax = torch_max_on_float64(hidden, weight, None, 83)
    assert torch.equal(argmax, expected_argmax) and torch.equal(row_max.double(), expected_max)


def test_cpu_chunk_buffers_are_kept_between_calls_and_released():
    chunked.release_workspace()
    first, second = chunked.chunk_buffers(torch.empty(0), ((3, 5), torch.float16), ((3, 5), torch.float32))
    assert (first.shape, first.dtype, second.shape, second.dtype) == ((3, 5), torch.float16, (3, 5), torch.float32)
    assert second.data_ptr() % 8 == 0 and second.data_ptr() >= first.data_ptr() + first.nbytes  # aligned, disjoint
    (again,) = chunked.chunk_buffers(torch.empty(0), ((4, 2), torch.float64))
    assert again.data_ptr() == first.data_ptr()  # the same memory, not a new allocation
    (larger,) = chunked.chunk_buffers(torch.empty(0), ((1000,), torch.float64))
    assert larger.numel() == 1000
    chunked.release_workspace()
    assert chunked._workspace.data is None


def test_cpu_workspace_made_in_inference_mode_is_writable_after_it():
    chunked.release_workspace()
    hidden, weight, _ = head_inputs(7, 4, 33, torch.float32)
    with torch.inference_mode():
        chunked.lmf_forward(hidden, weight, None, 33, None)
    labels = torch.randint(0, 33, (7,))
    loss, *_ = chunked.ce_forward_backward(hidden, weight, None, labels, 33, -100, None, True, True, False)
    assert torch.isfinite(loss).all()
    chunked.release_workspace()


def test_each_thread_has_its_own_workspace():
    import threading

    chunked.release_workspace()
    (mine,) = chunked.chunk_buffers(torch.empty(0), ((16,), torch.float32))
    pointers = []
    thread = threading.Thread(target=lambda: pointers.append(
        chunked.chunk_buffers(torch.empty(0), ((16,), torch.float32))[0].data_ptr()))
    thread.start()
    thread.join()
    assert pointers and pointers[0] != mine.data_ptr()
    chunked.release_workspace()


def test_meta_and_fake_tensors_get_plain_buffers():
    from torch._subclasses.fake_tensor import FakeTensorMode

    chunked.release_workspace()
    (meta,) = chunked.chunk_buffers(torch.empty(0, device="meta"), ((2, 3), torch.float32))
    assert meta.device.type == "meta"
    with FakeTensorMode() as mode:
        (fake,) = chunked.chunk_buffers(mode.from_tensor(torch.empty(0)), ((2, 3), torch.float32))
    assert type(fake) is not torch.Tensor and chunked._workspace.data is None


def test_lmf_borrows_a_kept_buffer_but_never_keeps_one():
    """The LMF's dW must not sit beside a buffer it kept (its memory floor); one the cross-entropy keeps anyway is
    borrowed when large enough."""
    chunked.release_workspace()
    hidden, weight, _ = head_inputs(9, 4, 40, torch.float32)
    chunked.lmf_forward(hidden, weight, None, 40, None)
    assert chunked._workspace.data is None
    (small,) = chunked.chunk_buffers(hidden, ((8,), torch.float32))
    (transient,) = chunked.chunk_buffers(hidden, ((64,), torch.float32), grow=False)
    assert transient.data_ptr() != small.data_ptr() and chunked._workspace.data.numel() == 32  # not grown
    (large,) = chunked.chunk_buffers(hidden, ((1000,), torch.float32))
    (borrowed,) = chunked.chunk_buffers(hidden, ((64,), torch.float32), grow=False)
    assert borrowed.data_ptr() == large.data_ptr()
    chunked.release_workspace()
