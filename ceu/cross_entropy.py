"""Fused LM-head cross-entropy for the retain loss: matches ``F.cross_entropy(hidden @ weight.T + bias, labels)``
without holding ``[tokens, V]`` logits. For the scalar reductions on a backend that can (today every backend), the
gradients are formed in the forward from the same logits and the backward only scales them; otherwise the backward
recomputes each chunk's logits.
"""
import torch

from ceu_kernels.contract import fuses_ce_gradients

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
        return (*checks.not_twice_differentiable(grads, "ceu.linear_cross_entropy"), None, None, None, None, None)


class LinearCrossEntropyGradsInForwardFunction(torch.autograd.Function):
    """The scalar reductions (``"mean"``, ``"sum"``) when a gradient is needed, on a backend that forms gradients in
    its forward (:func:`ceu_kernels.contract.fuses_ce_gradients`): returns the reduced loss and saves ``dh``, ``dW``
    and ``db`` of it (dW and db in the accumulator dtype); the backward multiplies them by the upstream scalar.

    When the graph is freed after this backward (no ``retain_graph``, no ``create_graph``, not traced), it scales
    them in place and hands them over: autograd releases the saved tensors before the weight's ``AccumulateGrad``
    runs, which then takes ``dW`` itself as ``.grad`` (or adds it to an existing one), with no head-sized copy in
    time or memory. Otherwise it scales a copy, so a second backward gives the same gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size, reduction,
                needs_hidden, needs_weight, needs_bias):
        valid = labels != ignore_index
        per_token, _, grad_hidden, grad_weight, grad_bias = ops.ce_forward_backward(
            hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size, needs_hidden, needs_weight,
            needs_bias)
        loss = reduce_tokens(per_token, valid, reduction)
        # the gradients are of the sum; "mean" divides them by the count (on the device: no host sync)
        scale = (1 / valid.sum().clamp_min(1).to(loss.dtype) if reduction == "mean"
                 else torch.ones((), dtype=loss.dtype, device=loss.device))
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        return loss

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_loss):
        *saved, scale = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        hand_over = not (create_graph or torch.compiler.is_compiling()
                         or torch._C._autograd._get_current_graph_task_keep_graph())
        with torch.no_grad():
            factor = grad_loss * scale
            # handed over: scaled in place (a weight of another dtype then gets one cast); kept: one scaled copy,
            # written straight in the input's dtype (never a float32 [V, H] on the way to a bfloat16 one)
            grads = [None if not need else grad.mul_(factor).to(dtype) if hand_over
                     else torch.mul(grad, factor, out=grad.new_empty(grad.shape, dtype=dtype))
                     for grad, dtype, need in zip(saved, ctx.dtypes, ctx.needs_input_grad)]
        del saved
        if create_graph:  # the saved gradients are constants: differentiating them again must raise, not give 0
            grads = _raise_if_differentiated(grads)
        return (*grads, *[None] * 9)


def _raise_if_differentiated(grads):
    """The gradients, as outputs of a node that raises if a later backward reaches it (as ``once_differentiable``
    does, but also when the upstream gradient itself does not require grad)."""
    present = [grad for grad in grads if grad is not None]
    error = torch._C._functions.DelayedError(
        b"ceu.linear_cross_entropy is not twice differentiable: its gradients were formed in the forward", len(present))
    wrapped = error(*[grad.detach().requires_grad_() for grad in present])
    wrapped = iter((wrapped,) if isinstance(wrapped, torch.Tensor) else wrapped)  # one output comes back bare
    return [None if grad is None else next(wrapped) for grad in grads]


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean", impl="auto",
                         chunk_size=None, vocab_size=None):
    """Cross-entropy of the LM head ``z = hidden @ weight.T + bias`` against ``labels`` without materialising z.

    Conventions as :func:`ceu.linear_lmf_loss`; tokens whose label is ``ignore_index`` are masked. Unlike
    ``F.cross_entropy``, a batch with every label ignored gives 0 for ``"mean"`` (not NaN), with zero gradients.
    Labels are not shifted: pass ``labels[..., 1:]`` with ``hidden[..., :-1, :]`` for next-token prediction.
    Autocast does not change what is computed: the GEMMs run in the inputs' dtype, the softmax in float32 (float64
    for float64 inputs).

    Gradients: for ``reduction="mean"`` or ``"sum"`` with a gradient needed (grad mode on and some input requiring grad)
    on a backend that can (every backend today: torch's softmax, or a Triton or CUDA row kernel, between the GEMMs; see
    :func:`ceu_kernels.contract.fuses_ce_gradients`), they are formed in the forward from the same logits chunks (three
    GEMMs and one exponential pass in all, against four GEMMs when the backward recomputes), only for the inputs that
    require grad; the backward multiplies them by the upstream scalar. So between forward and backward the graph holds
    ``dh [N, H]`` in hidden's dtype and ``dW [V, H]``, ``db [V]`` in the accumulator dtype (float32, float64 for float64
    inputs) instead of the inputs and a ``[N]`` log-sum-exp. A backward that frees the graph scales them in place and
    hands them to autograd (``dW`` becomes the weight's ``.grad`` itself where that is None); one that keeps it
    (``retain_graph=True``), or a weight of another dtype, gets a scaled copy, so calling it twice gives the same
    gradients. ``reduction="none"``, whose upstream gradient is per token, keeps
    the backward that recomputes the logits. Under ``torch.no_grad``, or when no input requires grad, no gradient is
    computed. Both paths are custom ops with fake kernels, so ``torch.compile(fullgraph=True)`` traces them without a
    graph break (which path is taken is fixed at trace time by grad mode and ``requires_grad``, which dynamo guards on).
    Not twice differentiable: differentiating the gradients again (``create_graph=True``) raises, on both paths.
    """
    vocab_size = checks.check_head(hidden, weight, bias, vocab_size, reduction, impl, chunk_size)
    checks.check_labels(labels, hidden, vocab_size, ignore_index)
    backend = backends.choose(impl, hidden.device, "ce", hidden.dtype)  # the one backend decision of this call
    flat_labels = labels.reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    with autocast_disabled(hidden.device):
        if reduction != "none" and any(needs) and fuses_ce_gradients(backend):
            return LinearCrossEntropyGradsInForwardFunction.apply(flat_hidden, weight, bias, flat_labels, vocab_size,
                                                                  ignore_index, backend, chunk_size, reduction, *needs)
        loss = LinearCrossEntropyFunction.apply(flat_hidden, weight, bias, flat_labels, vocab_size, ignore_index,
                                                backend, chunk_size)
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
