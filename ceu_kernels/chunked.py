"""The token-chunked PyTorch backend (``impl="torch"``, CPU and GPU): the fused losses without ever holding
``[tokens, V]`` logits, following :class:`ceu_kernels.contract.Backend`.

Each chunk of tokens (in the LMF forward, a tile of tokens by vocabulary columns) runs one GEMM into a logits
buffer that is allocated once and reused, so the extra memory is bounded by :func:`~ceu_kernels.contract.chunk_rows`
(``CHUNK_BUDGET_BYTES`` and the head's weight; twice that for the cross-entropy, ``CE_CHUNK_WEIGHTS``) whatever the
number of tokens; on a CPU the cross-entropy's is kept between calls (:func:`chunk_buffers`). The LMF backward is
the closed form and runs no GEMM. The GEMMs run in the inputs' dtype, so half-precision logits are rounded before
the max and the softmax. The cross-entropy loop with the gradients formed in the forward (:func:`fused_ce_loop`) is
also the Triton and CUDA backends', with their row kernels.

It lives in ``ceu_kernels`` because it is a backend like the Triton and CUDA ones, selected by the same name
registry and held to the same contract; ``ceu.chunked`` still imports it for existing callers. Plain PyTorch only:
it is also the CPU path and, with ``ceu.reference``, what the other backends are tested against.
"""
import threading

import torch

from .contract import CE_CHUNK_WEIGHTS, chunk_rows, stat_dtype


class _Workspace(threading.local):
    """Each thread's kept chunk buffer on the CPU (bytes; grown, never shrunk, until released)."""
    data: torch.Tensor | None = None


_workspace = _Workspace()


def chunk_buffers(like: torch.Tensor, *shapes_and_dtypes, grow: bool = True) -> list[torch.Tensor]:
    """Fresh, uninitialised chunk buffers of the given ``(shape, dtype)``, on ``like``'s device.

    On a CPU they are carved from one buffer kept per thread between calls, as CUDA's caching allocator keeps
    freed blocks on a GPU: the CPU allocator hands such large blocks back to the system on free, so every call
    would fault its buffer in again, page by page (about a tenth of a cross-entropy call over 512 tokens on the
    CPU target). ``grow=False`` only borrows a kept buffer that is already large enough, else allocates a
    transient one: the LMF's backward forms a ``dW`` that a buffer it kept would sit beside, lifting its peak
    above its floor; the cross-entropy forms its ``dW`` beside its buffer anyway. :func:`release_workspace`
    hands the kept buffer back. Buffers are valid until the thread's next call; nothing a loss returns or saves
    is carved from them."""
    sizes = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in shapes_and_dtypes]
    # each buffer starts on a multiple of the widest element (8 bytes), so every view is aligned
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // 8) * 8)
    kept = _workspace.data
    fits = kept is not None and kept.numel() >= starts[-1]
    if like.device.type != "cpu" or type(like) is not torch.Tensor or not (fits or grow):
        # GPUs cache on their own; fake and meta tensors trace
        return [torch.empty(shape, dtype=dtype, device=like.device) for shape, dtype in shapes_and_dtypes]
    if not fits:
        _workspace.data = kept = None  # free the smaller one first
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            _workspace.data = kept = torch.empty(starts[-1], dtype=torch.uint8)
    return [kept[start:start + size].view(dtype).view(shape)
            for start, size, (shape, dtype) in zip(starts, sizes, shapes_and_dtypes)]


def release_workspace() -> None:
    """Hand the calling thread's kept CPU chunk buffer back (:func:`chunk_buffers`); the next call allocates anew."""
    _workspace.data = None


def _chunk_logits(buffer, hidden_chunk, weight_t, bias):
    """One GEMM of a token chunk into the front of the reused buffer (plus bias, in place)."""
    logits = buffer[: hidden_chunk.shape[0]]
    torch.mm(hidden_chunk, weight_t, out=logits)
    if bias is not None:
        logits.add_(bias)
    return logits


MIN_TILE_COLUMNS = 4096
"""The narrowest vocabulary tile of the LMF forward (:func:`lmf_tile`): past it, tokens are split into chunks instead,
so every GEMM stays wide (at 2048 tokens on the CPU target, tiles of ~4000 and ~16000 columns ran alike)."""


