"""Backend dispatch: ``impl="auto" | "torch" | "triton" | "cuda"`` to a module with the four backend functions.

Every backend module exposes ``lmf_forward``, ``lmf_backward``, ``ce_forward`` and ``ce_backward`` with the
signatures of :mod:`ceu.chunked`, the pure-PyTorch backend that is also the CPU path.
"""
import os
import types

import torch

from . import chunked


def _unavailable(impl: str, why: str) -> RuntimeError:
    return RuntimeError(f"impl={impl!r} is not available: {why}. Use impl='torch' or impl='auto'.")


AUTO_ORDER_CUDA = ("triton", "cuda", "torch")
"""What ``impl="auto"`` tries on CUDA devices, first available wins: the fully fused Triton kernels never write
logits, the CUDA backend writes a bounded chunk of them, the chunked PyTorch path is the fallback. Not yet confirmed
by a GPU benchmark (see benchmarks/RESULTS.md); on every other device ``"auto"`` is ``"torch"``. Triton is skipped
where its GEMM would not run on tensor cores (:func:`triton_dot_on_tensor_cores`)."""


def triton_dot_on_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether Triton's ``tl.dot`` runs on tensor cores for inputs of ``dtype``: yes for float16, bfloat16 and
    float64, and for float32 when ``torch.get_float32_matmul_precision()`` allows TF32 ("high" or "medium"). Under
    "highest" a float32 dot lowers to FMA on CUDA cores with heavy register spills (see ``make compile-check``), so
    ``impl="auto"`` then takes the cuBLAS-based backends, which run a true float32 GEMM at full speed."""
    return not (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


ATOMIC_OPS = {"triton": ("ce",), "cuda": ("lmf",)}
"""Losses whose backward in that backend accumulates with atomic adds, in an order that varies from run to run. Under
``torch.use_deterministic_algorithms(True)``, ``"auto"`` skips the backend for that loss and naming it raises, as
PyTorch does for its own nondeterministic ops."""


def resolve(impl: str, device: torch.device, loss: str | None = None,
            dtype: torch.dtype | None = None) -> types.ModuleType:
    """The backend module for ``impl`` on ``device``; ``"auto"`` picks the fastest one available there (for ``loss``,
    ``"lmf"`` or ``"ce"``, a deterministic one when deterministic algorithms are on; for inputs of ``dtype``, one
    whose GEMM runs on tensor cores or in cuBLAS)."""
    if impl == "auto":
        if device.type != "cuda":
            return chunked
        for candidate in AUTO_ORDER_CUDA:
            if candidate == "triton" and dtype is not None and not triton_dot_on_tensor_cores(dtype):
                continue
            try:
                return resolve(candidate, device, loss, dtype)
            except RuntimeError:
                continue
    if loss in ATOMIC_OPS.get(impl, ()) and torch.are_deterministic_algorithms_enabled():
        name = {"lmf": "LMF", "ce": "cross-entropy"}[loss]
        raise RuntimeError(f"impl={impl!r}: the {name} backward accumulates with atomic adds and has no deterministic "
                           "mode, but torch.use_deterministic_algorithms(True) is on. Use impl='auto' or 'torch'.")
    if impl == "torch":
        return chunked
    if impl == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise _unavailable(impl, f"the Triton kernels need a CUDA device (got {device.type!r}) or the Triton "
                                     "interpreter (TRITON_INTERPRET=1 set before the first kernel is defined)")
        try:
            from ceu_kernels import triton_backend
        except ImportError as error:
            raise _unavailable(impl, f"triton is not installed ({error})") from error
        return triton_backend
    if impl == "cuda":
        if device.type != "cuda":
            raise _unavailable(impl, f"the CUDA kernels need CUDA tensors (got {device.type!r})")
        from ceu_kernels import cuda
        try:
            cuda.kernels()
        except RuntimeError as error:
            raise _unavailable(impl, str(error)) from error
        return cuda
    raise ValueError(f"unknown impl {impl!r}")
