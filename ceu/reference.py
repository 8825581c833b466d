"""Eager reference semantics on materialised logits: the single source of truth every fused path is tested against.

The LMF ("logit max-flattening") forget loss of one token is ``(max_j z_j - mean_j z_j)**2``: zero exactly when the
logits are uniform, softmax-free. Ties in the max resolve to the first index, as ``torch.max(dim)`` does, and the
gradient flows to that index only (autograd through ``torch.max(dim).values`` follows the same rule). Non-finite
logits follow ``torch.max(dim)`` too: a row holding NaN has max NaN at its first NaN, and +/-inf are ordered as
numbers (a row of -inf: max -inf at index 0). Every backend's argmax is therefore a real vocabulary index.
"""
import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-token losses that are already zero where ``mask`` is False.

    ``"mean"`` divides by the number of counted tokens, kept on the device (no host sync); with no counted token it
    returns 0, still connected to the graph, so gradients (all zero) reach every input.
    """
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(per_token.numel(), 1)
    return total / mask.sum().clamp_min(1).to(total.dtype)


def lmf_loss(logits: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean",
             vocab_size: int | None = None) -> torch.Tensor:
    """LMF loss on materialised logits ``[..., V]``; ``mask`` (bool ``[...]``, True = counted) zeroes tokens.

    Computes in the logits' dtype (use float64 for a reference); ``vocab_size`` < V drops the trailing padded columns.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    gap = logits.max(dim=-1).values - logits.mean(dim=-1)
    per_token = gap.square()
    if mask is not None:
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return reduce_tokens(per_token, mask, reduction)