def lmf_tile(chunk_size, n_tokens, vocab_size, bytes_per_logit, weight):
    """Tokens and vocabulary columns per GEMM of the LMF forward, in the logits buffer that
    :func:`~ceu_kernels.contract.chunk_rows` sizes (its rows by the whole vocabulary).

    With ``chunk_size`` given, or when every token fits those rows: that many tokens by the whole vocabulary.
    Otherwise the same buffer is shaped as every token (or as many as :data:`MIN_TILE_COLUMNS` allow) by a
    vocabulary tile: a GEMM of many tokens against part of the weight packs each weight row once per call instead
    of once per token chunk (2048 tokens on the CPU target: 24% less time for the same buffer)."""
    rows = chunk_rows(chunk_size, vocab_size, bytes_per_logit, weight)
    if chunk_size is not None or n_tokens <= rows:
        return min(rows, max(n_tokens, 1)), vocab_size
    budget = rows * vocab_size
    columns = min(vocab_size, max(MIN_TILE_COLUMNS, budget // n_tokens))
    return min(n_tokens, max(1, budget // columns)), columns


def lmf_forward(hidden, weight, bias, vocab_size, chunk_size):
    """Per-token max and first-index argmax of ``hidden @ weight[:vocab_size].T + bias``, a tile of tokens by
    vocabulary columns at a time (:func:`lmf_tile`). A later vocabulary tile replaces a token's running max only
    where :func:`first_max` says, so the first index wins as in ``torch.max``."""
    n_tokens = hidden.shape[0]
    rows, columns = lmf_tile(chunk_size, n_tokens, vocab_size, hidden.element_size(), weight)
    (buffer,) = chunk_buffers(hidden, ((rows * columns,), hidden.dtype), grow=False)
    row_max = hidden.new_empty(n_tokens)
    argmax = torch.empty(n_tokens, dtype=torch.int64, device=hidden.device)
    tile_max, tile_argmax = torch.empty_like(row_max[:rows]), torch.empty_like(argmax[:rows])
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        for first in range(0, vocab_size, columns):
            last = min(first + columns, vocab_size)
            tile = buffer[: (stop - start) * (last - first)].view(stop - start, last - first)
            logits = _chunk_logits(tile, hidden[start:stop], weight[first:last].t(),
                                   None if bias is None else bias[first:last])
            if first == 0:
                row_max_argmax(logits, row_max[start:stop], argmax[start:stop])
                continue
            row_max_argmax(logits, tile_max[: stop - start], tile_argmax[: stop - start])
            merged_max, merged_argmax = first_max(row_max[start:stop], argmax[start:stop],
                                                  tile_max[: stop - start], tile_argmax[: stop - start] + first)
            row_max[start:stop], argmax[start:stop] = merged_max, merged_argmax
    return row_max.to(stat_dtype(hidden.dtype)), argmax


def first_max(value, index, later_value, later_index):
    """Row maxima and their indices over earlier columns merged with those over later columns by ``torch.max``'s
    rule: the later ones win only where strictly larger, or NaN against a number."""
    later = (later_value > value) | (later_value.isnan() & ~value.isnan())
    return torch.where(later, later_value, value), torch.where(later, later_index, index)


ARGMAX_BLOCK = 128
"""Columns per block of :func:`row_max_argmax`."""


def row_max_argmax(logits, row_max, argmax):
    """``torch.max(logits, dim=1)`` into ``row_max`` and ``argmax``: the same values and indices (the first index of
    the max; the first NaN in a row holding one) in less time. On the CPU ``torch.max`` with indices is a scalar
    loop, 7x the time of the vectorised ``amax``; so ``amax`` over blocks of :data:`ARGMAX_BLOCK` columns, then
    ``argmax`` over the few block maxima finds the first block holding the row's max, and only that block is searched
    for the index. Columns past the last whole block are a tail merged by :func:`first_max`."""
    whole = logits.shape[1] - logits.shape[1] % ARGMAX_BLOCK
    if whole == 0:
        torch.max(logits, dim=1, out=(row_max, argmax))
        return
    block_max = logits[:, :whole].unflatten(1, (whole // ARGMAX_BLOCK, ARGMAX_BLOCK)).amax(dim=2)
    first_block = block_max.argmax(dim=1)
    columns = first_block[:, None] * ARGMAX_BLOCK + torch.arange(ARGMAX_BLOCK, device=logits.device)
    value, index = logits.gather(1, columns).max(dim=1)
    index += first_block * ARGMAX_BLOCK
    if whole < logits.shape[1]:
        tail_value, tail_index = logits[:, whole:].max(dim=1)
        value, index = first_max(value, index, tail_value, tail_index + whole)
    row_max.copy_(value)
    argmax.copy_(index)


def lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size, needs_hidden, needs_weight, needs_bias):
    """Closed-form LMF gradients (see the contract): gathers and one scatter, no GEMM, no logits; dW and db are
    written once in the weight's dtype by :func:`rank_one_plus_scatter`.

    dW comes first; its ``[tokens, H]`` scaled hidden states are then overwritten by dh (same dtype: float32 and
    float64 inputs), so the peak is the returned gradients and nothing else."""
    acc = coef.dtype
    picked = (argmax >= 0) & (argmax < vocab_size)
    rows = torch.where(picked, argmax, weight.shape[0])  # one past the last row: a scratch row, dropped
    grad_hidden = grad_weight = grad_bias = scaled_hidden = None
    if needs_weight:
        scaled_hidden = coef[:, None] * hidden.to(acc)
        grad_weight = rank_one_plus_scatter(rows, scaled_hidden, scaled_hidden.sum(0) / -vocab_size,
                                            weight.shape[0], vocab_size, weight.dtype)
    if needs_bias:
        grad_bias = rank_one_plus_scatter(rows, coef, coef.sum() / -vocab_size, weight.shape[0], vocab_size,
                                          weight.dtype)
    if needs_hidden:
        reuse = scaled_hidden if scaled_hidden is not None and scaled_hidden.dtype == weight.dtype else None
        grad_hidden = torch.index_select(weight, 0, torch.where(picked, argmax, 0), out=reuse).to(acc)
        grad_hidden = grad_hidden.sub_(weight_mean).mul_(torch.where(picked, coef, float("nan"))[:, None])
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def rank_one_plus_scatter(rows, values, rank_one, n_rows, vocab_size, dtype):
    """``rank_one`` on every real row (``< vocab_size``) plus the sum of ``values`` scattered by ``rows``, written
    once in ``dtype`` into ``n_rows`` rows; ``rows == n_rows`` marks a value to drop. Also the vocab-parallel LMF
    backward's dW and db.

    In ``values``' dtype the sums go straight into the output. In a narrower ``dtype`` only the touched rows (at most
    one per token) are summed in ``values``' precision, in one slot per distinct row found by sorting (no host
    sync), so a half-precision dW needs no float32 ``[V, H]`` accumulator: the output is the only ``[V, H]`` tensor
    (plus the scratch row).
    """
    out = values.new_empty((n_rows + 1, *values.shape[1:]), dtype=dtype)
    out[:vocab_size] = rank_one.to(dtype)
    out[vocab_size:] = 0
    if dtype == values.dtype:
        return out.index_add_(0, rows, values)[:n_rows]
    sorted_rows, order = rows.sort()
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    slot = torch.empty_like(rows).index_copy_(0, order, starts.cumsum(0) - 1)
    sums = values.new_zeros(values.shape).index_add_(0, slot, values)
    slot_row = torch.full_like(rows, n_rows).index_copy_(0, slot, rows)  # unused slots: the scratch row
    out.index_put_((slot_row,), (sums.add_(rank_one)).to(dtype))
    return out[:n_rows]


def _ce_buffers(hidden, weight, vocab_size, chunk_size, upcast=True):
    """The reused chunk buffers: logits in the input dtype and, for half inputs when ``upcast``, a float32 copy for
    the softmax (else the same buffer twice)."""
    half = upcast and hidden.dtype in (torch.float16, torch.bfloat16)
    bytes_per_logit = hidden.element_size() + (4 if half else 0)
    rows = min(chunk_rows(chunk_size, vocab_size, bytes_per_logit, weight, CE_CHUNK_WEIGHTS), max(hidden.shape[0], 1))
    shape = (rows, vocab_size)
    buffers = chunk_buffers(hidden, (shape, hidden.dtype), *([(shape, torch.float32)] if half else []))
    return rows, buffers[0], buffers[-1]


def _chunk_logits_acc(buffer, buffer_acc, hidden_chunk, weight_t, bias):
    logits = _chunk_logits(buffer, hidden_chunk, weight_t, bias)
    if buffer_acc is buffer:
        return logits
    return buffer_acc[: logits.shape[0]].copy_(logits)


def ce_forward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size):
    """Per-token cross-entropy (0 where ``labels == ignore_index``) and the log-sum-exp, a chunk at a time."""
    n_tokens = hidden.shape[0]
    weight_t = weight[:vocab_size].t()
    bias = None if bias is None else bias[:vocab_size]
    rows, buffer, buffer_acc = _ce_buffers(hidden, weight, vocab_size, chunk_size)
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0).long()
    lse = torch.empty(n_tokens, dtype=buffer_acc.dtype, device=hidden.device)
    target_logit = torch.empty_like(lse)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        logits = _chunk_logits_acc(buffer, buffer_acc, hidden[start:stop], weight_t, bias)
        torch.logsumexp(logits, dim=1, out=lse[start:stop])
        target_logit[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1)
    per_token = torch.where(valid, lse - target_logit, 0.0)
    return per_token, lse


def ce_backward(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size,
                needs_hidden, needs_weight, needs_bias):
    """Recompute each chunk's logits, turn them in place into ``grad * (softmax - onehot)``, and run the two GEMMs."""
    n_tokens = hidden.shape[0]
    weight_real = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size]
    rows, buffer, buffer_acc = _ce_buffers(hidden, weight, vocab_size, chunk_size)
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0).long()
    token_grad = torch.where(valid, grad, 0.0).to(buffer_acc.dtype)
    acc = buffer_acc.dtype
    found = _ce_gradient_outputs(hidden, weight, acc, needs_hidden, needs_weight, needs_bias)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        hidden_chunk = hidden[start:stop]
        dlogits = _chunk_logits_acc(buffer, buffer_acc, hidden_chunk, weight_real.t(), bias)
        dlogits.sub_(lse[start:stop, None]).exp_()
        dlogits.scatter_add_(1, targets[start:stop, None], -valid[start:stop, None].to(acc))
        dlogits.mul_(token_grad[start:stop, None])
        _chunk_gradients(dlogits, buffer, hidden_chunk, weight_real, start, found)
    grad_hidden, grad_weight, grad_bias = found
    grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
    return grad_hidden, grad_weight, grad_bias


def softmax_minus_onehot_(logits, labels, ignore_index, loss, lse):
    """The torch backend's row step of :func:`fused_ce_loop`: the target logit and the row max, then the logits
    become the softmax in place (``torch.softmax``: the one exponential pass, row by row in cache) and
    ``softmax - onehot`` at the counted tokens; the log-sum-exp is ``max - log(largest probability)`` (that
    probability is ``1 / sum(exp(z - max))``, never below ``1/V``), exact where the target's probability underflows.
    Ignored rows are left as the plain softmax: the 0/1 counted-token vector it returns masks them on the small
    operands, never by another pass over the logits."""
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0).long()[:, None]
    counted = valid.to(logits.dtype)
    target_logit = logits.gather(1, targets).squeeze(1)
    row_max = logits.amax(dim=1)
    probs = torch.softmax(logits, dim=1, out=logits)
    torch.sub(row_max, probs.amax(dim=1).log(), out=lse)
    probs.scatter_add_(1, targets, -counted[:, None])
    torch.sub(lse, target_logit, out=loss).masked_fill_(~valid, 0.0)
    return counted


