"""The fused LM-head LMF forget loss: ``(max_j z_j - mean_j z_j)**2`` with ``z = W h + b``, never materialising z.

The mean needs no GEMM: ``mean_j z_j = h . w_mean + b_mean``. The forward's only GEMM feeds a running max/argmax;
the backward is the closed form ``dlogits = c (onehot(argmax) - 1/V)`` with ``c = 2 g (max - mean)``.

The path of one call: :func:`linear_lmf_loss` checks its arguments and chooses the backend once
(:func:`ceu.backends.choose`, a name such as ``"triton"``); :class:`LinearLMFFunction` runs the backend's
``lmf_forward`` through the custom op :func:`ceu.ops.lmf_forward` for (max, argmax), computes the mean, gap and
masked square itself, and keeps the backend's name on ``ctx``; its backward hands ``c`` to the same backend's
``lmf_backward`` through :func:`ceu.ops.lmf_backward`. The backends and their contract are in ``ceu_kernels``.
"""
import contextlib
import functools
from typing import NamedTuple

import torch

from ceu_kernels.contract import stat_dtype

from . import backends, checks, ops
from .reference import reduce_tokens


class LMFStats(NamedTuple):
    """Per-token statistics of the logits (shaped like ``hidden.shape[:-1]``), computed by the forward anyway."""

    max: torch.Tensor
    mean: torch.Tensor
    argmax: torch.Tensor


UPCAST_CHUNK_BYTES = 8 * 2**20
"""Bound on the float32 copy of half-precision hidden states that :func:`hidden_dot` makes at a time."""


def autocast_disabled(device):
    """Autocast off for ``device``'s type: the fused losses compute in their inputs' dtype whatever the caller's
    autocast (a lowered mat-vec product would round the mean, but not the max, to bfloat16). Entered around each
    forward and inside each backward, since autograd may run the backward in or out of the caller's autocast block."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def backward_without_autocast(backward):
    """Decorates an autograd ``backward(ctx, grad, ...)`` to run under :func:`autocast_disabled` for ``grad``'s
    device, whether autograd runs it inside the caller's autocast block or not."""
    @functools.wraps(backward)
    def wrapped(ctx, grad, *more_grads):
        with autocast_disabled(grad.device):
            return backward(ctx, grad, *more_grads)
    return wrapped


