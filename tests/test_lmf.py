"""ceu.lmf: the fused LMF loss against the float64 eager reference, on every backend available here; hostile inputs
(property tests on any shape, large logits, NaN/inf); the Triton backend end to end on its kernel tests' ragged
shape."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ceu
from helpers import (AUTOCAST_DTYPES, DTYPES, HIDDEN, INF, KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_VARIANTS, NAN,
                     NON_FINITE_WARNINGS, N_TOKENS, TIE_PAIRS, VOCAB_SIZE, assert_autocast_changes_nothing,
                     assert_close, assert_no_worse_than_eager, check_against_float64, check_against_reference,
                     cuda_kernels, device_impls, grads, head, head_inputs, leaf, planted_integer_ties, random_mask,
                     skip_unsupported, small_gap_inputs, torch_max_on_float64, needs_triton, under_autocast)

DEVICE_IMPLS = device_impls()
# (lead shape of hidden, H, V, vocab_size): a block-friendly shape and a ragged one with a padded vocabulary.
SHAPES = {"nice": ((64,), 32, 256, None), "ragged": ((3, 13), 40, 300, 290)}
VARIANTS = {"plain": (False, False), "mask": (False, True), "bias+mask": (True, True)}


def reference_outputs(hidden, weight, bias, mask, reduction, vocab_size):
    """Loss and logits of the eager reference, in the dtype of the given tensors."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return ceu.lmf_loss(logits, mask=mask, reduction=reduction, vocab_size=vocab_size)


