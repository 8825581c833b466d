"""ceu.checks: bad input fails early with an error that names the argument."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ceu
from helpers import assert_close, needs_triton

H, V = 8, 20


def good():
    return {"hidden": torch.randn(2, 5, H), "weight": torch.randn(V, H), "bias": torch.randn(V),
            "mask": torch.ones(2, 5, dtype=torch.bool)}


LMF_CASES = [
    ({"hidden": [[1.0] * H]}, TypeError, "hidden must be a torch.Tensor"),
    ({"hidden": torch.ones(2, H, dtype=torch.int64)}, TypeError, "hidden must be a floating-point"),
    ({"hidden": torch.tensor(1.0)}, ValueError, "hidden must have shape"),
    ({"weight": torch.randn(V, H + 1)}, ValueError, "weight must be [V, H]"),
    ({"weight": torch.randn(V, H, 1)}, ValueError, "weight must have 2 dimension"),
    ({"weight": torch.randn(V, H, dtype=torch.float64)}, TypeError, "weight dtype torch.float64 does not match"),
    ({"weight": torch.randn(V, H, device="meta")}, ValueError, "weight is on meta"),
    ({"weight": torch.randn(0, H)}, ValueError, "empty vocabulary"),
    ({"bias": torch.randn(V + 1)}, ValueError, "bias must be [V]"),
    ({"bias": torch.randn(V, dtype=torch.float16)}, TypeError, "bias dtype"),
    ({"mask": torch.ones(2, 5)}, TypeError, "mask must be a bool tensor"),
    ({"mask": torch.ones(10, dtype=torch.bool)}, ValueError, "mask must have shape"),
    ({"vocab_size": V + 1}, ValueError, "vocab_size must be an int in [1, V = 20]"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be an int"),
    ({"vocab_size": 3.0}, ValueError, "vocab_size must be an int"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"impl": "cutlass"}, ValueError, "impl must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
]


@pytest.mark.parametrize("change,error,message", LMF_CASES, ids=[m for _, _, m in LMF_CASES])
def test_lmf_bad_input(change, error, message):
    args = good() | change
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        ceu.linear_lmf_loss(args.pop("hidden"), args.pop("weight"), args.pop("bias"), **args)


CE_CASES = [
    ({"labels": torch.zeros(2, 5)}, TypeError, "labels must be an int64 or int32"),
    ({"labels": torch.zeros(10, dtype=torch.long)}, ValueError, "labels must have shape"),
    ({"labels": torch.full((2, 5), V, dtype=torch.long)}, ValueError, "labels must lie in"),
    ({"labels": torch.full((2, 5), -1, dtype=torch.long)}, ValueError, "labels must lie in"),
    ({"labels": torch.full((2, 5), 15, dtype=torch.long), "vocab_size": 15}, ValueError, "labels must lie in"),
    ({"weight": torch.randn(V, H - 1)}, ValueError, "weight must be"),
]


@pytest.mark.parametrize("change,error,message", CE_CASES, ids=[m for _, _, m in CE_CASES])
def test_cross_entropy_bad_input(change, error, message):
    args = good() | {"labels": torch.zeros(2, 5, dtype=torch.long)} | change
    del args["mask"]
    with pytest.raises(error, match=message):
        ceu.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("bias"), **args)


# --- Inputs the kernels cannot take: a ceu error naming the limitation, not a dispatcher message -------------------

FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, name)]


def call(loss, hidden, weight, bias=None, **kwargs):
    """One of the two fused losses, with all-zero labels (in range for any V) for the cross-entropy."""
    labels = kwargs.pop("labels", None)
    if loss == "lmf":
        return ceu.linear_lmf_loss(hidden, weight, bias, impl="torch", **kwargs)
    if labels is None:
        labels = torch.zeros(7 if hidden.is_nested else hidden.shape[:-1], dtype=torch.long)
    return ceu.linear_cross_entropy(hidden, weight, labels, bias, impl="torch", **kwargs)


LOSSES = ["lmf", "ce"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [*FLOAT8, torch.complex64], ids=str)
def test_unsupported_dtypes_are_named(loss, dtype):
    """float8 reached the chunked backend's torch.max ('"max_cpu" not implemented for ...')."""
    kind = "floating-point" if dtype.is_complex else rf"dtype {dtype} is not supported: use one of \(torch.float16"
    with pytest.raises(TypeError, match=f"hidden (must be a|{kind})"):
        call(loss, torch.randn(3, H).to(dtype), torch.randn(V, H).to(dtype))


