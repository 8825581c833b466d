"""ceu.cross_entropy: the fused linear cross-entropy against F.cross_entropy on float64 logits, on every backend
available here; the Triton backend end to end on its kernel tests' ragged shape."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import ceu
from helpers import (AUTOCAST_DTYPES, DTYPES, HIDDEN, KERNEL_DEVICE, KERNEL_DTYPES, KERNEL_VARIANTS, N_TOKENS,
                     VOCAB_SIZE, assert_autocast_changes_nothing, assert_close, assert_no_worse_than_eager,
                     check_against_float64, check_against_reference, cuda_kernels, device_impls, grads, head,
                     head_inputs, labels_for, leaf, make_labels, skip_unsupported, small_gap_inputs, needs_triton,
                     under_autocast)

DEVICE_IMPLS = device_impls()
SHAPES = {"nice": ((64,), 32, 256, None), "ragged": ((3, 13), 40, 300, 290)}


def reference_outputs(hidden, weight, bias, labels, reduction, vocab_size, ignore_index=-100):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits[..., :vocab_size]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_grads_match_reference(device, impl, shape, with_bias, reduction, dtype):
    if reason := skip_unsupported(device, impl, dtype):
        pytest.skip(reason)
    lead_shape, hidden_size, vocab, vocab_size = SHAPES[shape]
    n_tokens = int(torch.tensor(lead_shape).prod())
    hidden, weight, bias = head_inputs(n_tokens, hidden_size, vocab, dtype, device, bias=with_bias,
                                       lead_shape=lead_shape)
    labels = make_labels(lead_shape, vocab_size or vocab, device)
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    loss = ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], reduction=reduction, impl=impl,
                                    vocab_size=vocab_size)
    generator = torch.Generator().manual_seed(3)
    upstream = (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(device)
    ours = grads(loss, inputs, upstream.to(loss.dtype))
    check_against_reference(loss, ours,
                            lambda h, w, b: reference_outputs(h, w, b, labels, reduction, vocab_size or vocab),
                            (hidden, weight, bias), upstream, dtype)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_gradcheck_float64(device, impl):
    hidden, weight, bias = head_inputs(7, 9, 13, torch.float64, device, bias=True)
    labels = make_labels((7,), 11, device)
    torch.autograd.gradcheck(
        lambda h, w, b: ceu.linear_cross_entropy(h, w, labels, b, impl=impl, chunk_size=3, vocab_size=11),
        (leaf(hidden), leaf(weight), leaf(bias)), fast_mode=impl != "torch")  # full Jacobians are slow in an interpreter


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_chunk_sizes_and_custom_ignore_index_agree(device, impl):
    hidden, weight, bias = head_inputs(29, 20, 90, torch.float64, device, bias=True)
    labels = make_labels((29,), 90, device, ignore_index=7)
    expected_loss = reference_outputs(hidden, weight, bias, labels, "sum", 90, ignore_index=7)
    for chunk_size in (1, 4, 29, 100, None):
        inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        loss = ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], ignore_index=7, reduction="sum",
                                        impl=impl, chunk_size=chunk_size)
        assert_close("loss", loss, expected_loss, torch.float64)
        assert torch.autograd.grad(loss, inputs[1])[0][7].abs().sum() > 0  # class 7 still gets its softmax share


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("wanted", list(itertools.product([False, True], repeat=3))[1:], ids=str)
def test_gradients_only_where_required(device, impl, wanted):
    hidden, weight, bias = head_inputs(10, 16, 40, torch.float64, device, bias=True)
    labels = make_labels((10,), 40, device)
    inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight, bias), wanted)]
    got = grads(ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], impl=impl), inputs,
                torch.ones((), dtype=torch.float64, device=device))
    reference_inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight, bias), wanted)]
    expected = grads(reference_outputs(*reference_inputs, labels, "mean", 40), reference_inputs,
                     torch.ones((), dtype=torch.float64, device=device))
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close("grad", g, e, torch.float64)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_with_connected_grads(device, impl, reduction):
    """F.cross_entropy returns NaN here for "mean"; ours returns 0 so a rank with no target still joins the step."""
    hidden, weight, bias = head_inputs(7, 16, 40, torch.float32, device, bias=True)
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    labels = torch.full((7,), -100, device=device)
    loss = ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], reduction=reduction, impl=impl)
    assert torch.all(loss == 0) and loss.requires_grad
    for grad in torch.autograd.grad(loss.sum(), inputs):
        assert torch.all(grad == 0)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_no_grad_and_inputs_not_modified(device, impl):
    hidden, weight, bias = head_inputs(12, 16, 40, torch.float32, device, bias=True)
    labels = make_labels((12,), 40, device)
    originals = [t.clone() for t in (hidden, weight, bias, labels)]
    with torch.no_grad():
        loss = ceu.linear_cross_entropy(leaf(hidden), leaf(weight), labels, leaf(bias), impl=impl)
    assert loss.grad_fn is None
    inputs = [leaf(hidden), leaf(weight), leaf(bias)]
    ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], impl=impl, reduction="sum").backward()
    for before, after in zip(originals, (*inputs, labels)):
        assert torch.equal(before, after.detach())


def test_int32_labels_and_module():
    hidden, weight, bias = head_inputs(9, 16, 40, torch.float32, bias=True)
    labels = make_labels((9,), 40, "cpu")
    module = ceu.LinearCrossEntropyLoss(reduction="sum", chunk_size=2)
    expected = ceu.linear_cross_entropy(hidden, weight, labels, bias, reduction="sum")
    assert_close("loss", module(hidden, weight, labels.int(), bias), expected, torch.float32)
    assert "reduction='sum'" in repr(module)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autocast_changes_nothing(device, impl, autocast_dtype, dtype):
    """The fused loss computes in its inputs' dtype under autocast, forward and backward, as the LMF loss does."""
    if reason := skip_unsupported(device, impl, dtype):
        pytest.skip(reason)
    tensors = small_gap_inputs(24, 32, 64, dtype, device)
    labels = make_labels((24,), 60, device)
    loss_fn = lambda h, w, b: ceu.linear_cross_entropy(h, w, labels, b, impl=impl, vocab_size=60)  # noqa: E731
    loss, _ = under_autocast(loss_fn, tensors, device, None)
    assert loss.dtype == torch.float32
    assert_autocast_changes_nothing(loss_fn, tensors, device, autocast_dtype)


