"""Shared test utilities: backends to test, inputs with a clear winning logit or planted exact ties, labels, the
error-vs-eager comparison and the autocast comparison."""
import torch
from torch.utils._pytree import tree_leaves

from ceu import backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative slack added to "no worse than eager in the same dtype", scaled by the reference's magnitude.
SLACK = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def device_impls() -> list[tuple[str, str]]:
    """Every (device, impl) pair that can run here: the Triton interpreter counts as available on CPU."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for device in devices:
        for impl in ("torch", "triton", "cuda"):
            try:
                backends.choose(impl, torch.device(device))
            except RuntimeError:
                continue
            pairs.append((device, impl))
    return pairs


def skip_unsupported(device: str, impl: str, dtype: torch.dtype) -> str | None:
    """The reason a combination cannot be checked here, or None."""
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        return "bf16 arithmetic is wrong in the Triton interpreter; tested on a GPU"
    return None


def head_inputs(n_tokens, hidden_size, vocab, dtype, device="cpu", bias=False, seed=0, lead_shape=None):
    """Hidden states built from a chosen weight row plus noise, so every token has a clear winning logit."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64)
    winners = torch.randint(0, vocab, (n_tokens,), generator=generator)
    hidden = weight[winners] + 0.3 * torch.randn(n_tokens, hidden_size, generator=generator, dtype=torch.float64)
    hidden, weight = hidden / hidden_size**0.25, weight / hidden_size**0.25
    if lead_shape is not None:
        hidden = hidden.reshape(*lead_shape, hidden_size)
    bias_t = 0.1 * torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias_t)


def random_mask(shape, device="cpu", seed=1, keep=0.6):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < keep).to(device)