def nested(layout):
    with warnings.catch_warnings():  # the strided layout is a prototype that says so
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor([torch.randn(3, H), torch.randn(4, H)], layout=layout)


SPARSE_AND_NESTED = {
    "sparse hidden": ("hidden", lambda: (torch.randn(4, H).to_sparse(), torch.randn(V, H), None), "dense.*sparse_coo"),
    "sparse weight": ("weight", lambda: (torch.randn(4, H), torch.randn(V, H).to_sparse(), None), "dense.*sparse_coo"),
    "csr weight": ("weight", lambda: (torch.randn(4, H), torch.randn(V, H).to_sparse(layout=torch.sparse_csr), None),
                   "dense.*sparse_csr"),
    "sparse bias": ("bias", lambda: (torch.randn(4, H), torch.randn(V, H), torch.randn(V).to_sparse()),
                    "dense.*sparse_coo"),
    "jagged hidden": ("hidden", lambda: (nested(torch.jagged), torch.randn(V, H), None), "nested.*to_padded_tensor"),
    "nested hidden": ("hidden", lambda: (nested(torch.strided), torch.randn(V, H), None), "nested.*to_padded_tensor"),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", list(SPARSE_AND_NESTED))
def test_sparse_and_nested_inputs_are_named(loss, case):
    """Before: 'Could not run aten::as_strided with arguments from the SparseCPU backend', 'view(): cannot view
    shape (2, j1, 8)', 'NestedTensorImpl doesn't support sizes'."""
    name, build, message = SPARSE_AND_NESTED[case]
    with pytest.raises(TypeError, match=f"^{name} (must be a |is a nested).*{message}"):
        call(loss, *build())


@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_or_nested_mask_and_labels_are_named(loss):
    hidden, weight = torch.randn(4, H), torch.randn(V, H)
    if loss == "lmf":
        with pytest.raises(TypeError, match="^mask must be a dense"):
            call(loss, hidden, weight, mask=torch.ones(4, dtype=torch.bool).to_sparse())
    else:
        with pytest.raises(TypeError, match="^labels must be a dense"):
            call(loss, hidden, weight, labels=torch.zeros(4, dtype=torch.long).to_sparse())


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_width_hidden_is_refused(loss):
    """H = 0: a reshape error before ('cannot reshape tensor of 0 elements into shape [-1, 0]')."""
    with pytest.raises(ValueError, match=r"hidden has no features \(H = 0, shape \(2, 5, 0\)\)"):
        call(loss, torch.randn(2, 5, 0), torch.randn(V, 0))


def test_no_tokens_is_still_a_zero_loss():
    """N = 0 is not refused: an empty batch has loss 0 (the documented "no token counts" rule)."""
    for loss in LOSSES:
        assert call(loss, torch.randn(0, H), torch.randn(V, H)).item() == 0.0


@pytest.mark.parametrize("ignore_index, error, message", [
    (-100.0, TypeError, "ignore_index must be an int \\(default -100\\), got float -100.0"),
    (1.5, TypeError, "got float 1.5"),
    (True, TypeError, "got bool True"),
    (torch.tensor(-100), TypeError, "got Tensor"),
    (2**63, ValueError, "ignore_index = 9223372036854775808 is outside the range of torch.int64 labels"),
    (-2**70, ValueError, "is outside the range of torch.int64 labels"),
])
def test_ignore_index_must_be_an_int_the_labels_can_hold(ignore_index, error, message):
    """Before: a float gave the custom op's schema ('Expected a value of type 'int' for argument 'ignore_index'...
    Declaration: ceu::ce_forward(...)'), a bool or a 0-d tensor was taken silently, 2**63 an OverflowError."""
    with pytest.raises(error, match=message):
        call("ce", torch.randn(4, H), torch.randn(V, H), ignore_index=ignore_index)


@settings(max_examples=40, deadline=None)
@given(ignore_index=st.integers(-2**66, 2**66), int32=st.booleans())
def test_ignore_index_in_range_masks_exactly_its_labels(ignore_index, int32):
    """Any int the labels' dtype holds is accepted and ignores exactly the labels equal to it (a real class too, as in
    F.cross_entropy); any other int is refused, since it could never match (int32 labels and 2**40 ignored nothing)."""
    dtype = torch.int32 if int32 else torch.int64
    hidden, weight, _ = (t.double() if t is not None else None for t in (torch.randn(6, H), torch.randn(V, H), None))
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    info = torch.iinfo(dtype)
    if not info.min <= ignore_index <= info.max:
        with pytest.raises(ValueError, match=f"outside the range of {dtype} labels"):
            call("ce", hidden, weight, labels=labels.to(dtype), ignore_index=ignore_index)
        return
    if not 0 <= ignore_index < V:
        labels[[1, 4]] = ignore_index
    got = call("ce", hidden, weight, labels=labels.to(dtype), ignore_index=ignore_index, reduction="none")
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index,
                                                 reduction="none")
    assert_close("per-token loss", got, expected, torch.float64)