# ---- the Triton backend end to end, on the ragged shape of its kernel tests ----------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_linear_cross_entropy_triton_matches_reference(dtype, reduction, variant):
    with_bias, _, lead_shape = KERNEL_VARIANTS[variant]
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

    check_against_float64(fused, reference, (hidden, weight, bias), dtype, reduction)


@needs_triton
def test_all_ignored_and_all_masked_batches_give_zero_with_zero_grads():
    hidden, weight, bias = head(torch.float32)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    labels = torch.full((N_TOKENS,), -100, device=KERNEL_DEVICE)
    mask = torch.zeros(N_TOKENS, dtype=torch.bool, device=KERNEL_DEVICE)
    ce = ceu.linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2], impl="triton", vocab_size=VOCAB_SIZE)
    lmf = ceu.linear_lmf_loss(*leaves, mask=mask, impl="triton", vocab_size=VOCAB_SIZE)
    total = ce + lmf
    total.backward()
    assert total.item() == 0.0
    assert all(t.grad is not None and not t.grad.any() for t in leaves)


# ---- the CUDA backend end to end (GPU) ----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(cuda_kernels() is None, reason="needs a CUDA device and the built extension ceu_kernels._C")
# End-to-end shapes: (lead shape, H, V, vocab_size), with chunk sizes that force several chunks and backward tiles.
E2E_SHAPES = {"ragged": ((3, 41), 72, 1000, 990), "wide": ((257,), 128, 5003, None)}



