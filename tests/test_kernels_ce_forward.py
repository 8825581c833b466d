"""ceu_kernels.ce_forward: the Triton cross-entropy launchers (on the CPU through the interpreter when no GPU is
present) against float64: the per-split (max, sum) merge across vocabulary splits and tiles, and the gradients
(ceu_kernels.ce_backward) from the forward's log-sum-exp."""
import pytest
import torch
import torch.nn.functional as F

from helpers import N_TOKENS, SMALL_BLOCKS, VOCAB_SIZE, assert_close, head, labels_for, logits64, triton_device

DEVICE = triton_device()

import triton  # noqa: E402

from ceu_kernels import ce_forward  # noqa: E402
from ceu_kernels.ce_backward import ce_gradients  # noqa: E402
from ceu_kernels.ce_forward import ce_token_losses  # noqa: E402
from ceu_kernels.contract import stat_dtype  # noqa: E402


@pytest.mark.parametrize("dtype,n_splits,ignore_index", [(torch.float32, 1, -100), (torch.float32, 100, 5),
                                                         (torch.float16, 3, -100), (torch.float64, 3, 5)], ids=str)
def test_ce_kernels_match_float64_across_splits_and_tiles(dtype, n_splits, ignore_index, monkeypatch):
    """One vocabulary split, one per vocab tile (100 asked for), and a few: the per-split (max, sum) merge."""
    def splits(n_tokens, vocab_size, device, align):
        span = triton.cdiv(triton.cdiv(vocab_size, n_splits), align) * align
        return triton.cdiv(vocab_size, span), span

    monkeypatch.setattr(ce_forward, "vocab_splits", splits)
    hidden, weight, bias = head(dtype)
    labels = labels_for(N_TOKENS, ignore_index)
    per_token, lse = ce_token_losses(hidden, weight, bias, labels, VOCAB_SIZE, ignore_index, blocks=SMALL_BLOCKS)
    logits = logits64(hidden, weight, bias)
    valid = labels != ignore_index
    expected = torch.where(valid, F.cross_entropy(logits, torch.where(valid, labels, 0), reduction="none"), 0.0)
    tolerance_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert per_token.dtype == lse.dtype == stat_dtype(dtype)
    assert_close("per-token loss", per_token, expected, tolerance_dtype)
    assert_close("lse", lse, logits.logsumexp(1), tolerance_dtype)

    upstream = torch.rand(N_TOKENS, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.5
    leaves = [leaf.detach().double().requires_grad_() for leaf in (hidden, weight, bias)]
    reference = torch.where(valid, F.cross_entropy(logits64(*leaves), torch.where(valid, labels, 0),
                                                   reduction="none"), 0.0)
    expected_grads = torch.autograd.grad(reference, leaves, upstream.to(DEVICE))
    got = ce_gradients(upstream.to(DEVICE, lse.dtype), lse, hidden, weight, bias, labels, VOCAB_SIZE, ignore_index,
                       None, True, True, True, blocks=SMALL_BLOCKS)
    for name, g, ref in zip(("hidden", "weight", "bias"), got, expected_grads):
        assert g.dtype == dtype
        assert_close(f"grad {name}", g, ref, dtype)
    assert not got[1][VOCAB_SIZE:].any() and not got[2][VOCAB_SIZE:].any(), "padded rows get zero gradient"
    assert not got[0][~valid].any(), "ignored tokens get zero gradient"