def grads(output, inputs, upstream):
    """Gradients of ``output`` w.r.t. the inputs that require them (None elsewhere), under ``upstream``."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(output, wanted, upstream))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


def leaf(tensor, dtype=None, requires_grad=True):
    if tensor is None:
        return None
    return tensor.detach().to(dtype or tensor.dtype).requires_grad_(requires_grad)


def assert_no_worse_than_eager(name, ours, eager, reference, dtype):
    """ours must be as close to the float64 reference as eager PyTorch in the same dtype, plus a small slack."""
    reference = reference.double()
    err_ours = (ours.double() - reference).abs()
    err_eager = (eager.double() - reference).abs().max().item()
    bound = 2 * err_eager + SLACK[dtype] * max(reference.abs().max().item(), 1.0)
    worst = err_ours.max().item() if err_ours.numel() else 0.0
    if not worst <= bound:
        where = tuple(int(i) for i in torch.unravel_index(err_ours.argmax(), err_ours.shape))
        raise AssertionError(
            f"{name}: max error {worst:.3e} at {where} exceeds bound {bound:.3e} (eager {dtype} error {err_eager:.3e});"
            f" ours={ours.reshape(-1)[err_ours.argmax()].item():.6g} reference={reference.reshape(-1)[err_ours.argmax()].item():.6g}")


def check_against_reference(loss, our_grads, reference_fn, tensors, upstream, dtype):
    """Loss and grads of a fused call against ``reference_fn(hidden, weight, bias)`` evaluated in float64 (the
    reference) and in the inputs' dtype (eager PyTorch's own error, which bounds ours)."""
    reference_inputs = [leaf(t, torch.float64) for t in tensors]
    reference = reference_fn(*reference_inputs)
    reference_grads = grads(reference, reference_inputs, upstream)
    eager_inputs = [leaf(t) for t in tensors]
    eager = reference_fn(*eager_inputs)
    eager_grads = grads(eager, eager_inputs, upstream.to(eager.dtype))
    assert loss.dtype == torch.float32 and loss.shape == reference.shape
    assert_no_worse_than_eager("loss", loss, eager, reference, dtype)
    for name, got, eager_grad, expected in zip(("hidden", "weight", "bias"), our_grads, eager_grads, reference_grads):
        if expected is None:
            continue
        assert got.dtype == dtype and got.shape == expected.shape
        assert_no_worse_than_eager(f"grad {name}", got, eager_grad, expected, dtype)


def make_labels(lead_shape, vocab_size, device, ignore_fraction=0.3, seed=5, ignore_index=-100):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab_size, lead_shape, generator=generator)
    labels[torch.rand(lead_shape, generator=generator) < ignore_fraction] = ignore_index
    return labels.to(device)


TIE_PAIRS = [(3, 150), (0, 199), (64, 65), (17, 18), (100, 131), (31, 32)]  # across and within vocab tiles


def planted_integer_ties(vocab=200, hidden_size=32, seed=0, tie_pairs=TIE_PAIRS):
    """Token ``t`` has an exact tie in its max between the twin rows ``tie_pairs[t]`` and no other row reaches it.

    Hidden, weight and bias are small integers, so every partial sum of every logit is an integer below 2**8, exact
    in float16, bfloat16 and float32: the twins tie in any summation order, on any BLAS and any tiling.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-1, 2, (vocab, hidden_size), generator=generator).double()
    bias = torch.randint(-2, 3, (vocab,), generator=generator).double()
    hidden = torch.empty(len(tie_pairs), hidden_size, dtype=torch.float64)
    for token, (first, second) in enumerate(tie_pairs):
        weight[second], bias[first], bias[second] = weight[first], 3.0, 3.0
        hidden[token] = weight[first]
    assert (hidden.abs() @ weight.abs().T + bias.abs()).max() <= 2**8  # bounds every partial sum, in any order
    logits = hidden @ weight.T + bias
    for token, pair in enumerate(tie_pairs):
        assert (logits[token] == logits[token].max()).nonzero().flatten().tolist() == list(pair)
    return hidden, weight, bias


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def small_gap_inputs(n_tokens, hidden_size, vocab, dtype, device, seed=0):
    """Logits near 30 within about 0.1 of each other: a mean rounded to bfloat16 (spacing 0.25 there) is off by
    about the whole gap max - mean, while the max comes from the float32 GEMM."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(hidden_size, generator=generator, dtype=torch.float64)
    weight = common + 0.005 * torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64)
    hidden = common + 0.1 * torch.randn(n_tokens, hidden_size, generator=generator, dtype=torch.float64)
    bias = 0.01 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (hidden, weight, bias))


def under_autocast(loss_fn, tensors, device, autocast_dtype, backward_inside=True):
    """``loss_fn(*inputs)`` (a loss, or a (loss, stats) pair) and its gradients, the call run under
    ``torch.autocast(device, autocast_dtype)`` (None: no autocast) and the backward inside or outside that block."""
    inputs = [leaf(t) for t in tensors]
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = loss_fn(*inputs)
        loss = out[0] if isinstance(out, tuple) else out
        if backward_inside:
            return out, torch.autograd.grad(loss, inputs)
    return out, torch.autograd.grad(loss, inputs)


def assert_autocast_changes_nothing(loss_fn, tensors, device, autocast_dtype):
    """Value, stats (and their dtypes) and every gradient bitwise as without autocast, whether the backward runs
    inside the autocast block or after it."""
    expected, expected_grads = under_autocast(loss_fn, tensors, device, None)
    for backward_inside in (True, False):
        got, got_grads = under_autocast(loss_fn, tensors, device, autocast_dtype, backward_inside)
        for name, a, b in zip(("loss", "max", "mean", "argmax"), tree_leaves(got), tree_leaves(expected)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {a} != {b} under autocast {autocast_dtype}"
        for name, a, b in zip(("hidden", "weight", "bias"), got_grads, expected_grads):
            assert a.dtype == b.dtype and torch.equal(a, b), f"grad {name} differs (backward inside: {backward_inside})"