def upstream_for(loss, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(loss.device)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_grads_match_reference(device, impl, shape, variant, reduction, dtype):
    if reason := skip_unsupported(device, impl, dtype):
        pytest.skip(reason)
    lead_shape, hidden_size, vocab, vocab_size = SHAPES[shape]
    with_bias, with_mask = VARIANTS[variant]
    n_tokens = int(torch.tensor(lead_shape).prod())
    hidden, weight, bias = head_inputs(n_tokens, hidden_size, vocab, dtype, device, bias=with_bias,
                                       lead_shape=lead_shape)
    mask = random_mask(lead_shape, device) if with_mask else None
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss = ceu.linear_lmf_loss(*inputs, mask=mask, reduction=reduction, impl=impl, vocab_size=vocab_size)
    upstream = upstream_for(loss)
    ours = grads(loss, inputs, upstream.to(loss.dtype))
    check_against_reference(loss, ours, lambda h, w, b: reference_outputs(h, w, b, mask, reduction, vocab_size),
                            (hidden, weight, bias), upstream, dtype)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_gradcheck_float64(device, impl):
    hidden, weight, bias = head_inputs(7, 9, 13, torch.float64, device, bias=True)
    mask = random_mask((7,), device)
    torch.autograd.gradcheck(
        lambda h, w, b: ceu.linear_lmf_loss(h, w, b, mask=mask, impl=impl, chunk_size=3, vocab_size=11),
        (leaf(hidden), leaf(weight), leaf(bias)), fast_mode=impl != "torch")  # full Jacobians are slow in an interpreter


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planted_ties_pick_first_index(device, impl, dtype):
    """Exact ties in the max resolve to the lowest vocabulary index, and only that row receives gradient."""
    if reason := skip_unsupported(device, impl, dtype):
        pytest.skip(reason)
    hidden, weight, bias = (t.to(device=device, dtype=dtype) for t in planted_integer_ties())
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss, stats = ceu.linear_lmf_loss(*inputs, reduction="sum", impl=impl, return_stats=True)
    assert stats.argmax.tolist() == [first for first, _ in TIE_PAIRS]
    grad_weight = torch.autograd.grad(loss, inputs[1])[0].double()
    reference_inputs = [leaf(t, torch.float64) for t in (hidden, weight, bias)]
    reference = reference_outputs(*reference_inputs, None, "sum", None)
    reference_grad_weight = torch.autograd.grad(reference, reference_inputs[1])[0]
    for first, second in TIE_PAIRS:
        # The first twin gets the whole +c h; the losing twin only the uniform -c/V share, as in the reference.
        assert_close(f"grad weight rows {first}, {second}", grad_weight[[first, second]],
                     reference_grad_weight[[first, second]], dtype)
        assert (grad_weight[first] - grad_weight[second]).abs().max() > 1


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_padded_vocab_rows_are_ignored(device, impl):
    """Padding rows with huge logits change neither the max nor the mean, and get zero gradient."""
    hidden, weight, bias = head_inputs(9, 24, 70, torch.float32, device, bias=True)
    weight[64:] = 100 * hidden.mean(0)
    bias[64:] = 1e3
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss = ceu.linear_lmf_loss(*inputs, impl=impl, vocab_size=64)
    expected = ceu.linear_lmf_loss(hidden, weight[:64], bias[:64], impl="torch")
    assert_close("loss", loss, expected, torch.float32)
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(loss, inputs)
    assert grad_weight[64:].abs().max() == 0 and grad_bias[64:].abs().max() == 0
    reference_inputs = [leaf(t[:64] if t.dim() and t.shape[0] == 70 else t, torch.float64) for t in inputs]
    reference = reference_outputs(*reference_inputs, None, "mean", None)
    assert_close("grad hidden", grad_hidden, torch.autograd.grad(reference, reference_inputs[0])[0], torch.float32)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_chunk_sizes_agree(device, impl):
    hidden, weight, bias = head_inputs(29, 20, 90, torch.float64, device, bias=True)
    mask = random_mask((29,), device)
    results = []
    for chunk_size in (1, 4, 29, 100, None):
        inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        loss = ceu.linear_lmf_loss(*inputs, mask=mask, impl=impl, chunk_size=chunk_size)
        results.append([loss, *torch.autograd.grad(loss, inputs)])
    for other in results[1:]:
        for expected, got in zip(results[0], other):
            assert_close("chunked", got, expected, torch.float64)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("wanted", list(itertools.product([False, True], repeat=3))[1:], ids=str)
def test_gradients_only_where_required(device, impl, wanted):
    hidden, weight, bias = head_inputs(10, 16, 40, torch.float64, device, bias=True)
    inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight, bias), wanted)]
    loss = ceu.linear_lmf_loss(*inputs, impl=impl)
    got = grads(loss, inputs, torch.ones_like(loss))
    reference_inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight, bias), wanted)]
    expected = grads(reference_outputs(*reference_inputs, None, "mean", None), reference_inputs,
                     torch.ones((), dtype=torch.float64, device=device))
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close("grad", g, e, torch.float64)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_no_grad_and_detached_inputs(device, impl):
    hidden, weight, _ = head_inputs(8, 16, 40, torch.float32, device)
    with torch.no_grad():
        loss = ceu.linear_lmf_loss(leaf(hidden), leaf(weight), impl=impl)
    assert loss.grad_fn is None
    assert_close("loss", loss, ceu.linear_lmf_loss(hidden, weight, impl=impl), torch.float32)
    assert not ceu.linear_lmf_loss(hidden, weight, impl=impl).requires_grad


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_batch_gives_zero_with_connected_grads(device, impl, reduction):
    hidden, weight, bias = head_inputs(7, 16, 40, torch.float32, device, bias=True)
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    mask = torch.zeros(7, dtype=torch.bool, device=device)
    loss = ceu.linear_lmf_loss(*inputs, mask=mask, reduction=reduction, impl=impl)
    assert torch.all(loss == 0) and loss.requires_grad
    for grad in torch.autograd.grad(loss.sum(), inputs):
        assert torch.all(grad == 0)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_empty_batch(device, impl):
    _, weight, _ = head_inputs(1, 16, 40, torch.float32, device)
    hidden = leaf(torch.zeros(0, 16, device=device))
    loss = ceu.linear_lmf_loss(hidden, leaf(weight), impl=impl)
    assert loss.item() == 0
    assert ceu.linear_lmf_loss(hidden, weight, impl=impl, reduction="none").shape == (0,)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_inputs_are_not_modified(device, impl):
    hidden, weight, bias = head_inputs(12, 16, 40, torch.float32, device, bias=True)
    mask = random_mask((12,), device)
    originals = [t.clone() for t in (hidden, weight, bias, mask)]
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss = ceu.linear_lmf_loss(*inputs, mask=mask, impl=impl, reduction="none")
    loss.sum().backward()
    for before, after in zip(originals, (*inputs, mask)):
        assert torch.equal(before, after.detach())


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_return_stats_match_the_logits(device, impl):
    hidden, weight, bias = head_inputs(15, 24, 60, torch.float64, device, bias=True, lead_shape=(3, 5))
    loss, stats = ceu.linear_lmf_loss(hidden, weight, bias, impl=impl, return_stats=True, vocab_size=55,
                                      reduction="none")
    logits = (hidden @ weight.T + bias)[..., :55]
    assert isinstance(stats, ceu.LMFStats) and stats.argmax.shape == (3, 5)
    assert_close("max", stats.max, logits.max(-1).values, torch.float64)
    assert_close("mean", stats.mean, logits.mean(-1), torch.float64)
    assert torch.equal(stats.argmax, logits.argmax(-1))
    assert_close("loss", loss, (stats.max - stats.mean) ** 2, torch.float64)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_tied_embedding_gradients_accumulate(device, impl):
    """A head tied to the input embeddings gets the sum of both uses' gradients."""
    _, weight, _ = head_inputs(1, 16, 50, torch.float64, device)
    tokens = torch.tensor([[3, 7, 7, 49, 0]], device=device)
    results = []
    for loss_fn in (lambda h, w: ceu.linear_lmf_loss(h, w, impl=impl),
                    lambda h, w: reference_outputs(h, w, None, None, "mean", None)):
        tied = leaf(weight)
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, tied) * 2)
        results.append(torch.autograd.grad(loss_fn(hidden, tied), tied)[0])
    assert_close("grad weight", results[0], results[1], torch.float64)


