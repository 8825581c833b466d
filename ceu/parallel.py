"""Vocab-parallel LMF loss for a tensor-parallel LM head: each rank holds a contiguous shard of the weight's rows.

Forward: the local GEMM gives a shard max/argmax; two all-reduces of ``[tokens]`` vectors give the global max (MAX)
and its first global index (MIN over the ranks that hold the max), which is exact in every dtype and keeps the
first-index tie rule and ``torch.max``'s NaN rule across shards; a third sums the partial row sums for the mean.
Backward: only the rank owning the argmax row scatters ``c h`` into its shard of dW, written once in the weight's
dtype by the chunked backend's :func:`ceu_kernels.chunked.rank_one_plus_scatter` (no float32 ``[V_shard, H]``
buffer); ``dh`` is assembled with one all-reduce, so ``hidden`` must not also pass through a "copy to
tensor-parallel region" op that all-reduces its gradient.

The backend chosen by ``impl`` runs the shard's forward (max, argmax: the contract's ``lmf_forward``). The backward
is the closed form in PyTorch whatever the backend: the contract's ``lmf_backward`` divides by the rows it is given
and gathers ``W[argmax]`` for every token, while a shard's rank-1 term divides by the global vocabulary and only the
owner of a token's argmax gathers its row.
"""
import torch
import torch.distributed as dist

from ceu_kernels.chunked import rank_one_plus_scatter
from ceu_kernels.contract import stat_dtype

from . import backends, checks, ops
from .lmf import autocast_disabled, backward_without_autocast, finish, gap_coefficient, hidden_dot, masked_square


def global_max_argmax(local_max, local_argmax, holds_real, vocab_start, vocab_size, group):
    """The global (max, first argmax) from each shard's, by ``torch.max``'s rule, in two all-reduces.

    NaN never enters a collective (how a MAX treats NaN is the collective backend's choice): a shard whose max is NaN
    offers +inf to the MAX and its first NaN's global index to the MIN, where the other candidates are offset by
    ``vocab_size``, so a NaN on any shard wins at the first NaN index. A shard of padding rows only is never a
    candidate.
    """
    is_nan = local_max.isnan()
    row_max = torch.where(is_nan, float("inf"), local_max)
    dist.all_reduce(row_max, dist.ReduceOp.MAX, group=group)
    index = local_argmax + vocab_start
    none = torch.iinfo(torch.int64).max
    candidate = torch.where(is_nan, index, torch.where(local_max == row_max, index + vocab_size, none))
    if not holds_real:
        candidate.fill_(none)
    dist.all_reduce(candidate, dist.ReduceOp.MIN, group=group)
    nan_won = candidate < vocab_size
    return torch.where(nan_won, float("nan"), row_max), torch.where(nan_won, candidate, candidate - vocab_size)


