"""Backend dispatch: ``impl="auto" | "torch" | "triton" | "cuda"`` to a module with the four backend functions.

Every backend module exposes ``lmf_forward``, ``lmf_backward``, ``ce_forward`` and ``ce_backward`` with the
signatures of :mod:`ceu.chunked`, the pure-PyTorch backend that is also the CPU path.
"""
import types

import torch

from . import chunked


def _unavailable(impl: str, why: str) -> RuntimeError:
    return RuntimeError(f"impl={impl!r} is not available: {why}. Use impl='torch' or impl='auto'.")


def resolve(impl: str, device: torch.device) -> types.ModuleType:
    """The backend module for ``impl`` on ``device``; ``"auto"`` picks the fastest one available there."""
    if impl in ("torch", "auto"):
        return chunked
    if impl == "triton":
        raise _unavailable(impl, "the Triton kernels are not part of this build yet")
    if impl == "cuda":
        raise _unavailable(impl, "the CUDA extension ceu_kernels._C is not part of this build yet")
    raise ValueError(f"unknown impl {impl!r}")