def test_module_matches_function():
    hidden, weight, bias = head_inputs(9, 16, 40, torch.float32, bias=True)
    mask = random_mask((9,))
    module = ceu.LinearLMFLoss(reduction="sum", chunk_size=2, vocab_size=37)
    expected = ceu.linear_lmf_loss(hidden, weight, bias, mask=mask, reduction="sum", vocab_size=37)
    assert_close("loss", module(hidden, weight, bias, mask=mask), expected, torch.float32)
    assert "reduction='sum'" in repr(module)


def test_mean_reduction_counts_only_masked_tokens():
    hidden, weight, _ = head_inputs(10, 16, 40, torch.float64)
    mask = random_mask((10,))
    per_token = ceu.linear_lmf_loss(hidden, weight, reduction="none")
    mean = ceu.linear_lmf_loss(hidden, weight, mask=mask)
    assert_close("mean", mean, per_token[mask].mean(), torch.float64)


def test_half_precision_mean_is_upcast_in_chunks(monkeypatch):
    """The mean h.w_mean + b_mean is accumulated in float32 a few tokens at a time, with the same result."""
    hidden, weight, bias = head_inputs(23, 16, 40, torch.float16, bias=True)
    expected = ceu.linear_lmf_loss(hidden, weight, bias, reduction="none", return_stats=True)[1].mean
    monkeypatch.setattr(ceu.lmf, "UPCAST_CHUNK_BYTES", 3 * 16 * 4)
    got = ceu.linear_lmf_loss(hidden, weight, bias, reduction="none", return_stats=True)[1].mean
    assert_close("mean, upcast in chunks", got, expected, torch.float32)
    reference = (hidden.double() @ weight.double().T + bias.double()).mean(-1)
    assert_close("mean", got, reference, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_column_sum_is_upcast_in_chunks(monkeypatch, dtype):
    """The weight's row mean of a half-precision head is summed in float32 a few rows at a time (ragged last
    chunk), never as one float32 copy of the weight; the same sum as in one go."""
    _, weight, _ = head_inputs(1, 16, 41, dtype)
    whole = ceu.lmf.column_sum(weight, torch.float32)
    monkeypatch.setattr(ceu.lmf, "UPCAST_CHUNK_BYTES", 3 * 16 * 4)
    upcasts = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda t, *a, **k: upcasts.append(t.shape[0]) or real_sum(t, *a, **k))
    chunked = ceu.lmf.column_sum(weight, torch.float32)
    assert upcasts == ([3] * 13 + [2] if dtype != torch.float32 else [41])
    assert_close("column sum", chunked, weight.double().sum(0), torch.float32)
    assert_close("column sum in one go", whole, weight.double().sum(0), torch.float32)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_changes_nothing(device, impl, autocast_dtype, dtype):
    """The fused loss computes in its inputs' dtype under autocast: a lowered mean would not match the max's GEMM."""
    if reason := skip_unsupported(device, impl, dtype):
        pytest.skip(reason)
    tensors = small_gap_inputs(24, 32, 64, dtype, device)
    mask = random_mask((24,), device)
    loss_fn = lambda h, w, b: ceu.linear_lmf_loss(h, w, b, mask=mask, impl=impl, vocab_size=60,  # noqa: E731
                                                  return_stats=True)
    (loss, stats), _ = under_autocast(loss_fn, tensors, device, None)
    assert loss.dtype == stats.max.dtype == stats.mean.dtype == torch.float32
    assert_autocast_changes_nothing(loss_fn, tensors, device, autocast_dtype)


