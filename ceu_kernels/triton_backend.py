"""The Triton backend of ceu: the four backend functions of :mod:`ceu.chunked` (same signatures and conventions),
backed by the fused kernels of this package. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.

``chunk_size`` is accepted for interface compatibility and ignored: the kernels tile tokens themselves. Unlike the
chunked path, half-precision logits are not rounded to the input dtype before the max or the softmax (fp32 tiles).
The LMF dW/db are bitwise repeatable for half-precision weights always (written once per row), and for float32/float64
weights when ``torch.use_deterministic_algorithms(True)`` is on (or with ``deterministic=True``); the cross-entropy
backward accumulates with atomics and is not, so :func:`ceu.backends.resolve` keeps it out of deterministic runs.
"""
from .ce_backward import ce_gradients
from .ce_forward import ce_token_losses
from .lmf_backward import lmf_gradients
from .lmf_forward import lmf_row_stats


def lmf_forward(hidden, weight, bias, vocab_size, chunk_size):
    """Per-token max and first-index argmax of ``hidden @ weight[:vocab_size].T + bias``."""
    return lmf_row_stats(hidden, weight, bias, vocab_size)


def lmf_backward(coef, argmax, hidden, weight, weight_mean, vocab_size, needs_hidden, needs_weight, needs_bias,
                 deterministic=None):
    """Closed-form LMF gradients; ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``."""
    return lmf_gradients(coef, argmax, hidden, weight, weight_mean, vocab_size, needs_hidden, needs_weight,
                         needs_bias, deterministic=deterministic)


def ce_forward(hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size):
    """Per-token cross-entropy (0 where ``labels == ignore_index``) and the log-sum-exp the backward reuses."""
    return ce_token_losses(hidden, weight, bias, labels, vocab_size, ignore_index)


def ce_backward(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, chunk_size,
                needs_hidden, needs_weight, needs_bias):
    """Recompute each logits tile and form ``dh``, ``dW``, ``db`` from ``grad * (softmax - onehot)``."""
    return ce_gradients(grad, lse, hidden, weight, bias, labels, vocab_size, ignore_index, needs_hidden,
                        needs_weight, needs_bias)
