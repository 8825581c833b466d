"""ceu.parallel: vocab-parallel LMF over 2 gloo processes on CPU against the unsharded fused loss (values, stats, every
grad), NaN and inf across the shards included."""
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ceu
from ceu.parallel import vocab_parallel_lmf_loss
from helpers import INF, NAN, assert_close, head_inputs, leaf, random_mask, small_gap_inputs, torch_max_on_float64

WORLD_SIZE, SHARD_ROWS, HIDDEN_SIZE, N_TOKENS = 2, 37, 12, 15
# name -> (global vocab_size, reduction); 70 pads the last 4 rows, 30 leaves rank 1 only padding.
CASES = {"full": (74, "none"), "padded": (70, "mean"), "padding_shard": (30, "sum")}


def case_inputs(vocab_size):
    hidden, weight, bias = head_inputs(N_TOKENS, HIDDEN_SIZE, WORLD_SIZE * SHARD_ROWS, torch.float64, bias=True)
    # Plant a tie across the shard boundary: rows 5 (rank 0) and 40 (rank 1) are twins and win for token 0. Their
    # entries and token 0's are small integers, so the twins' logits are exact in any summation order or GEMM shape.
    twin = torch.tensor([2, -1, 1, 0, -2, 1, 1, -1, 2, 0, 1, -2], dtype=torch.float64)
    weight[5], weight[40], bias[5], bias[40], hidden[0] = twin, twin, 1.0, 1.0, twin
    return hidden, weight, bias, random_mask((N_TOKENS,))


def upstream(reduction):
    """Per-token upstream gradients for "none", a non-unit scalar otherwise."""
    if reduction == "none":
        return torch.linspace(0.5, 1.5, N_TOKENS, dtype=torch.float64)
    return torch.tensor(1.3, dtype=torch.float64)


def worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        rows = slice(rank * SHARD_ROWS, (rank + 1) * SHARD_ROWS)
        for name, (vocab_size, reduction) in CASES.items():
            hidden, weight, bias, mask = case_inputs(vocab_size)
            inputs = [leaf(hidden), leaf(weight[rows]), leaf(bias[rows])]
            loss, stats = vocab_parallel_lmf_loss(*inputs, vocab_size=vocab_size, mask=mask, reduction=reduction,
                                                  impl="torch", chunk_size=4, return_stats=True)
            results[name] = [loss.detach(), stats.argmax, *torch.autograd.grad(loss, inputs, upstream(reduction))]
        hidden, weight, bias = small_gap_inputs(N_TOKENS, HIDDEN_SIZE, WORLD_SIZE * SHARD_ROWS, torch.float32, "cpu")
        for autocast in (False, True):
            inputs = [leaf(hidden), leaf(weight[rows]), leaf(bias[rows])]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, stats = vocab_parallel_lmf_loss(*inputs, vocab_size=70, impl="torch", return_stats=True)
                results[f"autocast={autocast}"] = [loss.detach(), *stats, *torch.autograd.grad(loss, inputs)]
        results["shard checks"] = shard_check_outcomes(rank)
        results["double backward"] = double_backward_error(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    spawn_with_timeout(worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_unsharded(rank_results, name):
    vocab_size, reduction = CASES[name]
    hidden, weight, bias, mask = case_inputs(vocab_size)
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss, stats = ceu.linear_lmf_loss(*inputs, vocab_size=vocab_size, mask=mask, reduction=reduction, impl="torch",
                                      return_stats=True)
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(loss, inputs, upstream(reduction))
    assert stats.argmax[0] == 5  # the tie across shards goes to the lower global index
    for rank, (got_loss, got_argmax, got_hidden, got_weight, got_bias) in enumerate(r[name] for r in rank_results):
        rows = slice(rank * SHARD_ROWS, (rank + 1) * SHARD_ROWS)
        assert_close("loss", got_loss, loss.detach(), torch.float64)
        assert torch.equal(got_argmax, stats.argmax)
        assert_close("grad hidden", got_hidden, grad_hidden, torch.float64)
        assert_close("grad weight", got_weight, grad_weight[rows], torch.float64)
        assert_close("grad bias", got_bias, grad_bias[rows], torch.float64)


def test_autocast_changes_nothing(rank_results):
    """Under bfloat16 autocast, float32 inputs give bitwise the same loss, float32 stats and grads on every rank."""
    for results in rank_results:
        for got, expected in zip(results["autocast=True"], results["autocast=False"]):
            assert got.dtype == expected.dtype and torch.equal(got, expected)
        assert results["autocast=True"][2].dtype == torch.float32  # the mean


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
        assert_close("max", got_max, stats.max, torch.float64, equal_nan=True)
        assert_close("loss", got_loss, loss.detach(), torch.float64, equal_nan=True)
        assert_close("grad hidden", got_hidden[finite], grad_hidden[finite], torch.float64)


# --- Shards that do not add up: refused on every rank (one all-gather), no rank left waiting -------------------------

SHARD_CASES = {
    # name -> per rank: (rows of the global 2 * SHARD_ROWS head, vocab_start, vocab_size, tokens) or a local error
    "overlap": [((0, 37), 0, 74, 15), ((37, 74), 0, 74, 15)],
    "gap": [((0, 37), 0, 74, 15), ((37, 74), 40, 74, 15)],
    "not from row 0": [((0, 37), 3, 74, 15), ((37, 74), 40, 74, 15)],
    "vocab_size past the shards": [((0, 37), 0, 80, 15), ((37, 74), 37, 80, 15)],
    "vocab_size differs": [((0, 37), 0, 74, 15), ((37, 74), 37, 70, 15)],
    "hidden differs": [((0, 37), 0, 74, 15), ((37, 74), 37, 74, 14)],
    "one rank refuses its input": [((0, 37), 0, 74, 15), ((37, 74), -1, 74, 15)],
    "shards out of rank order": [((37, 74), 37, 70, 15), ((0, 37), 0, 70, 15)],  # valid: each says where it starts
}


def shard_check_outcomes(rank):
    """This rank's loss or error message for each of SHARD_CASES (run inside the module's gloo workers)."""
    hidden, weight, bias, _ = case_inputs(74)
    outcome = {}
    for name, per_rank in SHARD_CASES.items():
        (first, last), vocab_start, vocab_size, tokens = per_rank[rank]
        try:
            outcome[name] = vocab_parallel_lmf_loss(hidden[:tokens], weight[first:last], bias[first:last],
                                                    vocab_start=vocab_start, vocab_size=vocab_size, impl="torch")
        except ValueError as error:
            outcome[name] = str(error)
    return outcome


def spawn_with_timeout(worker, out_dir, seconds=240):
    """mp.spawn, but a rank stuck in a collective fails the test instead of hanging it."""
    context = mp.spawn(worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = seconds
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {seconds} s: one is waiting in a collective")


def double_backward_error(rank):
    """The message of a backward through create_graph=True gradients (None if none was raised)."""
    hidden, weight, bias, _ = case_inputs(74)
    inputs = [leaf(hidden), leaf(weight[rank * SHARD_ROWS:(rank + 1) * SHARD_ROWS])]
    first = torch.autograd.grad(vocab_parallel_lmf_loss(*inputs, impl="torch"), inputs, create_graph=True)
    try:
        torch.autograd.grad(first[0].square().sum(), inputs[1])
    except RuntimeError as error:
        return str(error)
    return None


def test_double_backward_raises_a_ceu_error(rank_results):
    """A ceu error on every rank, as for the unsharded losses (tests/test_checks.py)."""
    for results in rank_results:
        assert results["double backward"].startswith("ceu.vocab_parallel_lmf_loss is not twice differentiable")


def test_shards_that_do_not_add_up_are_refused_on_every_rank(rank_results):
    """Before: overlapping or gapped shards, or a vocab_size past the shards, returned a wrong loss. Now every rank
    raises the same error (a rank that refuses its own input raises its own, the others name it), and a valid
    sharding in any rank order gives the unsharded loss."""
    outcomes = [results["shard checks"] for results in rank_results]
    expected = {
        "overlap": "there is an overlap at row 0 \\(rank 0: rows 0..36, rank 1: rows 0..36\\): check vocab_start",
        "gap": "there is a gap before row 37 \\(rank 0: rows 0..36, rank 1: rows 40..76\\)",
        "not from row 0": "there is a gap before row 0",
        "vocab_size past the shards": "vocab_size = 80 but the shards hold only rows 0..73 \\(74 rows\\)",
        "vocab_size differs": "vocab_size differs across ranks: \\[74, 70\\]",
        "hidden differs": "hidden must be the same on every rank, got \\(tokens, H\\) = "
                          "\\[\\(15, 12\\), \\(14, 12\\)\\]",
    }
    for name, message in expected.items():
        for rank, outcome in enumerate(outcomes):
            assert isinstance(outcome[name], str) and re.search(message, outcome[name]), (name, rank, outcome[name])
    assert outcomes[1]["one rank refuses its input"] == "vocab_start must be a non-negative int, got -1"
    assert outcomes[0]["one rank refuses its input"].startswith("rank(s) [1] refused their inputs")
    hidden, weight, bias, _ = case_inputs(74)
    unsharded = ceu.linear_lmf_loss(hidden, weight, bias, vocab_size=70, impl="torch")
    for outcome in outcomes:
        assert_close("loss", outcome["shards out of rank order"], unsharded, torch.float64)