@needs_gpu
@pytest.mark.parametrize("shape", list(E2E_SHAPES))
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_end_to_end_matches_reference(shape, chunk_size, with_bias, dtype):
    lead_shape, hidden_size, vocab, vocab_size = E2E_SHAPES[shape]
    vocab_size = vocab_size or vocab
    hidden, weight, bias = head_inputs(int(torch.tensor(lead_shape).prod()), hidden_size, vocab, dtype, "cuda",
                                       bias=with_bias, lead_shape=lead_shape)
    generator = torch.Generator().manual_seed(6)
    labels = torch.randint(0, vocab_size, lead_shape, generator=generator)
    labels[torch.rand(lead_shape, generator=generator) < 0.3] = -100
    labels = labels.cuda()

    def run(tensors, impl=None):
        inputs = [leaf(t) for t in tensors]
        if impl is None:
            logits = (inputs[0] @ inputs[1].T + (0 if inputs[2] is None else inputs[2]))[..., :vocab_size]
            loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum")
        else:
            loss = ceu.linear_cross_entropy(*inputs[:2], labels, inputs[2], reduction="sum", impl=impl,
                                            chunk_size=chunk_size, vocab_size=vocab_size)
        return loss, grads(loss, inputs, torch.ones_like(loss))

    loss, ours = run((hidden, weight, bias), "cuda")
    reference, reference_grads = run([None if t is None else t.double() for t in (hidden, weight, bias)])
    eager, eager_grads = run((hidden, weight, bias))
    assert_no_worse_than_eager("loss", loss, eager, reference, dtype)
    for name, got, eager_grad, expected in zip(("hidden", "weight", "bias"), ours, eager_grads, reference_grads):
        if expected is not None:
            assert got.dtype == dtype
            assert_no_worse_than_eager(f"grad {name}", got, eager_grad, expected, dtype)


# ---- gradients formed in the forward (scalar reductions on the torch backend) -------------------------------------


def _recording_torch_backend(monkeypatch):
    """Records which of the torch backend's cross-entropy functions run, and with which ``needs_*``."""
    from ceu_kernels import chunked

    calls = []
    for name in ("ce_forward", "ce_backward", "ce_forward_backward"):
        real = getattr(chunked, name)

        def recording(*args, _name=name, _real=real):
            calls.append((_name, tuple(a for a in args[-3:] if isinstance(a, bool))))
            return _real(*args)
        monkeypatch.setattr(chunked, name, recording)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wanted", [(True, True, True), (False, True, False), (True, False, False)], ids=str)
