"""The token-chunked PyTorch backend (``impl="torch"``, CPU and GPU): the fused losses without ever holding
``[tokens, V]`` logits, following :class:`ceu_kernels.contract.Backend`.

Each chunk of tokens runs one GEMM into a logits buffer that is allocated once and reused, so the extra memory is
bounded by ``CHUNK_BUDGET_BYTES`` whatever the number of tokens. The LMF backward is the closed form and runs no GEMM.
The GEMMs run in the inputs' dtype, so half-precision logits are rounded before the max and the softmax.

It lives in ``ceu_kernels`` because it is a backend like the Triton and CUDA ones, selected by the same name
registry and held to the same contract; ``ceu.chunked`` still imports it for existing callers. Plain PyTorch only:
it is also the CPU path and, with ``ceu.reference``, what the other backends are tested against.
"""
import torch

from .contract import chunk_rows, stat_dtype


def _chunk_logits(buffer, hidden_chunk, weight_t, bias):
    """One GEMM of a token chunk into the front of the reused buffer (plus bias, in place)."""
    logits = buffer[: hidden_chunk.shape[0]]
    torch.mm(hidden_chunk, weight_t, out=logits)
    if bias is not None:
        logits.add_(bias)
    return logits


def lmf_forward(hidden, weight, bias, vocab_size, chunk_size):
    """Per-token max and first-index argmax of ``hidden @ weight[:vocab_size].T + bias``, a chunk at a time."""
    n_tokens = hidden.shape[0]
    weight_t = weight[:vocab_size].t()
    bias = None if bias is None else bias[:vocab_size]
    rows = min(chunk_rows(chunk_size, vocab_size, hidden.element_size()), max(n_tokens, 1))
    buffer = hidden.new_empty(rows, vocab_size)
    row_max = hidden.new_empty(n_tokens)
    argmax = torch.empty(n_tokens, dtype=torch.int64, device=hidden.device)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        logits = _chunk_logits(buffer, hidden[start:stop], weight_t, bias)
        torch.max(logits, dim=1, out=(row_max[start:stop], argmax[start:stop]))
    return row_max.to(stat_dtype(hidden.dtype)), argmax


def lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size, needs_hidden, needs_weight, needs_bias):
    """Closed-form LMF gradients (see the contract): gathers and one scatter, no GEMM, no logits; dW and db are
    written once in the weight's dtype by :func:`rank_one_plus_scatter`."""
    acc = coef.dtype
    picked = (argmax >= 0) & (argmax < vocab_size)
    grad_hidden = grad_weight = grad_bias = None
    if needs_hidden:
        rows = torch.where(picked, argmax, 0)
        scale = torch.where(picked, coef, float("nan"))
        grad_hidden = (scale[:, None] * (weight.index_select(0, rows).to(acc) - weight_mean)).to(hidden.dtype)
    rows = torch.where(picked, argmax, weight.shape[0])  # one past the last row: a scratch row, dropped
    if needs_weight:
        scaled_hidden = coef[:, None] * hidden.to(acc)
        grad_weight = rank_one_plus_scatter(rows, scaled_hidden, scaled_hidden.sum(0) / -vocab_size,
                                            weight.shape[0], vocab_size, weight.dtype)
    if needs_bias:
        grad_bias = rank_one_plus_scatter(rows, coef, coef.sum() / -vocab_size, weight.shape[0], vocab_size,
                                          weight.dtype)
    return grad_hidden, grad_weight, grad_bias


def rank_one_plus_scatter(rows, values, rank_one, n_rows, vocab_size, dtype):
    """``rank_one`` on every real row (``< vocab_size``) plus the sum of ``values`` scattered by ``rows``, written
    once in ``dtype`` into ``n_rows`` rows; ``rows == n_rows`` marks a value to drop. Also the vocab-parallel LMF
    backward's dW and db.

    Only the touched rows (at most one per token) are summed in ``values``' precision, so a half-precision dW needs
    no float32 ``[V, H]`` accumulator: the output is the only ``[V, H]`` tensor (plus the scratch row).
    """
    touched, slot = torch.unique(rows, return_inverse=True)
    sums = values.new_zeros((touched.shape[0], *values.shape[1:])).index_add_(0, slot, values)
    out = torch.zeros((n_rows + 1, *values.shape[1:]), dtype=dtype, device=values.device)
    out[:vocab_size] = rank_one.to(dtype)
    out[touched] = (sums + rank_one).to(dtype)
    return out[:n_rows]


def _ce_buffers(hidden, vocab_size, chunk_size):
    """The reused chunk buffers: logits in the input dtype and, for half inputs, a float32 copy for the softmax."""
    half = hidden.dtype in (torch.float16, torch.bfloat16)
    bytes_per_logit = hidden.element_size() + (4 if half else 0)
    rows = min(chunk_rows(chunk_size, vocab_size, bytes_per_logit), max(hidden.shape[0], 1))
    buffer = hidden.new_empty(rows, vocab_size)
    buffer_acc = buffer.new_empty(rows, vocab_size, dtype=torch.float32) if half else buffer
    return rows, buffer, buffer_acc


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
    rows, buffer, buffer_acc = _ce_buffers(hidden, vocab_size, chunk_size)
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
    rows, buffer, buffer_acc = _ce_buffers(hidden, vocab_size, chunk_size)
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