# ---- hostile inputs: property tests against the float64 reference, large logits, non-finite inputs ----------------

EXAMPLES = {"torch": 40, "triton": 12, "cuda": 40}


@st.composite
def head_problems(draw):
    n_tokens = draw(st.integers(0, 19))
    return dict(n_tokens=n_tokens, hidden_size=draw(st.integers(1, 37)), vocab=draw(st.integers(1, 90)),
                with_bias=draw(st.booleans()), mask=draw(st.lists(st.booleans(), min_size=n_tokens,
                                                                   max_size=n_tokens)),
                pad=draw(st.integers(0, 3)), chunk_size=draw(st.one_of(st.none(), st.integers(1, 8))),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_lmf_any_shape_matches_reference(device, impl):
    """Any shape, any mask (empty included), padded vocab, chunking: values and grads equal the float64 reference."""

    @settings(max_examples=EXAMPLES[impl], deadline=None, suppress_health_check=list(HealthCheck))
    @given(problem=head_problems())
    def check(problem):
        vocab = problem["vocab"] + problem["pad"]
        hidden, weight, bias = head_inputs(problem["n_tokens"], problem["hidden_size"], vocab, torch.float64, device,
                                           bias=problem["with_bias"], seed=problem["seed"])
        mask = torch.tensor(problem["mask"], dtype=torch.bool, device=device)
        inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        loss = ceu.linear_lmf_loss(*inputs, mask=mask, reduction=problem["reduction"], impl=impl,
                                   chunk_size=problem["chunk_size"], vocab_size=problem["vocab"])
        reference_inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        logits = reference_inputs[0] @ reference_inputs[1].T
        if bias is not None:
            logits = logits + reference_inputs[2]
        reference = ceu.lmf_loss(logits, mask=mask, reduction=problem["reduction"], vocab_size=problem["vocab"])
        upstream = torch.linspace(0.5, 1.5, max(reference.numel(), 1), dtype=torch.float64,
                                  device=device)[: reference.numel()].reshape(reference.shape)
        assert_close("loss", loss, reference, torch.float64)
        for got, expected in zip(grads(loss, inputs, upstream), grads(reference, reference_inputs, upstream)):
            if expected is not None:
                assert_close("grad", got, expected, torch.float64)

    check()


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_logits_near_1e4_stay_finite(device, impl, dtype):
    """Logits of magnitude ~1e4 in half precision: loss and every gradient finite, close to the float64 values.

    The shape keeps the true gradients (c h ~ 2e4/64 * 6) inside fp16's range, so any inf would be ours."""
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter; tested on a GPU")
    hidden, weight, bias = head_inputs(64, 256, 50, torch.float64, device, bias=True, seed=7)
    scale = 1e4 / (hidden @ weight.T).abs().max()
    hidden, weight, bias = hidden * scale.sqrt(), weight * scale.sqrt(), bias * 100
    inputs = [leaf(t, dtype) for t in (hidden, weight, bias)]
    labels = torch.arange(64, device=device) % 50
    for loss in (ceu.linear_lmf_loss(*inputs, impl=impl),
                 ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], impl=impl)):
        assert torch.isfinite(loss)
        for grad in torch.autograd.grad(loss, inputs):
            assert torch.isfinite(grad).all()
    expected = ceu.linear_lmf_loss(hidden, weight, bias, impl="torch")
    assert_close("loss", ceu.linear_lmf_loss(*inputs, impl=impl), expected, dtype)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_input_propagates_to_the_loss(device, impl, poison):
    """A NaN or inf in a counted token makes the loss NaN/inf, never a silent finite number; masking the token hides
    it from the loss (as in eager PyTorch, its gradient contributions may still be non-finite)."""
    hidden, weight, _ = head_inputs(6, 16, 40, torch.float32, device)
    hidden[2, 3] = poison
    assert not torch.isfinite(ceu.linear_lmf_loss(hidden, weight, impl=impl))
    labels = torch.arange(6, device=device)
    assert not torch.isfinite(ceu.linear_cross_entropy(hidden, weight, labels, impl=impl))
    mask = torch.ones(6, dtype=torch.bool, device=device)
    mask[2] = False
    assert torch.isfinite(ceu.linear_lmf_loss(hidden, weight, mask=mask, impl=impl))
    weight[11, 0] = poison
    assert not torch.isfinite(ceu.linear_lmf_loss(hidden, weight, mask=mask, impl=impl))


