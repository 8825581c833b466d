"""The backend calls as torch custom ops, so ``torch.compile(fullgraph=True)`` traces the fused losses as opaque
nodes (no graph break) while eager calls go straight to the backend.

Each op takes ``backend``, the concrete name that :func:`ceu.backends.choose` gave the public function, and only
looks it up (:func:`ceu_kernels.contract.load`): no op decides anything about which backend runs.
"""
import torch
from torch import Tensor

from ceu_kernels.contract import load, stat_dtype


@torch.library.custom_op("ceu::lmf_forward", mutates_args=())
def lmf_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int, backend: str,
                chunk_size: int | None) -> tuple[Tensor, Tensor]:
    return load(backend).lmf_forward(hidden, weight, bias, vocab_size, chunk_size)


@lmf_forward.register_fake
def _(hidden, weight, bias, vocab_size, backend, chunk_size):
    n_tokens = hidden.shape[0]
    return hidden.new_empty(n_tokens, dtype=stat_dtype(hidden.dtype)), hidden.new_empty(n_tokens, dtype=torch.int64)


def _grad_or_empty(needed: bool, grad: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops cannot return None: a gradient that was not asked for travels as an empty tensor."""
    return grad if needed else like.new_empty(0)


def _fake_grads(hidden, weight, needs):
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    dtypes = (hidden.dtype, weight.dtype, weight.dtype)
    return tuple(hidden.new_empty(shape if need else (0,), dtype=dtype)
                 for shape, dtype, need in zip(shapes, dtypes, needs))


@torch.library.custom_op("ceu::lmf_backward", mutates_args=())
def lmf_backward(coef: Tensor, argmax: Tensor, hidden: Tensor, weight: Tensor, weight_mean: Tensor, vocab_size: int,
                 backend: str, needs_hidden: bool, needs_weight: bool,
                 needs_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    needs = (needs_hidden, needs_weight, needs_bias)
    found = load(backend).lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size, *needs)
    return tuple(_grad_or_empty(need, grad, hidden) for need, grad in zip(needs, found))


@lmf_backward.register_fake
def _(coef, argmax, hidden, weight, weight_mean, vocab_size, backend, needs_hidden, needs_weight, needs_bias):
    return _fake_grads(hidden, weight, (needs_hidden, needs_weight, needs_bias))


@torch.library.custom_op("ceu::ce_forward", mutates_args=())
def ce_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, vocab_size: int,
               ignore_index: int, backend: str, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    return load(backend).ce_forward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size)


@ce_forward.register_fake
def _(hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size):
    per_token = hidden.new_empty(hidden.shape[0], dtype=stat_dtype(hidden.dtype))
    return per_token, torch.empty_like(per_token)


@torch.library.custom_op("ceu::ce_backward", mutates_args=())
def ce_backward(grad: Tensor, lse: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                vocab_size: int, ignore_index: int, backend: str, chunk_size: int | None, needs_hidden: bool,
                needs_weight: bool, needs_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    needs = (needs_hidden, needs_weight, needs_bias)
    found = load(backend).ce_backward(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size,
                                      *needs)
    return tuple(_grad_or_empty(need, grad, hidden) for need, grad in zip(needs, found))


@ce_backward.register_fake
def _(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size, needs_hidden,
      needs_weight, needs_bias):
    return _fake_grads(hidden, weight, (needs_hidden, needs_weight, needs_bias))


@torch.library.custom_op("ceu::ce_forward_backward", mutates_args=())
def ce_forward_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, vocab_size: int,
                        ignore_index: int, backend: str, chunk_size: int | None, needs_hidden: bool,
                        needs_weight: bool, needs_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    needs = (needs_hidden, needs_weight, needs_bias)
    per_token, lse, *found = load(backend).ce_forward_backward(hidden, weight, bias, labels, vocab_size,
                                                               ignore_index, chunk_size, *needs)
    return per_token, lse, *(_grad_or_empty(need, found_grad, hidden) for need, found_grad in zip(needs, found))


@ce_forward_backward.register_fake
def _(hidden, weight, bias, labels, vocab_size, ignore_index, backend, chunk_size, needs_hidden, needs_weight,
      needs_bias):
    acc = stat_dtype(hidden.dtype)
    per_token = hidden.new_empty(hidden.shape[0], dtype=acc)
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    dtypes = (hidden.dtype, acc, acc)
    return per_token, torch.empty_like(per_token), *(
        hidden.new_empty(shape, dtype=dtype) if need else hidden.new_empty(0)
        for shape, dtype, need in zip(shapes, dtypes, (needs_hidden, needs_weight, needs_bias)))