def ce_forward_backward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size,
                        needs_hidden, needs_weight, needs_bias):
    """:func:`ce_forward` and the gradients of the sum of the per-token losses in one pass over the logits.

    Each chunk's logits give the target logit and the row max, then become the softmax in place
    (``torch.softmax``: the one exponential pass, row by row in cache) and ``softmax - onehot`` at the counted
    tokens; the log-sum-exp is ``max - log(largest probability)`` (that probability is ``1 / sum(exp(z - max))``,
    never below ``1/V``), exact where the target's probability underflows.
    The two gradient GEMMs run on the chunk at once, three GEMMs in all against four for :func:`ce_forward` then
    :func:`ce_backward`. Ignored tokens are masked on the small operands (their ``dh`` rows and ``hidden`` rows for
    ``dW``, a 0/1 vector for ``db``), never by another pass over the logits. ``dW`` and ``db`` come back in the
    accumulator dtype (:func:`~ceu_kernels.contract.stat_dtype`), ``dh`` in hidden's dtype.
    """
    n_tokens = hidden.shape[0]
    weight_real = weight[:vocab_size]
    weight_t = weight_real.t()
    bias = None if bias is None else bias[:vocab_size]
    rows, buffer, buffer_acc = _ce_buffers(hidden, vocab_size, chunk_size)
    acc = buffer_acc.dtype
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0).long()
    counted = valid.to(acc)
    lse = torch.empty(n_tokens, dtype=acc, device=hidden.device)
    target_logit = torch.empty_like(lse)
    found = _ce_gradient_outputs(hidden, weight, acc, needs_hidden, needs_weight, needs_bias)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        chunk_targets = targets[start:stop, None]
        logits = _chunk_logits_acc(buffer, buffer_acc, hidden[start:stop], weight_t, bias)
        target_logit[start:stop] = logits.gather(1, chunk_targets).squeeze(1)
        row_max = logits.amax(dim=1)
        probs = torch.softmax(logits, dim=1, out=logits)  # in place: the one exponential pass
        torch.sub(row_max, probs.amax(dim=1).log(), out=lse[start:stop])  # the largest probability is 1 / sum
        probs.scatter_add_(1, chunk_targets, -counted[start:stop, None])
        _chunk_gradients(probs, buffer, hidden[start:stop], weight_real, start, found, counted[start:stop])
    per_token = torch.where(valid, lse - target_logit, 0.0)
    return per_token, lse, *found


def _ce_gradient_outputs(hidden, weight, acc, needs_hidden, needs_weight, needs_bias):
    """The gradient outputs the chunk loop fills: dh in hidden's dtype, dW and db in the accumulator dtype, zeroed
    (dW written by its first chunk's GEMM instead when there is at least one token, the padded rows zeroed)."""
    grad_weight = None
    if needs_weight:
        if hidden.shape[0] == 0:
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        else:
            grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device)
    return (torch.empty_like(hidden) if needs_hidden else None, grad_weight,
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs_bias else None)


def _chunk_gradients(dlogits, buffer, hidden_chunk, weight_real, start, found, row_scale=None):
    """One chunk's share of the gradients from its ``dlogits`` (accumulator dtype), each row scaled by
    ``row_scale`` (per token, accumulator dtype) when given: its rows of dh (GEMM in the inputs' dtype, through
    ``buffer`` for half inputs) and its addition to dW and db on the real rows. The scale goes on the small operands
    (dh's rows, hidden's rows, db's vector), never on ``dlogits``."""
    grad_hidden, grad_weight, grad_bias = found
    vocab_size = weight_real.shape[0]
    if grad_hidden is not None:
        dlogits_in = dlogits if buffer.dtype == dlogits.dtype else buffer[: dlogits.shape[0]].copy_(dlogits)
        grad_rows = grad_hidden[start:start + dlogits.shape[0]]
        torch.mm(dlogits_in, weight_real, out=grad_rows)
        if row_scale is not None:
            grad_rows.mul_(row_scale[:, None])
    if grad_weight is not None:
        hidden_acc = hidden_chunk.to(dlogits.dtype)
        if row_scale is not None:
            hidden_acc = hidden_acc * row_scale[:, None]
        if start == 0:  # the first chunk writes dW (empty until now), the others add to it
            torch.mm(dlogits.t(), hidden_acc, out=grad_weight[:vocab_size])
            grad_weight[vocab_size:] = 0
        else:
            grad_weight[:vocab_size].addmm_(dlogits.t(), hidden_acc)
    if grad_bias is not None:
        if row_scale is None:
            grad_bias[:vocab_size] += dlogits.sum(0)
        else:
            grad_bias[:vocab_size].addmv_(dlogits.t(), row_scale)