def double_backward(loss, impl, reduction, target):
    """First gradients with create_graph=True, then a backward through them: .backward() or autograd.grad."""
    hidden, weight, bias = (t.requires_grad_() for t in (torch.randn(4, H), torch.randn(V, H), torch.randn(V)))
    labels = torch.tensor([0, 3, -100, 7])
    if loss == "lmf":
        value = ceu.linear_lmf_loss(hidden, weight, bias, reduction=reduction, impl=impl)
    else:
        value = ceu.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, impl=impl)
    first = torch.autograd.grad(value.sum(), [hidden, weight, bias], create_graph=True)
    plain = torch.autograd.grad(call_again(loss, hidden, weight, bias, labels, reduction, impl).sum(),
                                [hidden, weight, bias])
    for got, expected in zip(first, plain):  # the wrapping changes no value
        assert torch.equal(got, expected)
    second = first[0].square().sum() + first[1].sum()
    if target == "backward":
        second.backward()
    else:
        torch.autograd.grad(second, [weight])


def call_again(loss, hidden, weight, bias, labels, reduction, impl):
    if loss == "lmf":
        return ceu.linear_lmf_loss(hidden, weight, bias, reduction=reduction, impl=impl)
    return ceu.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, impl=impl)


@pytest.mark.parametrize("target", ["backward", "grad"])
@pytest.mark.parametrize("loss, reduction", [("lmf", "mean"), ("lmf", "none"), ("ce", "none")])
def test_double_backward_raises_a_ceu_error(loss, reduction, target):
    """Before: 'Trying to backward through ceu.lmf_backward.default but no autograd formula was registered. Please
    use register_autograd to add one.' The first gradients with create_graph=True are the plain ones. (The
    cross-entropy's scalar reductions form their gradients in the forward and raise their own error, tested in
    test_cross_entropy.py.)"""
    name = "linear_lmf_loss" if loss == "lmf" else "linear_cross_entropy"
    with pytest.raises(RuntimeError, match=f"^ceu.{name} is not twice differentiable: its backward is a fused"):
        double_backward(loss, "torch", reduction, target)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("transform", ["grad", "grad wrt weight", "vmap", "jacrev"])