def test_scalar_reductions_form_gradients_in_the_forward(monkeypatch, reduction, wanted):
    """"mean"/"sum" with a gradient needed: one backend call, in the forward, with the gradients asked for; the
    backward calls no backend. "none" keeps the forward + recompute pair. The gradients agree either way."""
    calls = _recording_torch_backend(monkeypatch)
    hidden, weight, bias = head_inputs(11, 16, 40, torch.float64, bias=True)
    labels = make_labels((11,), 40, "cpu")
    inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight, bias), wanted)]
    loss = ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], reduction=reduction, impl="torch",
                                    chunk_size=4)
    forward_calls = list(calls)
    got = grads(loss, inputs, torch.full(loss.shape, 1.5, dtype=torch.float64))
    if reduction == "none":
        assert forward_calls == [("ce_forward", ())] and calls[1:] == [("ce_backward", wanted)]
    else:
        assert forward_calls == [("ce_forward_backward", wanted)] and calls == forward_calls
    reference_inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight, bias), wanted)]
    expected_loss = reference_outputs(*reference_inputs, labels, reduction, 40)
    expected = grads(expected_loss, reference_inputs, torch.full(loss.shape, 1.5, dtype=torch.float64))
    assert_close("loss", loss, expected_loss, torch.float64)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close("grad", g, e, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_gradient_is_formed_when_none_is_needed(monkeypatch, reduction):
    """Under torch.no_grad, or with no input requiring grad, the scalar reductions run the forward only."""
    calls = _recording_torch_backend(monkeypatch)
    hidden, weight, bias = head_inputs(9, 16, 40, torch.float32, bias=True)
    labels = make_labels((9,), 40, "cpu")
    with torch.no_grad():
        quiet = ceu.linear_cross_entropy(leaf(hidden), leaf(weight), labels, leaf(bias), reduction=reduction)
    plain = ceu.linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction)
    assert calls == [("ce_forward", ())] * 2
    assert quiet.grad_fn is None and plain.grad_fn is None
    assert_close("loss", quiet, reference_outputs(hidden, weight, bias, labels, reduction, 40), torch.float32)
    assert torch.equal(quiet, plain)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_twice_and_what_is_held_between(reduction, dtype):
    """Between forward and backward the graph holds dh [N, H] in hidden's dtype and dW [V, H], db [V] in the
    accumulator dtype (float32 here) and a scalar (1 or 1/count), not the inputs; a backward with retain_graph scales a
    copy, so a second backward gives the same gradients, and accumulating into .grad twice doubles them."""
    hidden, weight, bias = head_inputs(10, 16, 40, dtype, bias=True)
    labels = make_labels((10,), 40, "cpu")
    inputs = [leaf(t) for t in (hidden, weight, bias)]
    held = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        loss = ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2], reduction=reduction)
    assert held == [((10, 16), dtype), ((40, 16), torch.float32), ((40,), torch.float32), ((), torch.float32)]
    first = torch.autograd.grad(2.5 * loss, inputs, retain_graph=True)
    second = torch.autograd.grad(2.5 * loss, inputs, retain_graph=True)
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(first, second))
    (3.0 * loss).backward(retain_graph=True)
    (3.0 * loss).backward()
    once = torch.autograd.grad(3.0 * ceu.linear_cross_entropy(inputs[0], inputs[1], labels, inputs[2],
                                                              reduction=reduction), inputs)
    for leaf_, grad in zip(inputs, once):
        assert_close("grad twice", leaf_.grad, 2 * grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_backward_that_frees_the_graph_hands_over_the_weight_gradient(dtype):
    """Without retain_graph the saved dW, scaled in place, becomes weight.grad itself (no head-sized copy) where the
    dtypes agree; with retain_graph, or a bfloat16 weight (dW is float32), .grad is a copy. The gradients are the
    same either way (the test keeps only the saved tensors' addresses: a reference would make autograd copy)."""
    hidden, weight, _ = head_inputs(12, 8, 30, dtype)
    labels = make_labels((12,), 30, "cpu")
    results = {}
    for retain in (True, False):
        inputs = [leaf(hidden), leaf(weight)]
        addresses = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: addresses.append(t.data_ptr()) or t, lambda t: t):
            loss = ceu.linear_cross_entropy(*inputs, labels)
        (0.5 * loss).backward(retain_graph=retain)
        handed_over = inputs[1].grad.data_ptr() == addresses[1]
        assert handed_over == (not retain and dtype == torch.float32)
        results[retain] = [t.grad for t in inputs]
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))


