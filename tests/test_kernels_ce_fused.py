"""ceu_kernels.ce_fused: the Triton backend's cross-entropy with gradients formed in the forward (on the CPU through
the interpreter when no GPU is present): its row kernel and the whole ``ce_forward_backward`` against float64, on
ragged shapes, several chunks, ignore_index, bias, planted ties, and every subset of gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import helpers
from helpers import (N_TOKENS, VOCAB, VOCAB_SIZE, assert_close, head, labels_for, logits64, planted_integer_ties,
                     triton_device)

DEVICE = triton_device()

from ceu_kernels import ce_fused  # noqa: E402
from ceu_kernels.contract import stat_dtype  # noqa: E402

ROW_DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference_rows(logits, labels, ignore_index):
    """float64 loss, log-sum-exp and ``softmax - onehot`` (zero rows at ignored tokens) of a logits matrix."""
    logits = logits.double()
    valid = labels != ignore_index
    lse = logits.logsumexp(1)
    targets = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - logits.gather(1, targets[:, None]).squeeze(1), 0.0)
    dlogits = (logits - lse[:, None]).exp() - F.one_hot(targets, logits.shape[1]).double()
    return loss, lse, torch.where(valid[:, None], dlogits, 0.0)


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [7, ce_fused.BLOCK_V, 2 * ce_fused.BLOCK_V + 37], ids=["narrow", "one", "ragged"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_row_kernel_matches_float64(dtype, vocab, ignore_index):
    """Rows narrower than, equal to and across several BLOCK_V steps; a strided row view (a chunk of a wider
    buffer); the target at the first and last column; ignored rows zeroed whole."""
    generator = torch.Generator().manual_seed(1)
    wide = (3 * torch.randn(9, vocab + 5, generator=generator, dtype=torch.float64)).to(DEVICE, dtype)
    logits = wide[:, :vocab]
    labels = torch.randint(0, vocab, (9,), generator=generator)
    labels[0], labels[1], labels[2], labels[5] = 0, vocab - 1, ignore_index, ignore_index
    labels = labels.to(DEVICE)
    expected = reference_rows(logits, labels, ignore_index)
    acc = stat_dtype(dtype)
    loss, lse = torch.empty(9, dtype=acc, device=DEVICE), torch.empty(9, dtype=acc, device=DEVICE)
    untouched = wide[:, vocab:].clone()
    assert ce_fused.ce_rows_(logits, labels, ignore_index, loss, lse) is None
    statistics_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close("loss", loss, expected[0], statistics_dtype)
    assert_close("lse", lse, expected[1], statistics_dtype)
    assert logits.dtype == dtype
    assert_close("dlogits", logits, expected[2], dtype)
    assert not logits[labels == ignore_index].any()
    assert torch.equal(wide[:, vocab:], untouched), "the row kernel writes past its row"


def test_row_kernel_on_planted_ties_and_infinities():
    """Exact ties in the max share the probability; -inf logits get probability 0; a NaN poisons its row only."""
    hidden, weight, bias = planted_integer_ties()
    logits = (hidden @ weight.T + bias).float()
    logits[0, 5] = float("-inf")
    logits[2, 7] = float("nan")
    labels = torch.tensor([3, 5, 64, 18, 131, 32])  # the first twin, neither, (NaN row), the second twin
    logits, labels = logits.to(DEVICE), labels.to(DEVICE)
    expected = reference_rows(logits, labels, -100)
    loss, lse = torch.empty(6, device=DEVICE), torch.empty(6, device=DEVICE)
    ce_fused.ce_rows_(logits, labels, -100, loss, lse)
    fine = torch.tensor([True, True, False, True, True, True], device=DEVICE)
    assert_close("loss", loss[fine], expected[0][fine], torch.float32)
    assert_close("dlogits", logits[fine], expected[2][fine], torch.float32)
    assert logits[0, 5] == 0 and loss[2].isnan() and logits[2].isnan().all()
    for token in (0, 1, 3, 4, 5):
        twins = list(helpers.TIE_PAIRS[token])
        label = labels[token].item()
        if label in twins:  # the twins' probabilities are equal, so the label's is exactly the other's minus 1
            other = twins[1 - twins.index(label)]
            assert logits[token, label] == logits[token, other] - 1, token
        else:
            assert logits[token, twins[0]] == logits[token, twins[1]], token


def ce_reference(hidden, weight, bias, labels, ignore_index):
    """float64 loss per token (0 at ignored ones) and the gradients of its sum."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    valid = labels != ignore_index
    logits = logits64(*leaves)
    loss = torch.where(valid, F.cross_entropy(logits, torch.where(valid, labels, 0), reduction="none"), 0.0)
    present = [t for t in leaves if t is not None]
    return loss.detach(), logits.detach().logsumexp(1), torch.autograd.grad(loss.sum(), present)


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("with_bias,ignore_index", [(True, -100), (False, 7)], ids=["bias", "plain-ignore7"])
def test_ce_forward_backward_matches_float64(dtype, chunk_size, with_bias, ignore_index):
    """The loss, log-sum-exp and the gradients of the summed loss, on the ragged padded head, in one chunk and in
    eight: dh in hidden's dtype, dW and db in the statistics dtype, padded rows and ignored tokens exactly zero."""
    hidden, weight, bias = head(dtype, bias=with_bias)
    hidden, weight = hidden * 0.3, weight * 0.3  # a softer softmax: every logit's gradient matters
    labels = labels_for(N_TOKENS, ignore_index)
    loss, lse, *found = ce_fused.ce_forward_backward(hidden, weight, bias, labels, VOCAB_SIZE, ignore_index,
                                                     chunk_size, True, True, with_bias)
    expected_loss, expected_lse, expected_grads = ce_reference(hidden, weight, bias, labels, ignore_index)
    acc = stat_dtype(dtype)
    assert loss.dtype == lse.dtype == acc
    # the logits are rounded to the inputs' dtype by the GEMM, as eager PyTorch's are: the input dtype's tolerance
    assert_close("loss", loss, expected_loss, dtype)
    assert_close("lse", lse, expected_lse, dtype)
    grad_hidden, grad_weight, grad_bias = found
    assert grad_hidden.dtype == dtype and grad_weight.dtype == acc and grad_weight.shape == (VOCAB, weight.shape[1])
    assert (grad_bias is None) == (not with_bias)
    for name, got, want in zip(("hidden", "weight", "bias"), (grad_hidden, grad_weight, grad_bias), expected_grads):
        assert_close(f"grad {name}", got, want, dtype)
    assert not grad_weight[VOCAB_SIZE:].any() and (grad_bias is None or not grad_bias[VOCAB_SIZE:].any())
    assert not grad_hidden[labels == ignore_index].any()


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3))[1:], ids=str)
def test_ce_forward_backward_forms_only_the_gradients_asked_for(needs):
    hidden, weight, bias = head(torch.float32)
    labels = labels_for(N_TOKENS)
    _, _, *found = ce_fused.ce_forward_backward(hidden, weight, bias, labels, VOCAB_SIZE, -100, 11, *needs)
    _, _, expected = ce_reference(hidden, weight, bias, labels, -100)
    for name, need, got, want in zip(("hidden", "weight", "bias"), needs, found, expected):
        assert (got is None) == (not need), name
        if need:
            assert_close(f"grad {name}", got, want, torch.float32)
