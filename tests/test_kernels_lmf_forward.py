"""ceu_kernels.lmf_forward: the Triton row max/argmax launcher (on the CPU through the interpreter when no GPU is
present) on tile boundaries, both ways of combining vocab tiles, planted ties and NaN/inf rows."""
import pytest
import torch

from helpers import (INF, N_TOKENS, NAN, NON_FINITE_WARNINGS, SMALL_BLOCKS, VOCAB, VOCAB_SIZE, assert_close,
                     device_impls, head, logits64, torch_max_on_float64, triton_device)

DEVICE = triton_device()
DEVICE_IMPLS = device_impls()

from ceu_kernels.contract import stat_dtype  # noqa: E402
from ceu_kernels.lmf_forward import lmf_row_stats  # noqa: E402


def planted_ties(dtype):
    """One-hot hidden states, so each logit is exactly a weight entry (plus a constant bias), with equal maxima
    planted per token in different vocab tiles, a larger value in a padded row, and ties at 0.0 for the tokens
    whose logits are otherwise all negative. Every dot product has a single nonzero term, so the planted ties are
    exact in any summation order and tiling (no reliance on two tiles rounding alike)."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.zeros(N_TOKENS, 32, dtype=torch.float64)
    hidden[torch.arange(N_TOKENS), torch.arange(N_TOKENS) % 32] = 1.0
    weight = torch.randn(VOCAB, 32, generator=generator, dtype=torch.float64)
    top = weight.max().item() + 1
    for column in range(31):
        rows = torch.randperm(VOCAB_SIZE, generator=generator)[:3]
        weight[rows, column] = top
    weight[VOCAB_SIZE + 3, :] = top + 1
    weight[:, 31] = -weight[:, 31].abs() - 1
    weight[[150, 77, 2], 31] = 0.0
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_planted_ties_across_vocab_tiles_pick_first_index(dtype):
    """Both ways of combining vocab tiles: the packed atomic word (fp32, fp16) and the partials (fp64)."""
    hidden, weight = planted_ties(dtype)
    bias = torch.full((VOCAB,), 0.25, dtype=dtype, device=DEVICE)
    row_max, argmax = lmf_row_stats(hidden, weight, bias, VOCAB_SIZE, blocks=SMALL_BLOCKS)
    expected_max, expected_arg = logits64(hidden, weight, bias).max(dim=1)
    assert torch.equal(argmax.cpu(), expected_arg.cpu())
    assert_close("max", row_max, expected_max, dtype)
    assert (argmax[31::32] == 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, (32, 64, 32)], ids=str)
def test_row_max_argmax_match_torch(dtype, blocks):
    hidden, weight, bias = head(dtype)
    row_max, argmax = lmf_row_stats(hidden, weight, bias, VOCAB_SIZE, blocks=blocks)
    expected_max, expected_arg = logits64(hidden, weight, bias).max(dim=1)
    assert row_max.dtype == stat_dtype(dtype) and argmax.dtype == torch.int64
    assert torch.equal(argmax.cpu(), expected_arg.cpu())
    assert_close("max", row_max, expected_max, stat_dtype(dtype))


# ---- NaN / inf rows: max and argmax follow torch.max(dim), and no index ever leaves the real vocabulary ----------

def special_head(dtype, vocab_size=70, padded=80, hidden_size=4, seed=3):
    """A head whose logits rows hold NaN and +/-inf where they test the rule: column 1 of the weight is 1 except 0 at
    rows 37 and 50 (so an inf in hidden column 1 gives inf everywhere and NaN there, the first NaN in a later tile
    than the first inf), column 2 is 1 (inf there: a row of one infinity), column 3 is -1 except +1 at rows 20 and 45
    (a +inf there ties at 20 and 45). The padded rows are NaN: they must never count."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(padded, hidden_size, generator=generator, dtype=torch.float64)
    weight[:, 1], weight[[37, 50], 1] = 1.0, 0.0
    weight[:, 2] = 1.0
    weight[:, 3], weight[[20, 45], 3] = -1.0, 1.0
    weight[vocab_size:] = NAN
    hidden = torch.zeros(10, hidden_size, dtype=torch.float64)
    hidden[:, 0] = torch.randn(10, generator=generator, dtype=torch.float64)
    hidden[0, 1], hidden[1, 1] = INF, -INF  # inf / -inf everywhere, NaN at 37 and 50
    hidden[2, 2], hidden[3, 2] = INF, -INF  # all +inf / all -inf: index 0
    hidden[4, 3], hidden[5, 3] = INF, -INF  # +inf at 20 and 45 only / -inf at 20 and 45 only
    hidden[6, 0] = NAN  # all NaN
    return hidden.to(dtype), weight.to(dtype), vocab_size


@NON_FINITE_WARNINGS
@pytest.mark.skipif(not any(impl == "triton" for _, impl in DEVICE_IMPLS), reason="Triton is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("nan_weight_row", [False, True], ids=["finite_weight", "nan_weight_row_58"])
def test_lmf_row_stats_nan_and_inf_rows(dtype, nan_weight_row):
    """The Triton forward in both ways of combining tiles (packed word for float32, partials for float64), several
    vocab tiles: a NaN row gives NaN at its first NaN even when
    +inf is in an earlier tile (the packed key of NaN is above +inf's), a row of -inf gives index 0, ties of +inf
    the lower index, the NaN padded rows never count, and every argmax is a real row."""
    from ceu_kernels.lmf_forward import lmf_row_stats

    device = [d for d, impl in DEVICE_IMPLS if impl == "triton"][-1]
    hidden, weight, vocab_size = special_head(dtype)
    if nan_weight_row:  # a NaN logit at 58 in every row: the finite rows' argmax moves to a later tile
        weight[58, 0] = NAN
    hidden, weight = hidden.to(device), weight.to(device)
    row_max, argmax = lmf_row_stats(hidden, weight, None, vocab_size, blocks=(16, 16, 16))
    expected = torch_max_on_float64(hidden, weight, None, vocab_size)
    assert ((argmax >= 0) & (argmax < vocab_size)).all()
    assert torch.equal(argmax, expected[1])
    assert_close("max", row_max, expected[0], dtype, equal_nan=True)
    assert expected[1][:7].tolist() == ([37, 37, 58, 58, 58, 58, 0] if nan_weight_row else [37, 37, 0, 0, 20, 0, 0])