def test_every_ignored_label_gives_zero_connected_gradients_formed_in_the_forward(monkeypatch):
    """"mean" with every label ignored: loss 0 (not NaN), grads exactly zero but present, from the fused path; a
    per-token ignore_index other than -100 masks exactly its tokens."""
    calls = _recording_torch_backend(monkeypatch)
    hidden, weight, bias = head_inputs(8, 16, 40, torch.float32, bias=True)
    inputs = [leaf(t) for t in (hidden, weight, bias)]
    loss = ceu.linear_cross_entropy(inputs[0], inputs[1], torch.full((8,), 3), inputs[2], ignore_index=3)
    assert loss.item() == 0.0 and loss.requires_grad and calls == [("ce_forward_backward", (True, True, True))]
    assert all(g is not None and not g.any() for g in torch.autograd.grad(loss, inputs))
    labels = torch.tensor([3, 5, 3, 7, 0, 3, 39, 1])
    loss = ceu.linear_cross_entropy(*inputs[:2], labels, inputs[2], ignore_index=3)
    expected = reference_outputs(hidden, weight, bias, labels, "mean", 40, ignore_index=3)
    assert_close("loss", loss, expected, torch.float32)
    grad_hidden = torch.autograd.grad(loss, inputs[0])[0]
    assert not grad_hidden[labels == 3].any() and grad_hidden[labels != 3].abs().sum(1).min() > 0


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS)
def test_the_fused_op_is_a_well_formed_custom_op(device, impl):
    """The custom op ceu::ce_forward_backward on every backend: schema, fake (meta) kernel and real kernel agree,
    so torch.compile(fullgraph=True) traces it as one opaque node."""
    from ceu import ops

    hidden, weight, bias = head_inputs(6, 8, 20, torch.float32, device, bias=True)
    labels = make_labels((6,), 18, device)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(ops.ce_forward_backward,
                              (hidden, weight, bias, labels, 18, -100, impl, 4, *needs),
                              test_utils=("test_schema", "test_faketensor"))


def test_fuses_ce_gradients_names_the_backends_that_provide_it():
    """The one decision (contract.fuses_ce_gradients) matches what the backends provide, with the contract's
    arguments; the others fall back to forward + recompute."""
    import importlib.util
    import inspect

    from ceu_kernels import contract

    expected = list(inspect.signature(contract.Backend.ce_forward_backward).parameters)[1:]
    for name in contract.NAMES:
        if name == "triton" and importlib.util.find_spec("triton") is None:
            continue
        function = getattr(contract.load(name), "ce_forward_backward", None)
        assert contract.fuses_ce_gradients(name) == (function is not None), name
        if function is not None:
            assert list(inspect.signature(function).parameters) == expected, name


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fullgraph_compile_of_some_gradients(reduction):
    """torch.compile(fullgraph=True) traces both paths with only the weight requiring grad, matching eager."""
    hidden, weight, bias = head_inputs(12, 16, 40, torch.float32, bias=True)
    labels = make_labels((12,), 40, "cpu")

    def loss_fn(h, w, b):
        return ceu.linear_cross_entropy(torch.tanh(h), w, labels, b, reduction=reduction, impl="torch").sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for function in (loss_fn, compiled):
        inputs = [leaf(hidden, requires_grad=False), leaf(weight), leaf(bias, requires_grad=False)]
        loss = function(*inputs)
        results.append((loss, torch.autograd.grad(loss, inputs[1])[0]))
    for expected, got in zip(*results):
        assert_close("compiled", got, expected, torch.float32)


@pytest.mark.parametrize("wanted", [(True, False), (True, True)], ids=str)
def test_differentiating_the_gradients_again_raises(wanted):
    """create_graph=True gives the same first gradients, but a backward through them raises instead of treating the
    gradients formed in the forward as constants (a silent zero second derivative). autograd.grad of them with
    allow_unused=True gives None, as for any gradient that does not depend on the inputs."""
    hidden, weight, _ = head_inputs(6, 8, 20, torch.float64)
    labels = make_labels((6,), 20, "cpu")
    inputs = [leaf(t, requires_grad=r) for t, r in zip((hidden, weight), wanted)]
    wanting = [t for t in inputs if t.requires_grad]
    first = torch.autograd.grad(ceu.linear_cross_entropy(*inputs, labels), wanting, create_graph=True)
    plain = torch.autograd.grad(ceu.linear_cross_entropy(*inputs, labels), wanting)
    assert all(torch.equal(a.detach(), b) for a, b in zip(first, plain))
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        sum(g.square().sum() for g in first).backward()
    with pytest.raises(RuntimeError, match="not have been used"):  # autograd.grad: no path from the inputs
        torch.autograd.grad(sum(g.square().sum() for g in first), wanting)