def test_torch_func_transforms_raise_a_ceu_error(loss, transform):
    """Before: 'In order to use an autograd.Function with functorch transforms ... it must override the
    setup_context staticmethod', or under vmap 'attempting to use a Tensor in some data-dependent control flow'."""
    hidden, weight = torch.randn(2, 4, H), torch.randn(V, H)
    labels = torch.zeros(2, 4, dtype=torch.long)
    if transform == "grad":
        run = lambda: torch.func.grad(lambda h: call(loss, h, weight))(hidden)  # noqa: E731
    elif transform == "grad wrt weight":
        run = lambda: torch.func.grad(lambda w: call(loss, hidden, w))(weight)  # noqa: E731
    elif transform == "vmap":
        run = lambda: torch.func.vmap(lambda h, y: call(loss, h, weight, labels=y))(hidden, labels)  # noqa: E731
    else:
        run = lambda: torch.func.jacrev(lambda h: call(loss, h, weight, reduction="none"))(hidden)  # noqa: E731
    with pytest.raises(RuntimeError, match="comes from a torch.func transform \\(grad, vmap, jacrev, ...\\), which "
                                           "the fused losses do not support"):
        run()


# --- Documented rules (README, Semantics): no token counted, fp16 logits past 65504 ------------------------------

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_no_token_counted_gives_zero_whatever_the_weight_holds(loss, reduction, where, value):
    """The README's rule: with every token masked (ignored) the loss is exactly 0 even for a non-finite weight or
    bias (an empty sum reads none of it; before, the README also promised a non-finite loss for any non-finite
    weight). The gradients stay connected."""
    hidden, weight, bias = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 3, H), (V, H), (V,)))
    (weight if where == "weight" else bias)[4] = value
    inputs = [t.requires_grad_() for t in (hidden, weight, bias)]
    if loss == "lmf":
        got = ceu.linear_lmf_loss(*inputs, mask=torch.zeros(2, 3, dtype=torch.bool), reduction=reduction,
                                  impl="torch")
    else:
        got = ceu.linear_cross_entropy(*inputs[:2], torch.full((2, 3), -100), inputs[2], reduction=reduction,
                                       impl="torch")
    assert torch.equal(got, torch.zeros_like(got))
    assert all(g.shape == t.shape for g, t in zip(torch.autograd.grad(got.sum(), inputs), inputs))


def overflowing_fp16_head():
    """fp16 inputs whose logits are about 78 000, past fp16's largest finite value (65504)."""
    generator = torch.Generator().manual_seed(0)
    hidden = (80 + torch.rand(5, 16, generator=generator)).half()
    weight = (60 + torch.rand(V, 16, generator=generator)).half()
    return hidden, weight, torch.arange(5)


def test_fp16_logits_past_65504_overflow_on_the_chunked_backend():
    """The README's rule for impl="torch": the GEMM's fp16 output is inf, so the LMF max and loss are inf and the
    cross-entropy NaN (inf - inf)."""
    hidden, weight, labels = overflowing_fp16_head()
    assert (hidden.double() @ weight.double().T).min() > 65504
    loss, stats = ceu.linear_lmf_loss(hidden, weight, impl="torch", reduction="none", return_stats=True)
    assert stats.max.isinf().all() and loss.isinf().all()
    assert ceu.linear_cross_entropy(hidden, weight, labels, impl="torch", reduction="none").isnan().all()


@needs_triton
def test_fp16_logits_past_65504_stay_finite_on_the_triton_backend():
    """The other half of the rule: Triton keeps fp32 accumulators, so the max, the mean and the cross-entropy are
    the float64 values (within fp32's tolerance, the precision they are computed in) and the LMF loss is finite."""
    hidden, weight, labels = overflowing_fp16_head()
    logits = hidden.double() @ weight.double().T
    loss, stats = ceu.linear_lmf_loss(hidden, weight, impl="triton", reduction="none", return_stats=True)
    assert_close("max", stats.max, logits.amax(-1), torch.float32)
    assert_close("mean", stats.mean, logits.mean(-1), torch.float32)  # the loss squares their small difference
    assert loss.isfinite().all()
    ce = ceu.linear_cross_entropy(hidden, weight, labels, impl="triton", reduction="none")
    assert_close("cross-entropy", ce, torch.nn.functional.cross_entropy(logits, labels, reduction="none"),
                 torch.float32)
