"""Fused LM-head cross-entropy for the retain loss: matches ``F.cross_entropy(hidden @ weight.T + bias, labels)``
without holding ``[tokens, V]`` logits; the backward recomputes each chunk's logits.
"""
import torch

from . import backends, checks, ops
from .lmf import autocast_disabled, backward_without_autocast
from .reference import reduce_tokens


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-token cross-entropy on flattened inputs (0 at ``ignore_index``); saves the log-sum-exp per token and keeps
    the name of the ``backend`` (chosen by the caller) for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size):
        loss, lse = ops.ce_forward(hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.config = (vocab_size, ignore_index, backend, chunk_size)
        return loss

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        vocab_size, ignore_index, backend, chunk_size = ctx.config
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grads = ops.ce_backward(grad_loss, lse, hidden, weight, bias, labels, vocab_size, ignore_index, backend,
                                chunk_size, needs_hidden, needs_weight, needs_bias)
        grads = [grad if need else None for grad, need in zip(grads, ctx.needs_input_grad)]
        return (*grads, None, None, None, None, None)


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean", impl="auto",
                         chunk_size=None, vocab_size=None):
    """Cross-entropy of the LM head ``z = hidden @ weight.T + bias`` against ``labels`` without materialising z.

    Conventions as :func:`ceu.linear_lmf_loss`; tokens whose label is ``ignore_index`` are masked. Unlike
    ``F.cross_entropy``, a batch with every label ignored gives 0 for ``"mean"`` (not NaN), with zero gradients.
    Labels are not shifted: pass ``labels[..., 1:]`` with ``hidden[..., :-1, :]`` for next-token prediction.
    Autocast does not change what is computed: the GEMMs run in the inputs' dtype, the softmax in float32 (float64
    for float64 inputs).
    """
    vocab_size = checks.check_head(hidden, weight, bias, vocab_size, reduction, impl, chunk_size)
    checks.check_labels(labels, hidden, vocab_size, ignore_index)
    backend = backends.choose(impl, hidden.device, "ce", hidden.dtype)  # the one backend decision of this call
    flat_labels = labels.reshape(-1)
    with autocast_disabled(hidden.device):
        loss = LinearCrossEntropyFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_labels,
                                                vocab_size, ignore_index, backend, chunk_size)
        loss = reduce_tokens(loss, flat_labels != ignore_index, reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`; holds only configuration."""

    def __init__(self, ignore_index=-100, reduction="mean", impl="auto", chunk_size=None, vocab_size=None):
        super().__init__()
        self.ignore_index, self.reduction, self.impl = ignore_index, reduction, impl
        self.chunk_size, self.vocab_size = chunk_size, vocab_size

    def forward(self, hidden, weight, labels, bias=None):
        return linear_cross_entropy(hidden, weight, labels, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, impl=self.impl, chunk_size=self.chunk_size,
                                    vocab_size=self.vocab_size)

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, impl={self.impl!r}"