def hidden_dot(hidden, vector):
    """``hidden @ vector`` accumulated in ``vector``'s dtype, upcasting half-precision hidden states a chunk at a
    time so that no full float32 copy of ``hidden`` is ever made."""
    if hidden.dtype == vector.dtype:
        return hidden @ vector
    rows = max(1, UPCAST_CHUNK_BYTES // (hidden.shape[1] * vector.element_size()))
    out = vector.new_empty(hidden.shape[0])
    for start in range(0, hidden.shape[0], rows):
        torch.mv(hidden[start:start + rows].to(vector.dtype), vector, out=out[start:start + rows])
    return out


def column_sum(matrix, dtype):
    """``matrix.sum(0)`` accumulated in ``dtype``. On the CPU, ``sum(dtype=...)`` of a half-precision matrix first
    copies all of it to ``dtype`` (a float32 copy of a bfloat16 LM head is twice the head), so there the rows are
    upcast ``UPCAST_CHUNK_BYTES`` at a time; a GPU reduction casts as it reads."""
    if matrix.dtype == dtype or matrix.is_cuda:
        return matrix.sum(0, dtype=dtype)
    rows = max(1, UPCAST_CHUNK_BYTES // (matrix.shape[1] * torch.finfo(dtype).bits // 8))
    total = matrix.new_zeros(matrix.shape[1], dtype=dtype)
    for start in range(0, matrix.shape[0], rows):
        total += matrix[start:start + rows].sum(0, dtype=dtype)
    return total


def masked_square(gap, mask):
    """The per-token loss from the gap ``max - mean``: zero where ``mask`` is False."""
    loss = gap.square()
    return loss if mask is None else torch.where(mask, loss, 0.0)


def gap_coefficient(grad_loss, gap, mask):
    """``c = dloss/dgap = 2 g (max - mean)``, zero at masked tokens."""
    coef = 2 * grad_loss.to(gap.dtype) * gap
    return coef if mask is None else torch.where(mask, coef, 0.0)


def finish(loss, row_max, row_mean, argmax, flat_mask, lead_shape, reduction, return_stats):
    """Reduce the per-token loss and restore the caller's leading shape on everything returned."""
    loss = reduce_tokens(loss, flat_mask, reduction)
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    if not return_stats:
        return loss
    return loss, LMFStats(row_max.reshape(lead_shape), row_mean.reshape(lead_shape), argmax.reshape(lead_shape))


class LinearLMFFunction(torch.autograd.Function):
    """Per-token LMF loss on flattened inputs, zero where ``mask`` is False; returns ``(loss, max, mean, argmax)``.

    Saves only the argmax, the gap ``max - mean`` per token and the weight's row mean, beside the inputs themselves,
    and the name of the ``backend`` (chosen by the caller) that the backward must use too.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, mask, vocab_size, backend, chunk_size):
        acc = stat_dtype(hidden.dtype)
        weight_mean = column_sum(weight[:vocab_size], acc) / vocab_size
        row_max, argmax = ops.lmf_forward(hidden, weight, bias, vocab_size, backend, chunk_size)
        row_mean = hidden_dot(hidden, weight_mean)
        if bias is not None:
            row_mean += bias[:vocab_size].sum(dtype=acc) / vocab_size
        gap = row_max - row_mean
        loss = masked_square(gap, mask)
        ctx.save_for_backward(hidden, weight, argmax, gap, weight_mean, mask)
        ctx.vocab_size, ctx.backend = vocab_size, backend
        ctx.mark_non_differentiable(row_max, row_mean, argmax)
        return loss, row_max, row_mean, argmax

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_loss, *_):
        hidden, weight, argmax, gap, weight_mean, mask = ctx.saved_tensors
        coef = gap_coefficient(grad_loss, gap, mask)
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grads = ops.lmf_backward(coef, argmax, hidden, weight, weight_mean, ctx.vocab_size, ctx.backend,
                                 needs_hidden, needs_weight, needs_bias)
        grads = [grad if need else None for grad, need in zip(grads, ctx.needs_input_grad)]
        return (*checks.not_twice_differentiable(grads, "ceu.linear_lmf_loss"), None, None, None, None)


def linear_lmf_loss(hidden, weight, bias=None, *, mask=None, reduction="mean", impl="auto", chunk_size=None,
                    vocab_size=None, return_stats=False):
    """LMF forget loss of the LM head ``z = hidden @ weight.T + bias`` without materialising the logits.

    Args:
        hidden: ``[..., H]`` final hidden states (float16, bfloat16, float32 or float64).
        weight: ``[V, H]`` LM-head weight (may be tied to the input embeddings); same dtype and device as hidden.
        bias: optional ``[V]``.
        mask: optional bool ``[...]``; True marks a token that counts. Masked tokens contribute 0 and get 0 gradient.
        reduction: ``"mean"`` over counted tokens (0 when none is counted), ``"sum"``, or ``"none"`` (per token).
        impl: ``"auto"`` (fastest available for the device), ``"torch"`` (chunked PyTorch), ``"triton"``, ``"cuda"``.
        chunk_size: tokens per GEMM chunk; default: the most whose logits fit both a memory budget
            (``ceu_kernels.contract.CHUNK_BUDGET_BYTES``) and the size of the weight (see ``contract.chunk_rows``).
        vocab_size: real vocabulary size when the last ``V - vocab_size`` rows of ``weight`` are padding.
        return_stats: also return :class:`LMFStats` (per-token max, mean, first-index argmax).

    Returns:
        The loss (float32, or float64 for float64 inputs), and the stats when ``return_stats`` is True.

    Autocast does not change what is computed: the GEMM runs in the inputs' dtype and the statistics in float32
    (float64 for float64 inputs), with the same value and gradients as without autocast.
    """
    vocab_size = checks.check_head(hidden, weight, bias, vocab_size, reduction, impl, chunk_size)
    checks.check_mask(mask, hidden)
    backend = backends.choose(impl, hidden.device, "lmf", hidden.dtype)  # the one backend decision of this call
    lead_shape = hidden.shape[:-1]
    flat_mask = None if mask is None else mask.reshape(-1)
    with autocast_disabled(hidden.device):
        loss, row_max, row_mean, argmax = LinearLMFFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_mask, vocab_size, backend, chunk_size)
        return finish(loss, row_max, row_mean, argmax, flat_mask, lead_shape, reduction, return_stats)


class LinearLMFLoss(torch.nn.Module):
    """Module form of :func:`linear_lmf_loss`; holds only configuration."""

    def __init__(self, reduction="mean", impl="auto", chunk_size=None, vocab_size=None):
        super().__init__()
        self.reduction, self.impl, self.chunk_size, self.vocab_size = reduction, impl, chunk_size, vocab_size

    def forward(self, hidden, weight, bias=None, mask=None):
        return linear_lmf_loss(hidden, weight, bias, mask=mask, reduction=self.reduction, impl=self.impl,
                               chunk_size=self.chunk_size, vocab_size=self.vocab_size)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, impl={self.impl!r}, chunk_size={self.chunk_size}"
