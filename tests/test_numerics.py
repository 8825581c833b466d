"""Hostile inputs and numerics: property tests against the float64 reference, large logits, non-finite inputs."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ceu
from ceu_kernels import contract
from helpers import device_impls, grads, head_inputs, leaf

DEVICE_IMPLS = device_impls()
EXAMPLES = {"torch": 40, "triton": 12, "cuda": 40}


@st.composite
def head_problems(draw):
    n_tokens = draw(st.integers(0, 19))
    return dict(n_tokens=n_tokens, hidden_size=draw(st.integers(1, 37)), vocab=draw(st.integers(1, 90)),
                with_bias=draw(st.booleans()), mask=draw(st.lists(st.booleans(), min_size=n_tokens,
                                                                   max_size=n_tokens)),
                pad=draw(st.integers(0, 3)), chunk_size=draw(st.one_of(st.none(), st.integers(1, 8))),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_lmf_any_shape_matches_reference(device, impl):
    """Any shape, any mask (empty included), padded vocab, chunking: values and grads equal the float64 reference."""

    @settings(max_examples=EXAMPLES[impl], deadline=None, suppress_health_check=list(HealthCheck))
    @given(problem=head_problems())
    def check(problem):
        vocab = problem["vocab"] + problem["pad"]
        hidden, weight, bias = head_inputs(problem["n_tokens"], problem["hidden_size"], vocab, torch.float64, device,
                                           bias=problem["with_bias"], seed=problem["seed"])
        mask = torch.tensor(problem["mask"], dtype=torch.bool, device=device)
        inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        loss = ceu.linear_lmf_loss(*inputs, mask=mask, reduction=problem["reduction"], impl=impl,
                                   chunk_size=problem["chunk_size"], vocab_size=problem["vocab"])
        reference_inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        logits = reference_inputs[0] @ reference_inputs[1].T
        if bias is not None:
            logits = logits + reference_inputs[2]
        reference = ceu.lmf_loss(logits, mask=mask, reduction=problem["reduction"], vocab_size=problem["vocab"])
        upstream = torch.linspace(0.5, 1.5, max(reference.numel(), 1), dtype=torch.float64,
                                  device=device)[: reference.numel()].reshape(reference.shape)
        torch.testing.assert_close(loss, reference)
        for got, expected in zip(grads(loss, inputs, upstream), grads(reference, reference_inputs, upstream)):
            if expected is not None:
                torch.testing.assert_close(got, expected)

    check()


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_logits_near_1e4_stay_finite(device, impl, dtype):
    """Logits of magnitude ~1e4 in half precision: loss and every gradient finite, close to the float64 values.

    The shape keeps the true gradients (c h ~ 2e4/64 * 6) inside fp16's range, so any inf would be ours."""
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; tested on a GPU")
    hidden, weight, bias = head_inputs(64, 256, 50, torch.float64, device, bias=True, seed=7)
    scale = 1e4 / (hidden @ weight.T).abs().max()
    hidden, weight, bias = hidden * scale.sqrt(), weight * scale.sqrt(), bias * 100
    inputs = [leaf(t, dtype) for t in (hidden, weight, bias)]
    labels = torch.arange(64, device=device) % 50
    for loss in (ceu.linear_lmf_loss(*inputs, impl=impl),
                 ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], impl=impl)):
        assert torch.isfinite(loss)
        for grad in torch.autograd.grad(loss, inputs):
            assert torch.isfinite(grad).all()
    expected = ceu.linear_lmf_loss(hidden, weight, bias, impl="torch")
    torch.testing.assert_close(ceu.linear_lmf_loss(*inputs, impl=impl).double(), expected, rtol=2e-2, atol=0)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_input_propagates_to_the_loss(device, impl, poison):
    """A NaN or inf in a counted token makes the loss NaN/inf, never a silent finite number; masking the token hides
    it from the loss (as in eager PyTorch, its gradient contributions may still be non-finite)."""
    hidden, weight, _ = head_inputs(6, 16, 40, torch.float32, device)
    hidden[2, 3] = poison
    assert not torch.isfinite(ceu.linear_lmf_loss(hidden, weight, impl=impl))
    labels = torch.arange(6, device=device)
    assert not torch.isfinite(ceu.linear_cross_entropy(hidden, weight, labels, impl=impl))
    mask = torch.ones(6, dtype=torch.bool, device=device)
    mask[2] = False
    assert torch.isfinite(ceu.linear_lmf_loss(hidden, weight, mask=mask, impl=impl))
    weight[11, 0] = poison
    assert not torch.isfinite(ceu.linear_lmf_loss(hidden, weight, mask=mask, impl=impl))


