"""Kernel-level checks of the Triton backend (on the CPU through the interpreter when no GPU is present): what the
shared whole-API suites do not reach, i.e. tile boundaries, the cross-tile combination, both dW paths and the
write-once path's memory, 64-bit offsets, and end-to-end values and gradients against the float64 reference on ragged
shapes."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("triton")

import ceu  # noqa: E402
from ceu import backends  # noqa: E402
from ceu_kernels import chunked  # noqa: E402
from ceu_kernels.contract import stat_dtype  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    backends.choose("triton", torch.device(DEVICE))
except RuntimeError as error:
    pytest.skip(str(error), allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ceu_kernels import ce_forward, tl_utils  # noqa: E402
from ceu_kernels.ce_backward import ce_gradients  # noqa: E402
from ceu_kernels.ce_forward import ce_token_losses  # noqa: E402
from ceu_kernels.lmf_backward import lmf_gradients  # noqa: E402
from ceu_kernels.lmf_forward import lmf_row_stats  # noqa: E402

# The interpreter gets bf16 arithmetic wrong; bf16 is checked where a GPU runs the kernels.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
"""Allowed error relative to the largest magnitude of the float64 reference."""
SMALL_BLOCKS = (16, 16, 16)
"""Minimal ``tl.dot`` tiles: many tile boundaries on the ragged shape."""
N_TOKENS, HIDDEN, VOCAB, VOCAB_SIZE = 37, 40, 300, 290


def assert_close(name, got, expected, dtype):
    """``got`` within ``TOLERANCE[dtype]`` of the float64 ``expected``, scaled by its largest magnitude; reports where."""
    expected = expected.double()
    error = (got.double() - expected).abs()
    bound = TOLERANCE[dtype] * max(expected.abs().max().item(), 1.0)
    if error.numel() and not error.max().item() <= bound:
        where = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        raise AssertionError(f"{name}: error {error.max().item():.3e} at {where} > {bound:.3e}: "
                             f"got {got[where].item():.6g}, expected {expected[where].item():.6g}")


def head(dtype, n_tokens=N_TOKENS, bias=True, seed=0):
    """Hidden states near chosen weight rows (a clear winning logit per token), a weight and a bias, in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64) / HIDDEN**0.5
    winners = torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=generator)
    hidden = 2 * weight[winners] * HIDDEN**0.5 + 0.3 * torch.randn(n_tokens, HIDDEN, generator=generator,
                                                                    dtype=torch.float64)
    bias_t = 0.1 * torch.randn(VOCAB, generator=generator, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias_t)


def logits64(hidden, weight, bias, vocab_size=VOCAB_SIZE):
    logits = hidden.double() @ weight[:vocab_size].double().T
    return logits if bias is None else logits + bias[:vocab_size].double()


# ---------------------------------------------------------------------------------------------------- LMF forward


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


@triton.jit
def _pack_kernel(values, indices, out):
    slots = tl.arange(0, 16)
    tl.store(out + slots, tl_utils.pack_max_index(tl.load(values + slots), tl.load(indices + slots)))


def test_packed_word_orders_by_value_then_lower_index():
    values = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0, 2.0, 7.0, 7.0,
                           float("inf"), -2.0, 1.0, 1.0, 0.5], device=DEVICE)
    indices = torch.tensor([5, 0, 9, 4, 3, 1, 70000, 12, 2**31 - 1, 8, 6, 0, 1, 3, 2, 0], dtype=torch.int32,
                           device=DEVICE)
    packed = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _pack_kernel[(1,)](values, indices, packed)
    value, index = tl_utils.unpack_max_index(packed)
    assert torch.equal(value, values + 0.0) and torch.equal(index, indices.long())
    order = sorted(range(16), key=lambda i: (values[i].item(), -indices[i].item()))
    assert torch.equal(packed.argsort().cpu(), torch.tensor(order))


# ---------------------------------------------------------------------------------------- offsets and scheduling


@triton.jit
def _offsets_kernel(indices, stride, out):
    slots = tl.arange(0, 16)
    tl.store(out + slots, tl_utils.offsets64(tl.load(indices + slots), stride))


def test_offsets_are_64_bit():
    """Row index times stride past 2**31 (a 128256 x 4096 head, a 600k-token batch) must not wrap."""
    indices = torch.tensor([0, 1, 128255, 2**20 + 3, 2**31 - 1] + [7] * 11, dtype=torch.int32, device=DEVICE)
    stride = 128256
    out = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](indices, stride, out)
    expected = [i * stride for i in indices.tolist()]
    assert max(expected) > 2**31 and out.tolist() == expected


@triton.jit
def _tile_kernel(out, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tile_m, tile_n = tl_utils.grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_M)
    tl.store(out + pid, tile_m * n_tiles_n + tile_n)


