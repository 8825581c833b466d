"""The implementations under test, each a way to compute the loss from ``(hidden, weight)``, and the float64 oracle.

A provider builds a ``loss_fn(hidden, weight) -> scalar`` for a case (labels are closed over); the runner turns it
into the forward, backward and forward+backward operations it times. ``unavailable`` says why a provider cannot run
here (missing package, no CUDA device, backend not built), so the runner records a clean skip instead of failing.
"""
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import ceu

from .shapes import Case

MODES = ("forward", "backward", "full")
USEFUL_GEMMS = {
    # GEMMs of the head's size that the loss needs at the least, whatever the implementation: LMF's backward is a
    # closed form (no GEMM); cross-entropy's needs dlogits @ W and dlogits.T @ h.
    ("lmf", "forward"): 1, ("lmf", "backward"): 0, ("lmf", "full"): 1,
    ("ce", "forward"): 1, ("ce", "backward"): 2, ("ce", "full"): 3,
}


@dataclass
class Inputs:
    hidden: torch.Tensor  # [tokens, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    labels: torch.Tensor  # [tokens] int64 (used by cross-entropy only)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Deterministic inputs with logits of unit scale; the same case, seed and device give the same tensors."""
    generator = torch.Generator(device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    hidden = torch.randn(case.tokens, case.hidden, device=device, generator=generator)
    weight = torch.randn(case.vocab, case.hidden, device=device, generator=generator) / case.hidden**0.5
    labels = torch.randint(case.vocab, (case.tokens,), device=device, generator=generator)
    return Inputs(hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels)


def _eager(case: Case, labels: torch.Tensor, upcast: bool) -> Callable:
    """The reference implementation's way: materialise ``[tokens, V]`` logits, optionally upcast them to float32."""
    def loss_fn(hidden, weight):
        logits = hidden @ weight.T
        if upcast:
            logits = logits.float()
        return ceu.lmf_loss(logits) if case.loss == "lmf" else F.cross_entropy(logits, labels)
    return loss_fn


@functools.cache
def _compiled(loss: str) -> Callable:
    """``torch.compile`` of the float32-logits eager loss, one per loss and reused across shapes, so that dynamo
    recompiles once for a second shape and then stays dynamic."""
    def loss_fn(hidden, weight, labels):
        logits = (hidden @ weight.T).float()
        return ceu.lmf_loss(logits) if loss == "lmf" else F.cross_entropy(logits, labels)
    return torch.compile(loss_fn)


def _build_compile(case: Case, inputs: Inputs) -> Callable:
    compiled = _compiled(case.loss)
    return lambda hidden, weight: compiled(hidden, weight, inputs.labels)


def _build_ours(impl: str, case: Case, inputs: Inputs) -> Callable:
    if case.loss == "lmf":
        return functools.partial(ceu.linear_lmf_loss, impl=impl)
    return lambda hidden, weight: ceu.linear_cross_entropy(hidden, weight, inputs.labels, impl=impl)


def _ours_unavailable(impl: str, case: Case, device: torch.device) -> str | None:
    """Ask the library itself with a tiny call: a backend that is not built raises RuntimeError saying why."""
    if impl in ("triton", "cuda") and device.type != "cuda":
        return "needs a CUDA device"
    hidden = torch.zeros(2, 4, device=device, dtype=getattr(torch, case.dtype))
    weight = torch.zeros(3, 4, device=device, dtype=hidden.dtype)
    try:
        if case.loss == "lmf":
            ceu.linear_lmf_loss(hidden, weight, impl=impl)
        else:
            ceu.linear_cross_entropy(hidden, weight, torch.zeros(2, dtype=torch.long, device=device), impl=impl)
    except RuntimeError as error:
        return str(error).split("\n")[0]
    return None


def _build_liger(case: Case, inputs: Inputs) -> Callable:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()

    def loss_fn(hidden, weight):
        loss = module(weight, hidden, inputs.labels)
        return loss[0] if isinstance(loss, tuple) else loss
    return loss_fn


def _build_cce(impl: str, case: Case, inputs: Inputs) -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weight: linear_cross_entropy(hidden, weight, inputs.labels, impl=impl)


def _package_unavailable(module: str, package: str, needs_cuda: bool = True) -> Callable:
    def unavailable(case: Case, device: torch.device) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed"
        if needs_cuda and device.type != "cuda":
            return "needs a CUDA device"
        return None
    return unavailable


def _gemm_floor(case: Case, inputs: Inputs) -> Callable:
    """One ``hidden @ weight.T`` of the head's shape into a preallocated output: the time every provider pays at least."""
    hidden, weight = inputs.hidden.detach(), inputs.weight.detach()
    out = hidden.new_empty(case.tokens, case.vocab)
    return lambda: torch.mm(hidden, weight.T, out=out)


def _always(case: Case, device: torch.device) -> None:
    return None


@dataclass(frozen=True)
class Provider:
    name: str
    losses: tuple[str, ...]
    build: Callable  # (case, inputs) -> loss_fn(hidden, weight); for the floor, () -> GEMM
    unavailable: Callable = _always  # (case, device) -> reason or None
    modes: tuple[str, ...] = MODES
    half_only: bool = False  # adds nothing for float32 inputs (identical to another provider there)


PROVIDERS = {p.name: p for p in [
    Provider("floor", ("lmf", "ce"), _gemm_floor, modes=("forward",)),
    Provider("eager-fp32", ("lmf", "ce"), lambda case, inputs: _eager(case, inputs.labels, upcast=True)),
    Provider("eager", ("lmf", "ce"), lambda case, inputs: _eager(case, inputs.labels, upcast=False), half_only=True),
    Provider("compile", ("lmf", "ce"), _build_compile),
    *[Provider(f"ceu-{impl}", ("lmf", "ce"), functools.partial(_build_ours, impl),
               functools.partial(_ours_unavailable, impl)) for impl in ("torch", "triton", "cuda")],
    Provider("liger", ("ce",), _build_liger, _package_unavailable("liger_kernel", "liger-kernel")),
    Provider("cce", ("ce",), functools.partial(_build_cce, "cce"),
             _package_unavailable("cut_cross_entropy", "cut-cross-entropy")),
    # cut-cross-entropy's CPU-capable path: torch.compile of float32 logits materialised whole (its own peer of
    # "compile", with its masking of ignored tokens before the GEMM).
    Provider("cce-compile", ("ce",), functools.partial(_build_cce, "torch_compile"),
             _package_unavailable("cut_cross_entropy", "cut-cross-entropy", needs_cuda=False)),
]}


def providers_for(case: Case) -> list[Provider]:
    return [p for p in PROVIDERS.values()
            if case.loss in p.losses and not (p.half_only and case.dtype in ("float32", "float64"))]


def float64_reference(case: Case, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Loss and gradients in float64 on materialised logits, a chunk of tokens at a time to bound memory."""
    chunk_bytes = 2**30 if inputs.hidden.is_cuda else 2**28
    weight = inputs.weight.detach().double().requires_grad_()
    grad_hidden = torch.empty(inputs.hidden.shape, dtype=torch.float64, device=weight.device)
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    rows = max(1, chunk_bytes // (8 * case.vocab))
    for start in range(0, case.tokens, rows):
        hidden = inputs.hidden[start:start + rows].detach().double().requires_grad_()
        logits = hidden @ weight.T
        if case.loss == "lmf":
            part = ceu.lmf_loss(logits, reduction="sum")
        else:
            part = F.cross_entropy(logits, inputs.labels[start:start + rows], reduction="sum")
        part = part / case.tokens
        part.backward()
        grad_hidden[start:start + rows] = hidden.grad
        total += part.detach()
    return {"loss": total, "grad_hidden": grad_hidden, "grad_weight": weight.grad}


def relative_error(value: torch.Tensor, reference: torch.Tensor, rows: int = 4096) -> float:
    """``||value - reference|| / ||reference||`` (Frobenius) in float64, a block of rows at a time; the reference
    may live on another device (the host), each block is brought to ``value``'s."""
    columns = value.shape[-1] if value.dim() else 1
    value, reference = value.reshape(-1, columns), reference.reshape(-1, columns)
    error = scale = 0.0
    for start in range(0, value.shape[0], rows):
        ref = reference[start:start + rows].to(value.device, torch.float64)
        error += (value[start:start + rows].double() - ref).square().sum().item()
        scale += ref.square().sum().item()
    return (error / scale) ** 0.5 if scale > 0 else error**0.5