# ---- NaN / inf rows: max and argmax follow torch.max(dim), and no index ever leaves the real vocabulary ----------

NAN, INF = float("nan"), float("inf")


def special_head(dtype, vocab_size=70, padded=80, hidden_size=4, seed=3):
    """A head whose logits rows hold NaN and +/-inf where they test the rule: column 1 of the weight is 1 except 0 at
    rows 37 and 50 (so an inf in hidden column 1 gives inf everywhere and NaN there, the first NaN in a later tile
    than the first inf), column 2 is 1 (inf there: a row of one infinity), column 3 is -1 except +1 at rows 20 and 45
    (a +inf there ties at 20 and 45). The padded rows are NaN: they must never count."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(padded, hidden_size, generator=generator, dtype=torch.float64)
    weight[:, 1], weight[[37, 50], 1] = 1.0, 0.0
    weight[:, 2] = 1.0
    weight[:, 3], weight[[20, 45], 3] = -1.0, 1.0
    weight[vocab_size:] = NAN
    hidden = torch.zeros(10, hidden_size, dtype=torch.float64)
    hidden[:, 0] = torch.randn(10, generator=generator, dtype=torch.float64)
    hidden[0, 1], hidden[1, 1] = INF, -INF  # inf / -inf everywhere, NaN at 37 and 50
    hidden[2, 2], hidden[3, 2] = INF, -INF  # all +inf / all -inf: index 0
    hidden[4, 3], hidden[5, 3] = INF, -INF  # +inf at 20 and 45 only / -inf at 20 and 45 only
    hidden[6, 0] = NAN  # all NaN
    return hidden.to(dtype), weight.to(dtype), vocab_size


def torch_max_on_float64(hidden, weight, bias, vocab_size):
    """``torch.max(dim)`` of the float64 logits on the CPU, where the rule was read off: (values, indices) on the
    inputs' device."""
    logits = hidden.cpu().double() @ weight[:vocab_size].cpu().double().T
    if bias is not None:
        logits = logits + bias[:vocab_size].cpu().double()
    values, indices = torch.max(logits, dim=-1)
    return values.to(hidden.device), indices.to(hidden.device)


NON_FINITE_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
"""The Triton interpreter's numpy warns on ``0 * inf`` and ``inf - inf``: those are the inputs under test."""