def fused_ce_loop(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden, needs_weight,
                  needs_bias, *, row_step, upcast):
    """``ce_forward_backward`` of every backend that has one: per token chunk, the logits by one GEMM, then
    ``row_step`` turns them in place into ``dlogits`` of the sum of the per-token losses (one exponential pass),
    then ``dh = dlogits @ W`` and ``dW += dlogits.T @ h``: three GEMMs in all against four for a forward and a
    backward that recomputes. Written once; the backends differ only in the row step.

    ``row_step(logits, labels, ignore_index, loss, lse)`` writes the chunk's per-token loss (0 at ignored tokens)
    and log-sum-exp (statistics dtype) and rewrites ``logits`` into ``softmax - onehot(label)``; it returns None when
    it zeroed the ignored rows itself (a kernel, at no cost), else a per-token 0/1 vector that the gradients apply
    on the small operands (dh's rows, hidden's rows, db's vector). ``upcast``: half-precision logits are copied
    into a float32 buffer for the row step (the torch path); else the row step reads and writes them in the input
    dtype (computing in float32), and dW and db still accumulate in the statistics dtype.
    ``dW`` and ``db`` come back in the statistics dtype (:func:`~ceu_kernels.contract.stat_dtype`), ``dh`` in
    hidden's dtype.
    """
    n_tokens = hidden.shape[0]
    weight_real = weight[:vocab_size]
    weight_t = weight_real.t()
    bias = None if bias is None else bias[:vocab_size]
    rows, buffer, buffer_acc = _ce_buffers(hidden, weight, vocab_size, chunk_size, upcast)
    acc = stat_dtype(hidden.dtype)
    labels = labels.long().contiguous()
    loss = torch.empty(n_tokens, dtype=acc, device=hidden.device)
    lse = torch.empty_like(loss)
    found = _ce_gradient_outputs(hidden, weight, acc, needs_hidden, needs_weight, needs_bias)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        logits = _chunk_logits_acc(buffer, buffer_acc, hidden[start:stop], weight_t, bias)
        row_scale = row_step(logits, labels[start:stop], ignore_index, loss[start:stop], lse[start:stop])
        _chunk_gradients(logits, buffer, hidden[start:stop], weight_real, start, found, row_scale)
    return loss, lse, *found


