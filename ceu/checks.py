"""Input validation shared by the fused losses: every error names the argument and what was expected."""
import torch

from ceu_kernels.contract import NAMES

from .reference import REDUCTIONS

IMPLS = ("auto", *NAMES)
"""What ``impl=`` accepts: ``"auto"`` (:func:`ceu.backends.choose` picks) or a backend's name."""


def _check_tensor(name: str, value, ndim: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")


def _check_like(name: str, value: torch.Tensor, hidden: torch.Tensor) -> None:
    if value.dtype != hidden.dtype:
        raise TypeError(f"{name} dtype {value.dtype} does not match hidden dtype {hidden.dtype}")
    if value.device != hidden.device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")


def check_head(hidden, weight, bias, vocab_size, reduction, impl, chunk_size) -> int:
    """Validate the arguments common to both fused losses; return the real vocabulary size."""
    _check_tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    _check_tensor("weight", weight, ndim=2)
    _check_like("weight", weight, hidden)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        _check_like("bias", bias, hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] with V = {weight.shape[0]}, got shape {tuple(bias.shape)}")
    if vocab_size is None:
        vocab_size = weight.shape[0]
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be an int in [1, V = {weight.shape[0]}], got {vocab_size!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return vocab_size


def check_mask(mask, hidden: torch.Tensor) -> None:
    if mask is None:
        return
    _check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = token counts), got {mask.dtype}")
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(f"mask must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")


def check_labels(labels, hidden: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Shape, dtype and range of the targets. The range check raises at once on CPU; on accelerators and under
    torch.compile it is an asynchronous device assertion, so it never forces a host sync."""
    _check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    out_of_range = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    message = f"labels must lie in [0, vocab_size = {vocab_size}) or equal ignore_index = {ignore_index}"
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if out_of_range.any():
            raise ValueError(message)
    else:
        torch._assert_async(~out_of_range.any(), message)