@NON_FINITE_WARNINGS
@pytest.mark.skipif(not any(impl == "triton" for _, impl in DEVICE_IMPLS), reason="Triton is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nan_weight_row", [False, True], ids=["finite_weight", "nan_weight_row_58"])
def test_lmf_row_stats_nan_and_inf_rows(dtype, nan_weight_row):
    """The Triton forward in both ways of combining tiles (packed word for float32, partials for float64), several
    vocab tiles: a NaN row gives NaN at its first NaN even when
    +inf is in an earlier tile (the packed key of NaN is above +inf's), a row of -inf gives index 0, ties of +inf
    the lower index, the NaN padded rows never count, and every argmax is a real row."""
    from ceu_kernels.lmf_forward import lmf_row_stats

    device = [d for d, impl in DEVICE_IMPLS if impl == "triton"][-1]
    hidden, weight, vocab_size = special_head(dtype)
    if nan_weight_row:  # a NaN logit at 58 in every row: the finite rows' argmax moves to a later tile
        weight[58, 0] = NAN
    hidden, weight = hidden.to(device), weight.to(device)
    row_max, argmax = lmf_row_stats(hidden, weight, None, vocab_size, blocks=(16, 16, 16))
    expected = torch_max_on_float64(hidden, weight, None, vocab_size)
    assert ((argmax >= 0) & (argmax < vocab_size)).all()
    assert torch.equal(argmax, expected[1])
    torch.testing.assert_close(row_max, expected[0].to(row_max.dtype), equal_nan=True)
    assert expected[1][:7].tolist() == ([37, 37, 58, 58, 58, 58, 0] if nan_weight_row else [37, 37, 0, 0, 20, 0, 0])


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("poison", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("counted", [True, False], ids=["counted", "masked"])
@pytest.mark.parametrize("dtype,with_bias", [(torch.float32, False), (torch.float64, True)], ids=["fp32", "fp64_bias"])
def test_non_finite_token_stats_and_gradients(device, impl, poison, counted, dtype, with_bias):
    """A NaN/inf hidden state, counted or masked, through forward and backward (padded vocabulary whose rows are
    NaN): nothing crashes, the argmax is torch.max's on the float64 logits and a real row, a counted NaN makes the
    loss NaN, a masked one leaves it finite and equal to the reference, the other tokens' dh are finite and equal the
    reference's, and the padded rows of dW and db stay exactly zero (no index reached them)."""
    vocab_size, n_tokens, poisoned = 20, 5, 2
    hidden, weight, bias = head_inputs(n_tokens, 8, vocab_size, dtype, device, bias=with_bias, seed=11)
    hidden[poisoned, 3] = poison
    weight = torch.cat([weight, torch.full_like(weight[:4], NAN)])
    bias = None if bias is None else torch.cat([bias, torch.full_like(bias[:4], NAN)])
    mask = torch.ones(n_tokens, dtype=torch.bool, device=device)
    mask[4] = False
    mask[poisoned] = counted
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss, stats = ceu.linear_lmf_loss(*inputs, mask=mask, impl=impl, vocab_size=vocab_size, return_stats=True)
    grad_hidden, grad_weight, grad_bias = grads(loss, inputs, torch.ones_like(loss))

    expected = torch_max_on_float64(hidden, weight, bias, vocab_size)
    assert ((stats.argmax >= 0) & (stats.argmax < vocab_size)).all()
    assert torch.equal(stats.argmax, expected[1])
    torch.testing.assert_close(stats.max, expected[0].to(stats.max.dtype), equal_nan=True)

    real = [leaf(hidden, torch.float64), leaf(weight[:vocab_size], torch.float64),
            leaf(None if bias is None else bias[:vocab_size], torch.float64)]
    logits = real[0] @ real[1].T + (0 if bias is None else real[2])
    reference = ceu.lmf_loss(logits, mask=mask)
    reference_hidden = grads(reference, real, torch.ones_like(reference))[0]
    if counted:
        assert loss.isnan() if poison != poison else not loss.isfinite()
    else:
        assert loss.isfinite()
        torch.testing.assert_close(loss, reference.to(loss.dtype))
    others = [i for i in range(n_tokens) if i != poisoned]
    assert grad_hidden[others].isfinite().all()
    torch.testing.assert_close(grad_hidden[others], reference_hidden[others].to(dtype))
    assert (grad_weight[vocab_size:] == 0).all()
    if with_bias:
        assert (grad_bias[vocab_size:] == 0).all()


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "write_once"])
def test_lmf_backward_never_dereferences_a_bad_argmax(device, impl, deterministic):
    """Defence in depth: an argmax outside [0, vocab_size) (-1, a padded row, past the weight, huge) handed to the
    backward is never read or written through: its token's dh is NaN, the others' are exact, and dW/db are the rank-1
    value plus the valid tokens' scatter, zero on padded rows."""
    if impl != "triton" and deterministic:
        pytest.skip(f"the {impl} backward has one path")
    vocab_size, n_rows, n_tokens = 12, 16, 7
    hidden, weight, _ = head_inputs(n_tokens, 8, n_rows, torch.float32, device, seed=5)
    argmax = torch.tensor([3, -1, 12, 16, 2**40, 3, 11], device=device)
    valid = (argmax >= 0) & (argmax < vocab_size)
    coef = torch.linspace(-1.0, 1.5, n_tokens, device=device)
    weight_mean = weight[:vocab_size].mean(0)
    backend = contract.load(impl)
    options = {"deterministic": deterministic} if impl == "triton" else {}
    grad_hidden, grad_weight, grad_bias = backend.lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size,
                                                               True, True, True, **options)
    rows = torch.where(valid, argmax, 0)
    assert grad_hidden[~valid].isnan().all()
    torch.testing.assert_close(grad_hidden[valid], (coef[:, None] * (weight[rows] - weight_mean))[valid])
    expected_weight = torch.zeros_like(weight)
    expected_weight[:vocab_size] = (coef[:, None] * hidden).sum(0) / -vocab_size
    expected_weight.index_add_(0, rows[valid], (coef[:, None] * hidden)[valid])
    expected_bias = torch.zeros(n_rows, device=device)
    expected_bias[:vocab_size] = coef.sum() / -vocab_size
    expected_bias.index_add_(0, rows[valid], coef[valid])
    torch.testing.assert_close(grad_weight, expected_weight)
    torch.testing.assert_close(grad_bias, expected_bias)


