"""Input validation shared by the fused losses: every error names the argument and what was expected."""
import torch

from ceu_kernels.contract import NAMES

from .reference import REDUCTIONS

IMPLS = ("auto", *NAMES)
"""What ``impl=`` accepts: ``"auto"`` (:func:`ceu.backends.choose` picks) or a backend's name."""
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The input dtypes every backend computes in (float8 has no GEMM or max on most devices)."""


def _check_tensor(name: str, value, ndim: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested:
        raise TypeError(f"{name} is a nested tensor, which the fused losses do not take: pad the sequences "
                        "(torch.nested.to_padded_tensor) and mark the padding with mask= or ignore_index")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}: call .to_dense()")
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(value):
        raise RuntimeError(f"{name} comes from a torch.func transform (grad, vmap, jacrev, ...), which the fused "
                           "losses do not support (their autograd.Functions have no functorch rules): use "
                           "torch.autograd.grad, and a loop or a batch dimension instead of vmap")
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
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden dtype {hidden.dtype} is not supported: use one of {FLOAT_DTYPES} "
                        "(e.g. .to(torch.bfloat16))")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden has no features (H = 0, shape {tuple(hidden.shape)}): the head needs H >= 1")
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
    """Shape, dtype and range of the targets, and ``ignore_index``: an int the labels' dtype can hold (any other
    value could never match a label, and ignores nothing). The range check raises at once on CPU; on accelerators
    and under torch.compile it is an asynchronous device assertion, so it never forces a host sync."""
    _check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int (default -100), got {type(ignore_index).__name__} "
                        f"{ignore_index!r}")
    limits = torch.iinfo(labels.dtype)
    if not limits.min <= ignore_index <= limits.max:
        raise ValueError(f"ignore_index = {ignore_index} is outside the range of {labels.dtype} labels "
                         f"[{limits.min}, {limits.max}]: no label could equal it")
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


def not_twice_differentiable(grads, name: str):
    """The backward's gradients, routed through a node that raises a ceu error when a later backward reaches it
    (``create_graph=True`` then differentiating the gradients): the fused backwards have no derivative of their
    own, and autograd would otherwise stop at a custom op with a dispatcher message. Gradients that do not require
    grad (no ``create_graph``) pass unchanged."""
    present = [index for index, grad in enumerate(grads) if grad is not None and grad.requires_grad]
    if not present:
        return grads
    error = torch._C._functions.DelayedError(
        f"{name} is not twice differentiable: its backward is a fused kernel with no derivative of its own "
        "(create_graph=True gives gradients that cannot be differentiated again)".encode(), len(present))
    wrapped = error(*[grads[index] for index in present])
    wrapped = (wrapped,) if isinstance(wrapped, torch.Tensor) else wrapped  # one output comes back bare
    grads = list(grads)
    for index, grad in zip(present, wrapped):
        grads[index] = grad
    return grads
