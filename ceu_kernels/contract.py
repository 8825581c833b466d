"""What a backend is: the four functions every backend provides (:class:`Backend`), the registry that loads one by
name (:func:`load`), and the few helpers they all share (statistics dtype, chunk sizing, the interpreter check).

This is the lowest layer: it imports neither ``ceu`` nor ``triton``. ``ceu.backends`` decides *which* backend runs
(``impl="auto"`` and its rules); this module says *what* every backend must do.
"""
import functools
import os
import types
from typing import Protocol

import torch
from torch import Tensor

NAMES = ("torch", "triton", "cuda")
"""The backends, by the names ``impl=`` takes: the token-chunked PyTorch path (:mod:`ceu_kernels.chunked`), the fused
Triton kernels (launchers in :mod:`ceu_kernels.lmf_forward`, ``lmf_backward``, ``ce_forward``, ``ce_backward``) and
cuBLAS plus the CUDA C++ kernels of ``csrc/`` (:mod:`ceu_kernels.cuda`)."""

CHUNK_BUDGET_BYTES = 128 * 2**20
"""Default bound on the logits buffer(s) of one token chunk in the backends that write logits (torch, cuda, and
Triton's cross-entropy with gradients in the forward); ``chunk_size=`` overrides it. A small head bounds it lower
(see :func:`chunk_rows`)."""


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-token statistics and of every accumulator for inputs of ``dtype``: float64 for float64
    inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(chunk_size: int | None, vocab_size: int, bytes_per_logit: int, weight: Tensor,
               weights: int = 1) -> int:
    """Tokens per GEMM chunk: ``chunk_size`` when given, else as many as fit ``weights`` times
    ``min(CHUNK_BUDGET_BYTES, size of weight[:vocab_size])`` of logits.

    The weight bound follows from the problem. LMF (``weights=1``): the backward returns a ``dW`` of that size anyway,
    so a chunk buffer no larger than it never lifts the peak above the backward's (LMF's floor: ``dW`` and ``dh``),
    while taking as many tokens per GEMM as that allows (fewer tokens per chunk re-read the whole weight more often:
    slower). Cross-entropy (:data:`CE_CHUNK_WEIGHTS`): its gradients are formed in the forward, so its buffer is held
    together with ``dW`` whatever its size, and the peak is ``dW`` plus the buffer."""
    if chunk_size is not None:
        return chunk_size
    weight_bytes = vocab_size * weight.shape[1] * weight.element_size()
    return max(1, weights * min(CHUNK_BUDGET_BYTES, weight_bytes) // (vocab_size * bytes_per_logit))


CE_CHUNK_WEIGHTS = 2
"""The cross-entropy chunk buffer may hold twice :func:`chunk_rows`' LMF budget: its peak is then three ``dW`` (the
buffer held with ``dW``, formed in the forward), and each GEMM takes twice the tokens: on the CPU target (H 256,
V 128256, float32, 2048 tokens) 512 tokens per chunk instead of 256, 7% less time (interleaved medians)."""


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``, which must be set
    before the first kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class Backend(Protocol):
    """The backend contract: four functions on flattened inputs, with one set of conventions for every backend, and
    one optional fifth, ``ce_forward_backward`` (see :func:`fuses_ce_gradients`).

    Inputs: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V] | None``, all of one floating dtype and device; only
    the first ``vocab_size`` rows of ``weight``/``bias`` are the real vocabulary, the rest is padding that never
    enters a max, a mean or a softmax and gets exactly zero gradient. Per-token statistics and upstream
    coefficients are :func:`stat_dtype` (float32, float64 for float64 inputs); gradients come back in the dtype of
    the tensor they belong to, ``None`` where the matching ``needs_*`` is False. ``chunk_size`` is the number of
    tokens per GEMM for the backends that write logits (default: :func:`chunk_rows`); a function that tiles tokens
    itself (Triton's, but for ``ce_forward_backward``) ignores it. A backend never writes its inputs.

    What a backend computes, and what it leaves to the autograd Functions above it (``ceu.lmf``,
    ``ceu.cross_entropy``, ``ceu.parallel``): a backend does the per-token reductions over the vocabulary, the
    work that needs the head's logits, and the gradients from them; everything per token that needs no logits is
    computed once, above every backend. Hence:

    * LMF: ``lmf_forward`` returns the row max and first-index argmax only. The mean of a row is
      ``h . w_mean + b_mean`` (a mat-vec, no logits), and the gap, the square and the caller's ``mask`` are per-token
      arithmetic: the Function does them once for all backends, and the vocab-parallel loss reuses the same
      ``lmf_forward`` on its shard, where a per-token loss could not be formed (the max and the mean are global).
      ``lmf_backward`` takes ``coef = dloss/d(max - mean)`` per token, already zero at masked tokens.
    * Cross-entropy: ``ce_forward`` returns the per-token loss ``lse - z[label]`` (0 where
      ``labels == ignore_index``) and the log-sum-exp. Both are reductions of the logits row (the target logit is
      read from the same rounded logits as the log-sum-exp), and ``ignore_index`` masking stays here because the
      labels index the vocabulary. ``ce_backward`` takes ``grad = dloss/dloss_token`` per token.
    * Cross-entropy with the gradients formed in the forward (optional): ``ce_forward_backward`` is ``ce_forward``
      plus the gradients of ``sum(per_token_loss)`` (unit weight per counted token) from the same logits; ``dW``
      and ``db`` come back in the statistics dtype, which the caller scales by the upstream scalar (over the count,
      for ``"mean"``) before casting them to the weight's dtype.

    Max and argmax follow ``torch.max(dim)``: ties go to the first index, a row holding NaN has max NaN at its first
    NaN, and the argmax is always a real row. An argmax handed to ``lmf_backward`` outside ``[0, vocab_size)`` is
    never dereferenced: its token gets a NaN ``dh`` row and adds nothing to ``dW``/``db`` beyond the rank-1 value.
    """

    def lmf_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int,
                    chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """Per-token ``(max, argmax)`` of ``hidden @ weight[:vocab_size].T + bias``: statistics dtype, int64."""

    def lmf_backward(self, coef: Tensor, argmax: Tensor, hidden: Tensor, weight: Tensor, weight_mean: Tensor,
                     vocab_size: int, needs_hidden: bool, needs_weight: bool,
                     needs_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Closed-form LMF gradients, no GEMM: ``dlogits = coef (onehot(argmax) - 1/vocab_size)``, hence
        ``dh = coef (W[argmax] - weight_mean)``, ``dW = scatter_add(argmax, coef h) - (1/V) 1 (x) sum(coef h)`` on
        the real rows and ``db`` alike. ``weight_mean [H]`` is the mean of the real rows, in coef's dtype."""

    def ce_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, vocab_size: int,
                   ignore_index: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """Per-token cross-entropy (0 where ``labels == ignore_index``) and the log-sum-exp the backward reuses."""

    def ce_backward(self, grad: Tensor, lse: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                    labels: Tensor, vocab_size: int, ignore_index: int, chunk_size: int | None, needs_hidden: bool,
                    needs_weight: bool, needs_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients of ``sum(grad * per_token_loss)``: recompute the logits, form ``grad (softmax - onehot)``
        (zero at ignored tokens) and run the two GEMMs ``dlogits @ W`` and ``dlogits.T @ h``."""

    def ce_forward_backward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                            vocab_size: int, ignore_index: int, chunk_size: int | None, needs_hidden: bool,
                            needs_weight: bool, needs_bias: bool
                            ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Optional. ``ce_forward``'s ``(per_token, lse)`` and the gradients of ``sum(per_token_loss)`` formed
        from the forward's own logits (no recompute): ``dh`` in hidden's dtype, ``dW``/``db`` in the
        statistics dtype, ``None`` where not needed. Every backend provides it through one chunked loop
        (:func:`ceu_kernels.chunked.fused_ce_loop`: the logits and both gradient GEMMs through torch, so by cuBLAS
        on a GPU) with its own row step, and it writes logits a chunk at a time, so it follows ``chunk_size``
        (Triton's too). See :func:`fuses_ce_gradients`."""


def fuses_ce_gradients(name: str) -> bool:
    """Whether backend ``name`` forms the cross-entropy gradients in its forward: the one decision, made here.

    A backend does exactly when it provides ``ce_forward_backward``; today every backend does (three GEMMs and one
    exponential pass against four GEMMs and two for a forward and a backward that recomputes: the chunked PyTorch
    path with ``torch.softmax`` as its row step, Triton and CUDA with one row kernel each between cuBLAS GEMMs).
    A backend without it falls back to ``ce_forward``, then ``ce_backward`` recomputing the logits in the backward,
    with nothing but the inputs and the log-sum-exp held in between. ``ceu.linear_cross_entropy`` asks this once per
    call, for the scalar reductions when a gradient is needed; ``reduction="none"`` always recomputes.
    """
    return name in _FUSING_CE


_FUSING_CE = frozenset(("torch", "triton", "cuda"))
"""The backends whose module provides ``ce_forward_backward`` (kept as names so that :func:`fuses_ce_gradients` needs
no import and traces under ``torch.compile``; a test checks it against the modules)."""


@functools.cache
def load(name: str) -> Backend:
    """The backend called ``name`` (one of :data:`NAMES`). Imports it on first use, so a missing ``triton`` or an
    unbuilt CUDA extension only matters to whoever asks for that backend; it does not check that the backend can
    run on a device (``ceu.backends.choose`` does)."""
    if name == "torch":
        from . import chunked
        return chunked
    if name == "triton":
        from .ce_backward import ce_gradients
        from .ce_forward import ce_token_losses
        from .ce_fused import ce_forward_backward
        from .lmf_backward import lmf_gradients
        from .lmf_forward import lmf_row_stats
        # The launchers take the contract's arguments, so the backend is just the five of them.
        return types.SimpleNamespace(lmf_forward=lmf_row_stats, lmf_backward=lmf_gradients,
                                     ce_forward=ce_token_losses, ce_backward=ce_gradients,
                                     ce_forward_backward=ce_forward_backward)
    if name == "cuda":
        from . import cuda
        return cuda
    raise ValueError(f"unknown backend {name!r}: expected one of {NAMES}")
