"""Which backend runs: :func:`choose` turns ``impl="auto" | "torch" | "triton" | "cuda"`` into the concrete name of a
backend that can run here, once, at the API boundary.

The fused losses call it in their public function and hand the name down: to the custom ops (``ceu.ops``), which
look the backend up with :func:`ceu_kernels.contract.load`, and on the autograd ``ctx``, so the backward always runs
on the forward's backend. What a backend must provide is :class:`ceu_kernels.contract.Backend`.
"""
import warnings

import torch

from ceu_kernels import contract

AUTO_ORDER_CUDA = ("triton", "cuda", "torch")
"""What ``impl="auto"`` tries on CUDA devices, first available wins: the fully fused Triton kernels never write
logits, the CUDA backend writes a bounded chunk of them, the chunked PyTorch path is the fallback. Not yet confirmed
by a GPU benchmark (see benchmarks/RESULTS.md); on every other device ``"auto"`` is ``"torch"``. Triton is skipped
where its GEMM would not run on tensor cores (:func:`triton_dot_on_tensor_cores`)."""

ATOMIC_OPS = {"triton": ("ce",), "cuda": ("lmf",)}
"""Losses whose backward in that backend accumulates with atomic adds, in an order that varies from run to run. Under
``torch.use_deterministic_algorithms(True)``, ``"auto"`` skips the backend for that loss and naming it raises, as
PyTorch does for its own nondeterministic ops."""


def triton_dot_on_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether Triton's ``tl.dot`` runs on tensor cores for inputs of ``dtype``: yes for float16, bfloat16 and
    float64, and for float32 when ``torch.get_float32_matmul_precision()`` allows TF32 ("high" or "medium"). Under
    "highest" a float32 dot lowers to FMA on CUDA cores with heavy register spills (see ``make compile-check``), so
    ``impl="auto"`` then takes the cuBLAS-based backends, which run a true float32 GEMM at full speed."""
    return not (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


def _unavailable(impl: str, why: str) -> RuntimeError:
    return RuntimeError(f"impl={impl!r} is not available: {why}. Use impl='torch' or impl='auto'.")


def _check_runs(name: str, device: torch.device, loss: str | None) -> None:
    """Raise RuntimeError saying why backend ``name`` cannot run ``loss`` on ``device`` now; return if it can."""
    if loss in ATOMIC_OPS.get(name, ()) and torch.are_deterministic_algorithms_enabled():
        what = {"lmf": "LMF", "ce": "cross-entropy"}[loss]
        raise RuntimeError(f"impl={name!r}: the {what} backward accumulates with atomic adds and has no deterministic "
                           "mode, but torch.use_deterministic_algorithms(True) is on. Use impl='auto' or 'torch'.")
    if name == "triton":
        if device.type != "cuda" and not contract.interpreting():
            raise _unavailable(name, f"the Triton kernels need a CUDA device (got {device.type!r}) or the Triton "
                                     "interpreter (TRITON_INTERPRET=1 set before the first kernel is defined)")
        try:
            contract.load("triton")
        except ImportError as error:
            raise _unavailable(name, f"triton is not installed ({error})") from error
    elif name == "cuda":
        if device.type != "cuda":
            raise _unavailable(name, f"the CUDA kernels need CUDA tensors (got {device.type!r})")
        try:
            contract.load("cuda").kernels()
        except RuntimeError as error:
            raise _unavailable(name, str(error)) from error


def choose(impl: str, device: torch.device, loss: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``impl`` on ``device``: one of ``ceu_kernels.contract.NAMES``.

    A named backend is returned if it can run here, else RuntimeError says why. ``"auto"`` is ``"torch"`` off CUDA;
    on CUDA the first of :data:`AUTO_ORDER_CUDA` that can run ``loss`` (``"lmf"`` or ``"ce"``), skipping Triton for
    inputs of ``dtype`` whose ``tl.dot`` would not run on tensor cores, and backends whose backward of ``loss`` is
    atomic while deterministic algorithms are on (:data:`ATOMIC_OPS`).
    """
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        for name in AUTO_ORDER_CUDA:
            if name == "triton" and dtype is not None and not triton_dot_on_tensor_cores(dtype):
                continue
            try:
                _check_runs(name, device, loss)
            except RuntimeError:
                continue
            return name
        return "torch"
    if impl not in contract.NAMES:
        raise ValueError(f"unknown impl {impl!r}")
    _check_runs(impl, device, loss)
    return impl


def resolve(impl: str, device: torch.device, loss: str | None = None, dtype: torch.dtype | None = None):
    """Deprecated: the backend module for ``impl``; use ``ceu_kernels.contract.load(choose(...))``."""
    warnings.warn("ceu.backends.resolve is deprecated: choose(impl, device, loss, dtype) gives the backend's name, "
                  "ceu_kernels.contract.load(name) the backend", DeprecationWarning, stacklevel=2)
    return contract.load(choose(impl, device, loss, dtype))