PARALLEL_SHARD_ROWS, PARALLEL_VOCAB = 24, 44  # two ranks; rank 1 holds global rows 24..47, of which 44..47 padding


def parallel_nan_head():
    """Global head whose rows put NaN and inf across the shard boundary (see the test's docstring)."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(2 * PARALLEL_SHARD_ROWS, 5, generator=generator, dtype=torch.float64)
    weight[:, 1], weight[[30, 40], 1] = 1.0, 0.0  # inf in hidden column 1: +inf on rank 0, first NaN at 30 on rank 1
    weight[:, 2] = 1.0  # inf in column 2: a row of one infinity, index 0
    weight[:, 3], weight[[5, 29], 3] = -1.0, 1.0  # +inf in column 3: +inf at 5 and 29, a tie across the shards
    weight[:, 4], weight[[10, 35], 4] = 1.0, 0.0  # inf in column 4: NaN at 10 (rank 0) and 35 (rank 1)
    weight[PARALLEL_VOCAB:] = NAN
    hidden = torch.zeros(9, 5, dtype=torch.float64)
    hidden[:, 0] = torch.randn(9, generator=generator, dtype=torch.float64)
    hidden[0, 1], hidden[1, 2], hidden[2, 2], hidden[3, 3], hidden[4, 4] = INF, -INF, INF, INF, INF
    hidden[5, 0] = NAN
    return hidden, weight


def _parallel_nan_worker(rank, store_path, out_dir):
    from ceu.parallel import vocab_parallel_lmf_loss

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        hidden, weight = parallel_nan_head()
        inputs = [leaf(hidden), leaf(weight[rank * PARALLEL_SHARD_ROWS:(rank + 1) * PARALLEL_SHARD_ROWS])]
        loss, stats = vocab_parallel_lmf_loss(*inputs, vocab_size=PARALLEL_VOCAB, reduction="none", impl="torch",
                                              return_stats=True)
        grad_hidden, _ = torch.autograd.grad(loss, inputs, torch.ones_like(loss))
        torch.save([loss.detach(), stats.max, stats.argmax, grad_hidden], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_nan_follows_torch_max(tmp_path):
    """Vocab-parallel LMF over two gloo ranks: a NaN on one shard wins over +inf on the other at its first NaN, a
    NaN on both shards goes to the lower index, a row of -inf to index 0, a tie of +inf across shards to the lower
    index, the padded NaN rows never count; max, argmax, per-token loss and the finite tokens' dh are the unsharded
    ones. (NaN never enters a collective, whose NaN ordering differs between backends.)"""
    mp.spawn(_parallel_nan_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    hidden, weight = parallel_nan_head()
    inputs = [leaf(hidden), leaf(weight)]
    loss, stats = ceu.linear_lmf_loss(*inputs, vocab_size=PARALLEL_VOCAB, reduction="none", impl="torch",
                                      return_stats=True)
    grad_hidden, _ = torch.autograd.grad(loss, inputs, torch.ones_like(loss))
    expected = torch_max_on_float64(hidden, weight, None, PARALLEL_VOCAB)
    assert stats.argmax[:6].tolist() == [30, 0, 0, 5, 10, 0] and torch.equal(stats.argmax, expected[1])
    finite = loss.isfinite()
    for rank in range(2):
        got_loss, got_max, got_argmax, got_hidden = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got_argmax, stats.argmax)
        torch.testing.assert_close(got_max, stats.max, equal_nan=True)
        torch.testing.assert_close(got_loss, loss.detach(), equal_nan=True)
        torch.testing.assert_close(got_hidden[finite], grad_hidden[finite])