@pytest.mark.parametrize("n_tiles_m,n_tiles_n", [(1, 1), (3, 5), (11, 4), (8, 1)])
def test_grouped_tiles_cover_each_tile_once(n_tiles_m, n_tiles_n):
    out = torch.empty(n_tiles_m * n_tiles_n, dtype=torch.int32, device=DEVICE)
    _tile_kernel[(out.numel(),)](out, n_tiles_m, n_tiles_n, GROUP_M=4)
    assert sorted(out.tolist()) == list(range(out.numel()))


# --------------------------------------------------------------------------------------------------- LMF backward


def lmf_backward_inputs(dtype, n_tokens=N_TOKENS):
    """Coefficients (some zero, as for masked tokens) and argmaxes that crowd a few rows, so some segments are longer
    than a token block and several rows get no token."""
    hidden, weight, _ = head(dtype, n_tokens)
    acc = stat_dtype(dtype)
    generator = torch.Generator().manual_seed(2)
    coef = torch.randn(n_tokens, generator=generator, dtype=torch.float64).to(DEVICE, acc)
    coef[::5] = 0
    argmax = torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=generator)
    argmax[: n_tokens // 2] = 7
    argmax[-3:] = VOCAB_SIZE - 1
    weight_mean = weight[:VOCAB_SIZE].sum(0, dtype=acc) / VOCAB_SIZE
    return coef, argmax.to(DEVICE), hidden, weight, weight_mean


def lmf_reference(inputs, vocab_size=VOCAB_SIZE):
    return chunked.lmf_backward(*[t.double() if t.is_floating_point() else t for t in inputs], vocab_size,
                                True, True, True)


class RecordTensors(TorchDispatchMode):
    """Records the size and dtype of every floating-point tensor an aten op produces while active (the
    interpreter's own byte views of the arguments are left out)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(str(func), t.numel(), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_lmf_backward_write_once_is_repeatable_and_matches_atomic(dtype):
    inputs = lmf_backward_inputs(dtype)
    blocks = (16, 16, 16)
    first = lmf_gradients(*inputs, VOCAB_SIZE, True, True, True, deterministic=True, blocks=blocks)
    second = lmf_gradients(*inputs, VOCAB_SIZE, True, True, True, deterministic=True, blocks=blocks)
    default = lmf_gradients(*inputs, VOCAB_SIZE, True, True, True, deterministic=False, blocks=blocks)
    for name, a, b, c, ref in zip(("hidden", "weight", "bias"), first, second, default, lmf_reference(inputs)):
        assert a.dtype == b.dtype == c.dtype == dtype
        assert torch.equal(a, b), f"grad {name}: write-once run not bitwise repeatable"
        if dtype == torch.float16:
            assert torch.equal(a, c), f"grad {name}: half-precision weights must always take the write-once path"
        assert_close(f"grad {name} (write-once)", a, ref, dtype)
        assert_close(f"grad {name} (deterministic=False)", c, ref, dtype)
    for grads in (first, default):
        assert not grads[1][VOCAB_SIZE:].any() and not grads[2][VOCAB_SIZE:].any(), "padded rows get zero gradient"


@pytest.mark.parametrize("dtype,deterministic", [(torch.float16, False), (torch.float32, True)], ids=str)
def test_write_once_makes_no_float32_weight_sized_tensor(dtype, deterministic):
    """The weight-dtype output is the only ``[V, H]``-sized tensor: no float32 accumulator, no final cast."""
    inputs = lmf_backward_inputs(dtype)
    with RecordTensors() as recorder:
        grads = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True, deterministic=deterministic)
    weight_sized = [(op, tensor_dtype) for op, numel, tensor_dtype in recorder.made if numel >= VOCAB * HIDDEN]
    assert weight_sized and all(tensor_dtype == dtype for _, tensor_dtype in weight_sized), weight_sized
    assert grads[1].dtype == grads[2].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_write_once_sums_one_segment_holding_every_token(dtype):
    """Every token on the last real row: one program walks the whole batch in token blocks; no other row is hit."""
    coef, argmax, hidden, weight, weight_mean = lmf_backward_inputs(dtype, n_tokens=70)
    inputs = (coef, torch.full_like(argmax, VOCAB_SIZE - 1), hidden, weight, weight_mean)
    got = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True, deterministic=True, blocks=(16, 32, 16))
    expected = lmf_reference(inputs)
    assert_close("grad weight", got[1], expected[1], dtype)
    assert_close("grad bias", got[2], expected[2], dtype)
    assert not got[1][VOCAB_SIZE:].any() and not got[2][VOCAB_SIZE:].any(), "padded rows get zero gradient"


def test_deterministic_algorithms_flag_selects_write_once():
    inputs = lmf_backward_inputs(torch.float32)
    explicit = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True, deterministic=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        implied = lmf_gradients(*inputs, VOCAB_SIZE, False, True, True)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert implied[0] is None and torch.equal(explicit[1], implied[1]) and torch.equal(explicit[2], implied[2])


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_lmf_backward_computes_only_requested_grads(needs, deterministic):
    inputs = lmf_backward_inputs(torch.float32)
    got = lmf_gradients(*inputs, VOCAB_SIZE, *needs, deterministic=deterministic)
    expected = chunked.lmf_backward(*inputs, VOCAB_SIZE, *needs)
    for name, g, ref in zip(("hidden", "weight", "bias"), got, expected):
        assert (g is None) == (ref is None)
        if ref is not None:
            assert_close(f"grad {name}", g, ref, torch.float32)


# ------------------------------------------------------------------------------------------------- cross-entropy


def labels_for(n_tokens, ignore_index=-100, seed=4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=generator)
    labels[::4] = ignore_index
    labels[1] = VOCAB_SIZE - 1
    return labels.to(DEVICE)


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


# ------------------------------------------------------------------------------------- end to end through ceu.*


def upstream_like(loss, reduction):
    if reduction != "none":
        return torch.tensor(0.75, dtype=loss.dtype, device=DEVICE)
    generator = torch.Generator().manual_seed(3)
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(DEVICE, loss.dtype)


def check_against_reference(loss_fn, reference_fn, inputs, dtype, reduction):
    """Values and every gradient of ``loss_fn(*inputs)`` against ``reference_fn`` on float64 copies."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    loss, expected = loss_fn(*leaves), reference_fn(*leaves64)
    assert loss.shape == expected.shape
    assert_close("loss", loss, expected, torch.float32 if dtype == torch.float16 else dtype)
    upstream = upstream_like(loss, reduction)
    present = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad(loss, [leaves[i] for i in present], upstream)
    want = torch.autograd.grad(expected, [leaves64[i] for i in present], upstream.double())
    for i, g, ref in zip(present, got, want):
        assert g.dtype == dtype
        assert_close(f"grad {('hidden', 'weight', 'bias')[i]}", g, ref, dtype)


VARIANTS = {"plain": (False, False, None), "bias+mask": (True, True, None), "2-d tokens": (True, True, (3, 13))}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_lmf_loss_triton_matches_reference(dtype, reduction, variant):
    with_bias, with_mask, lead_shape = VARIANTS[variant]
    n_tokens = 39 if lead_shape else N_TOKENS
    hidden, weight, bias = head(dtype, n_tokens, bias=with_bias)
    if lead_shape:
        hidden = hidden.reshape(*lead_shape, HIDDEN)
    mask = (torch.rand(hidden.shape[:-1], generator=torch.Generator().manual_seed(1)) < 0.6).to(DEVICE) \
        if with_mask else None

    def fused(h, w, b):
        return ceu.linear_lmf_loss(h, w, b, mask=mask, reduction=reduction, impl="triton", vocab_size=VOCAB_SIZE)

    def reference(h, w, b):
        logits = h @ w.T + (0 if b is None else b)
        return ceu.lmf_loss(logits, mask=mask, reduction=reduction, vocab_size=VOCAB_SIZE)

    check_against_reference(fused, reference, (hidden, weight, bias), dtype, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_cross_entropy_triton_matches_reference(dtype, reduction, variant):
    with_bias, _, lead_shape = VARIANTS[variant]
    n_tokens = 39 if lead_shape else N_TOKENS
    hidden, weight, bias = head(dtype, n_tokens, bias=with_bias)
    hidden, weight = hidden * 0.3, weight * 0.3  # a softer softmax: every logit's gradient matters
    labels = labels_for(n_tokens)
    if lead_shape:
        hidden, labels = hidden.reshape(*lead_shape, HIDDEN), labels.reshape(lead_shape)

    def fused(h, w, b):
        return ceu.linear_cross_entropy(h, w, labels, b, reduction=reduction, impl="triton", vocab_size=VOCAB_SIZE)

    def reference(h, w, b):
        logits = (h @ w.T + (0 if b is None else b))[..., :VOCAB_SIZE]
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)
        return loss.reshape(labels.shape) if reduction == "none" else loss

    check_against_reference(fused, reference, (hidden, weight, bias), dtype, reduction)


def test_all_ignored_and_all_masked_batches_give_zero_with_zero_grads():
    hidden, weight, bias = head(torch.float32)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    labels = torch.full((N_TOKENS,), -100, device=DEVICE)
    mask = torch.zeros(N_TOKENS, dtype=torch.bool, device=DEVICE)
    ce = ceu.linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2], impl="triton", vocab_size=VOCAB_SIZE)
    lmf = ceu.linear_lmf_loss(*leaves, mask=mask, impl="triton", vocab_size=VOCAB_SIZE)
    total = ce + lmf
    total.backward()
    assert total.item() == 0.0
    assert all(t.grad is not None and not t.grad.any() for t in leaves)