def check_shards(local, group) -> None:
    """One all-gather of every rank's ``(vocab_start, shard rows, vocab_size, tokens, H)`` (``local``; None: this
    rank refused its own inputs and raises after this call). Raises the same ``ValueError`` on every rank unless the
    shards tile global rows ``0 .. total`` without gap or overlap, ``vocab_size`` (the same on every rank) is at most
    ``total``, and ``hidden`` has the same shape on every rank."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([-1] * 5 if local is None else local, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = [row.tolist() for row in table]
    if local is None:
        return
    refused = [rank for rank, row in enumerate(table) if row[0] < 0]
    if refused:
        raise ValueError(f"rank(s) {refused} refused their inputs to vocab_parallel_lmf_loss (see their errors)")
    sizes = [row[2] for row in table]
    if len(set(sizes)) != 1:
        raise ValueError(f"vocab_size differs across ranks: {sizes}; pass the same global vocabulary on every rank")
    shapes = [tuple(row[3:]) for row in table]
    if len(set(shapes)) != 1:
        raise ValueError(f"hidden must be the same on every rank, got (tokens, H) = {shapes} by rank")
    expected = 0
    for rank, (start, rows, *_) in sorted(enumerate(table), key=lambda item: (item[1][0], item[0])):
        if start != expected:
            ranges = ", ".join(f"rank {r}: rows {row[0]}..{row[0] + row[1] - 1}" for r, row in enumerate(table))
            problem = "a gap before" if start > expected else "an overlap at"
            raise ValueError(f"the weight shards must tile the global vocabulary rows 0.. without gaps or overlaps, "
                             f"but there is {problem} row {min(start, expected)} ({ranges}): check vocab_start")
        expected = start + rows
    if sizes[0] > expected:
        raise ValueError(f"vocab_size = {sizes[0]} but the shards hold only rows 0..{expected - 1} ({expected} rows)")


class VocabParallelLMFFunction(torch.autograd.Function):
    """Per-token LMF loss over a vocabulary sharded across ``group``; returns ``(loss, max, mean, argmax)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, mask, vocab_start, vocab_size, group, backend, chunk_size):
        acc = stat_dtype(hidden.dtype)
        local_real = min(max(vocab_size - vocab_start, 0), weight.shape[0])
        if local_real > 0:
            local_max, local_argmax = ops.lmf_forward(hidden, weight, bias, local_real, backend, chunk_size)
        else:  # a shard made only of padding rows never holds the max
            local_max = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=acc)
            local_argmax = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
        row_max, argmax = global_max_argmax(local_max, local_argmax, local_real > 0, vocab_start, vocab_size, group)

        weight_sum = weight[:local_real].sum(0, dtype=acc)
        row_sum = hidden_dot(hidden, weight_sum)
        if bias is not None:
            row_sum += bias[:local_real].sum(dtype=acc)
        dist.all_reduce(row_sum, dist.ReduceOp.SUM, group=group)
        row_mean = row_sum / vocab_size

        gap = row_max - row_mean
        loss = masked_square(gap, mask)
        ctx.save_for_backward(hidden, weight, argmax, gap, weight_sum, mask)
        ctx.config = (vocab_start, local_real, vocab_size, group)
        ctx.mark_non_differentiable(row_max, row_mean, argmax)
        return loss, row_max, row_mean, argmax

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_loss, *_):
        hidden, weight, argmax, gap, weight_sum, mask = ctx.saved_tensors
        vocab_start, local_real, vocab_size, group = ctx.config
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        coef = gap_coefficient(grad_loss, gap, mask)
        owned = (argmax >= vocab_start) & (argmax < vocab_start + local_real)
        local_index = torch.where(owned, argmax - vocab_start, 0)
        owned_coef = torch.where(owned, coef, 0.0)
        grad_hidden = grad_weight = grad_bias = None
        if needs_hidden:
            grad_hidden = owned_coef[:, None] * weight.index_select(0, local_index).to(coef.dtype)
            grad_hidden -= coef[:, None] * (weight_sum / vocab_size)
            dist.all_reduce(grad_hidden, dist.ReduceOp.SUM, group=group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        rows = torch.where(owned, local_index, weight.shape[0])  # a token this shard does not own is dropped
        if needs_weight:
            scaled_hidden = coef[:, None] * hidden.to(coef.dtype)
            grad_weight = rank_one_plus_scatter(rows, scaled_hidden, scaled_hidden.sum(0) / -vocab_size,
                                                weight.shape[0], local_real, weight.dtype)
        if needs_bias:
            grad_bias = rank_one_plus_scatter(rows, coef, coef.sum() / -vocab_size, weight.shape[0], local_real,
                                              weight.dtype)
        grads = checks.not_twice_differentiable([grad_hidden, grad_weight, grad_bias], "ceu.vocab_parallel_lmf_loss")
        return *grads, None, None, None, None, None, None


def vocab_parallel_lmf_loss(hidden, weight_shard, bias_shard=None, *, process_group=None, vocab_start=None,
                            vocab_size=None, mask=None, reduction="mean", impl="auto", chunk_size=None,
                            return_stats=False):
    """:func:`ceu.linear_lmf_loss` for an LM head whose rows are sharded across ``process_group``.

    ``hidden`` is the same on every rank; ``weight_shard`` holds global rows ``vocab_start .. vocab_start + V_r``
    (default: equal shards in rank order, ``vocab_start = rank * V_r``). ``vocab_size`` is the global real vocabulary
    (default ``world_size * V_r``); rows at or past it are padding. Loss, stats and ``dh`` are identical on every
    rank; each rank gets the gradient of its own shard. Argmax indices are global. Autocast does not change what is
    computed, as for :func:`ceu.linear_lmf_loss`.

    Checked on every rank with one all-gather (:func:`check_shards`): the shards must tile the global rows from 0
    without gaps or overlaps (in any rank order), ``vocab_size`` must be the same everywhere and within them, and
    ``hidden`` the same shape; an input that one rank refuses makes the others raise too, so none waits in a
    collective.
    """
    world_size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    shard_rows = weight_shard.shape[0] if isinstance(weight_shard, torch.Tensor) else 0
    if vocab_start is None:
        vocab_start = rank * shard_rows
    if vocab_size is None:
        vocab_size = world_size * shard_rows
    try:  # a rank that raised alone would leave the others waiting in a collective: every rank learns of it first
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int (the global real vocabulary), got {vocab_size!r}")
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        checks.check_head(hidden, weight_shard, bias_shard, None, reduction, impl, chunk_size)
        checks.check_mask(mask, hidden)
    except (TypeError, ValueError, RuntimeError) as error:
        check_shards(None, process_group)
        raise error
    check_shards((vocab_start, shard_rows, vocab_size, hidden.numel() // hidden.shape[-1], hidden.shape[-1]),
                 process_group)
    backend = backends.choose(impl, hidden.device, "lmf", hidden.dtype)  # the one backend decision of this call
    lead_shape = hidden.shape[:-1]
    flat_mask = None if mask is None else mask.reshape(-1)
    with autocast_disabled(hidden.device):
        loss, row_max, row_mean, argmax = VocabParallelLMFFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, flat_mask, vocab_start, vocab_size,
            process_group, backend, chunk_size)
        return finish(loss, row_max, row_mean, argmax, flat_mask, lead_shape, reduction, return_stats)