def ce_forward_backward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size,
                        needs_hidden, needs_weight, needs_bias):
    """:func:`ce_forward` and the gradients of the sum of the per-token losses in one pass over the logits:
    :func:`fused_ce_loop` with the PyTorch row step :func:`softmax_minus_onehot_`."""
    return fused_ce_loop(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size, needs_hidden,
                         needs_weight, needs_bias, row_step=softmax_minus_onehot_, upcast=True)


def _ce_gradient_outputs(hidden, weight, acc, needs_hidden, needs_weight, needs_bias):
    """The gradient outputs the chunk loop fills: dh in hidden's dtype, dW and db in the accumulator dtype, zeroed
    (dW written by its first chunk's GEMM instead when there is at least one token, the padded rows zeroed)."""
    grad_weight = None
    if needs_weight:
        allocate = torch.zeros if hidden.shape[0] == 0 else torch.empty
        grad_weight = allocate(weight.shape, dtype=acc, device=weight.device)
    return (torch.empty_like(hidden) if needs_hidden else None, grad_weight,
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs_bias else None)


def _chunk_gradients(dlogits, buffer, hidden_chunk, weight_real, start, found, row_scale=None):
    """One chunk's share of the gradients from its ``dlogits`` (the accumulator dtype, or the inputs' dtype from a
    row step that does not upcast), each row scaled by ``row_scale`` (per token, accumulator dtype) when given: its
    rows of dh (GEMM in the inputs' dtype, through ``buffer`` for upcast half inputs) and its addition to dW and db
    (accumulator dtype) on the real rows. The scale goes on the small operands (dh's rows, hidden's rows, db's
    vector), never on ``dlogits``."""
    grad_hidden, grad_weight, grad_bias = found
    vocab_size = weight_real.shape[0]
    if grad_hidden is not None:
        dlogits_in = dlogits if buffer.dtype == dlogits.dtype else buffer[: dlogits.shape[0]].copy_(dlogits)
        grad_rows = grad_hidden[start:start + dlogits.shape[0]]
        torch.mm(dlogits_in, weight_real, out=grad_rows)
        if row_scale is not None:
            grad_rows.mul_(row_scale[:, None])
    if grad_weight is not None:
        hidden_in = hidden_chunk.to(dlogits.dtype)
        if row_scale is not None:
            hidden_in = hidden_in * row_scale[:, None]
        # the first chunk writes dW (empty until now), the others add to it
        gemm_into(grad_weight[:vocab_size], dlogits.t(), hidden_in, accumulate=start > 0)
        if start == 0:
            grad_weight[vocab_size:] = 0
    if grad_bias is not None:
        if row_scale is None:
            grad_bias[:vocab_size] += dlogits.sum(0, dtype=grad_bias.dtype)
        else:
            grad_bias[:vocab_size].addmv_(dlogits.t(), row_scale)


def gemm_into(out, a, b, accumulate):
    """``out = a @ b`` or ``out += a @ b``, where ``out`` may be float32 for half operands: on a GPU cuBLAS then
    accumulates in float32 (``out_dtype``); the CPU has no such GEMM (only the Triton interpreter brings half
    operands here), so it upcasts them."""
    if out.dtype != a.dtype and not a.is_cuda:
        a, b = a.to(out.dtype), b.to(out.dtype)
    mixed = {} if out.dtype == a.dtype else {"out_dtype": out.dtype}
    if accumulate:
        torch.addmm(out, a, b, out=out, **mixed)
    else:
        torch.mm(a, b, out=out, **mixed)