# ---- NaN / inf rows: max and argmax follow torch.max(dim), and no index ever leaves the real vocabulary ----------

@NON_FINITE_WARNINGS
@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("poison", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("counted", [True, False], ids=["counted", "masked"])
@pytest.mark.parametrize("dtype,with_bias", [(torch.float32, False), (torch.float64, True)], ids=["fp32", "fp64_bias"])
def test_non_finite_token_stats_and_gradients(device, impl, poison, counted, dtype, with_bias):
    """A NaN/inf hidden state, counted or masked, through forward and backward (padded vocabulary whose rows are
    NaN): nothing crashes, the argmax is torch.max's on the float64 logits and a real row, a counted NaN makes the
    loss NaN, a masked one leaves it finite and equal to the reference, the other tokens' dh are finite and equal the
    reference's, and the padded rows of dW and db stay exactly zero (no index reached them)."""
    vocab_size, n_tokens, poisoned = 20, 5, 2
    hidden, weight, bias = head_inputs(n_tokens, 8, vocab_size, dtype, device, bias=with_bias, seed=11)
    hidden[poisoned, 3] = poison
    weight = torch.cat([weight, torch.full_like(weight[:4], NAN)])
    bias = None if bias is None else torch.cat([bias, torch.full_like(bias[:4], NAN)])
    mask = torch.ones(n_tokens, dtype=torch.bool, device=device)
    mask[4] = False
    mask[poisoned] = counted
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss, stats = ceu.linear_lmf_loss(*inputs, mask=mask, impl=impl, vocab_size=vocab_size, return_stats=True)
    grad_hidden, grad_weight, grad_bias = grads(loss, inputs, torch.ones_like(loss))

    expected = torch_max_on_float64(hidden, weight, bias, vocab_size)
    assert ((stats.argmax >= 0) & (stats.argmax < vocab_size)).all()
    assert torch.equal(stats.argmax, expected[1])
    assert_close("max", stats.max, expected[0], dtype, equal_nan=True)

    real = [leaf(hidden, torch.float64), leaf(weight[:vocab_size], torch.float64),
            leaf(None if bias is None else bias[:vocab_size], torch.float64)]
    logits = real[0] @ real[1].T + (0 if bias is None else real[2])
    reference = ceu.lmf_loss(logits, mask=mask)
    reference_hidden = grads(reference, real, torch.ones_like(reference))[0]
    if counted:
        assert loss.isnan() if poison != poison else not loss.isfinite()
    else:
        assert loss.isfinite()
        assert_close("loss", loss, reference, dtype)
    others = [i for i in range(n_tokens) if i != poisoned]
    assert grad_hidden[others].isfinite().all()
    assert_close("grad hidden", grad_hidden[others], reference_hidden[others], dtype)
    assert (grad_weight[vocab_size:] == 0).all()
    if with_bias:
        assert (grad_bias[vocab_size:] == 0).all()


# ---- the Triton backend end to end, on the ragged shape of its kernel tests ----------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_linear_lmf_loss_triton_matches_reference(dtype, reduction, variant):
    with_bias, with_mask, lead_shape = KERNEL_VARIANTS[variant]
    n_tokens = 39 if lead_shape else N_TOKENS
    hidden, weight, bias = head(dtype, n_tokens, bias=with_bias)
    if lead_shape:
        hidden = hidden.reshape(*lead_shape, HIDDEN)
    mask = (torch.rand(hidden.shape[:-1], generator=torch.Generator().manual_seed(1)) < 0.6).to(KERNEL_DEVICE) \
        if with_mask else None

    def fused(h, w, b):
        return ceu.linear_lmf_loss(h, w, b, mask=mask, reduction=reduction, impl="triton", vocab_size=VOCAB_SIZE)

    def reference(h, w, b):
        logits = h @ w.T + (0 if b is None else b)
        return ceu.lmf_loss(logits, mask=mask, reduction=reduction, vocab_size=VOCAB_SIZE)

    check_against_float64(fused, reference, (hidden, weight, bias), dtype, reduction)


# ---- the CUDA backend end to end (GPU) ----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(cuda_kernels() is None, reason="needs a CUDA device and the built extension ceu_kernels._C")
# End-to-end shapes: (lead shape, H, V, vocab_size), with chunk sizes that force several chunks and backward tiles.
E2E_SHAPES = {"ragged": ((3, 41), 72, 1000, 990), "wide": ((257,), 128, 5003, None)}



@needs_gpu
@pytest.mark.parametrize("shape", list(E2E_SHAPES))
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("variant", ["plain", "bias+mask"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lmf_end_to_end_matches_reference(shape, chunk_size, variant, reduction, dtype):
    lead_shape, hidden_size, vocab, vocab_size = E2E_SHAPES[shape]
    with_extras = variant == "bias+mask"
    hidden, weight, bias = head_inputs(int(torch.tensor(lead_shape).prod()), hidden_size, vocab, dtype, "cuda",
                                       bias=with_extras, lead_shape=lead_shape)
    mask = random_mask(lead_shape, "cuda") if with_extras else None

    def run(tensors, impl=None):
        inputs = [leaf(t) for t in tensors]
        if impl is None:
            logits = inputs[0] @ inputs[1].T + (0 if inputs[2] is None else inputs[2])
            loss = ceu.lmf_loss(logits, mask=mask, reduction=reduction, vocab_size=vocab_size)
        else:
            loss = ceu.linear_lmf_loss(*inputs, mask=mask, reduction=reduction, impl=impl, chunk_size=chunk_size,
                                       vocab_size=vocab_size)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
        return loss, grads(loss, inputs, upstream.to(device=loss.device, dtype=loss.dtype))

    loss, ours = run((hidden, weight, bias), "cuda")
    reference, reference_grads = run([None if t is None else t.double() for t in (hidden, weight, bias)])
    eager, eager_grads = run((hidden, weight, bias))
    assert_no_worse_than_eager("loss", loss, eager, reference, dtype)
    for name, got, eager_grad, expected in zip(("hidden", "weight", "bias"), ours, eager_grads, reference_grads):
        if expected is not None:
            assert got.dtype == dtype
            assert_no_worse_than_eager(f"grad {name}", got, eager_grad, expected, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planted_ties_pick_the_first_index_end_to_end(dtype):
    tie_pairs = [(3, 2999), (0, 1), (1024, 2048), (17, 1500), (2990, 2991)]  # within and across chunks
    hidden, weight, bias = planted_integer_ties(3000, 64, tie_pairs=tie_pairs)  # exact in any summation order
    _, stats = ceu.linear_lmf_loss(hidden.to("cuda", dtype), weight.to("cuda", dtype), bias.to("cuda", dtype),
                                   impl="cuda", return_stats=True)
    assert stats.argmax.tolist() == [first for first, _ in tie_pairs]
