"""Shared test utilities: backends to test, inputs with a clear winning logit or planted exact ties, labels, the
comparisons with a reference (below), the autocast comparison, and tiny Hugging Face models with question-answer
samples for the training tests.

Tolerance policy: one of three comparisons, wherever a kernel's (or a backend's, or a fused loss's) result is checked
against a reference.

- **No worse than eager, plus slack** (:func:`assert_no_worse_than_eager`, :func:`check_against_reference`): when the
  test can also run the eager PyTorch computation in the *same* low dtype. The error of ours against the float64
  reference must be at most twice eager's own error plus ``SLACK[dtype]`` times the reference's largest magnitude.
  This is the bar for whole-API values and gradients in float16/bfloat16, whose rounding error depends on the shape
  and the data more than any fixed tolerance can say.
- **Fixed per-dtype tolerance** (:func:`assert_close`): everywhere else, i.e. a kernel launcher, a backend or a
  sharded/compiled path against a float64 (or higher-precision) reference, or two runs of the same computation that
  may sum in a different order. The largest error must be at most ``TOLERANCE[dtype]`` times the reference's largest
  magnitude (at least 1), where ``dtype`` is the precision the result was computed in (the statistics' dtype for
  per-token values of half-precision inputs). ``equal_nan=True`` asks non-finite reference entries to be matched
  exactly.
- **Exact** (``torch.equal``): where bitwise equality is the claim: argmax indices, planted ties, determinism and
  resumed runs, autocast changing nothing, every rank holding the same values.

Last, launching two processes on this machine (torchrun, ``accelerate launch`` with or without a config file) for the
tests of the launched runs.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

from ceu import backends
from ceu.data import IGNORE_INDEX

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative slack added to "no worse than eager in the same dtype", scaled by the reference's magnitude.
SLACK = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
"""Allowed error relative to the largest magnitude of the reference (at least 1), by the dtype computed in."""


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


def cuda_kernels():
    """The compiled CUDA kernels (``ceu_kernels._C``) where a CUDA device is present and the extension loads, else
    None."""
    if not torch.cuda.is_available():
        return None
    from ceu_kernels import cuda

    try:
        return cuda.kernels()
    except RuntimeError:
        return None


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


def assert_close(name, got, expected, dtype, equal_nan=False):
    """``got`` within ``TOLERANCE[dtype]`` of the reference ``expected``, scaled by the reference's largest magnitude
    (at least 1); reports where. With ``equal_nan``, non-finite reference entries must be matched exactly (NaN by NaN,
    inf by the same inf) and the bound covers the finite ones."""
    got, expected = torch.as_tensor(got).double(), torch.as_tensor(expected).double()
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if equal_nan:
        special = ~expected.isfinite()
        same = (got[special] == expected[special]) | (got[special].isnan() & expected[special].isnan())
        assert same.all(), f"{name}: non-finite entries differ: got {got[special]}, expected {expected[special]}"
        got, expected = got[~special], expected[~special]
    error = (got - expected).abs()
    bound = TOLERANCE[dtype] * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    if error.numel() and not error.max().item() <= bound:
        where = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        raise AssertionError(f"{name}: error {error.max().item():.3e} at {where} > {bound:.3e}: "
                             f"got {got[where].item():.6g}, expected {expected[where].item():.6g}")


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


# ---- NaN / inf: max and argmax follow torch.max(dim) on the float64 logits ----------------------------------------

NAN, INF = float("nan"), float("inf")


def torch_max_on_float64(hidden, weight, bias, vocab_size):
    """``torch.max(dim)`` of the float64 logits on the CPU, where the rule was read off: (values, indices) on the
    inputs' device."""
    logits = hidden.cpu().double() @ weight[:vocab_size].cpu().double().T
    if bias is not None:
        logits = logits + bias[:vocab_size].cpu().double()
    values, indices = torch.max(logits, dim=-1)
    return values.to(hidden.device), indices.to(hidden.device)


NON_FINITE_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
"""The Triton interpreter's numpy warns on ``0 * inf`` and ``inf - inf``: those are the inputs under test."""


# ---- Triton kernel tests: one ragged head shape, minimal tiles, on the GPU or through the interpreter ---------------

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter gets bf16 arithmetic wrong; bf16 is checked where a GPU runs the kernels.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])
SMALL_BLOCKS = (16, 16, 16)
"""Minimal ``tl.dot`` tiles: many tile boundaries on the ragged shape."""
N_TOKENS, HIDDEN, VOCAB, VOCAB_SIZE = 37, 40, 300, 290


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run on ``KERNEL_DEVICE`` here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    try:
        backends.choose("triton", torch.device(KERNEL_DEVICE))
    except RuntimeError as error:
        return str(error)
    return None


needs_triton = pytest.mark.skipif(triton_unavailable() is not None, reason=str(triton_unavailable()))
"""Marks a test of the Triton kernels through the public losses: skipped with the reason where they cannot run."""


def triton_device() -> str:
    """``KERNEL_DEVICE``; called at the top of a kernel test module, before it imports ``triton``, it skips the
    module where the Triton kernels cannot run."""
    pytest.importorskip("triton")
    if reason := triton_unavailable():
        pytest.skip(reason, allow_module_level=True)
    return KERNEL_DEVICE


def head(dtype, n_tokens=N_TOKENS, bias=True, seed=0):
    """Hidden states near chosen weight rows (a clear winning logit per token), a weight and a bias, in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64) / HIDDEN**0.5
    winners = torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=generator)
    hidden = 2 * weight[winners] * HIDDEN**0.5 + 0.3 * torch.randn(n_tokens, HIDDEN, generator=generator,
                                                                    dtype=torch.float64)
    bias_t = 0.1 * torch.randn(VOCAB, generator=generator, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(KERNEL_DEVICE, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias_t)


def logits64(hidden, weight, bias, vocab_size=VOCAB_SIZE):
    logits = hidden.double() @ weight[:vocab_size].double().T
    return logits if bias is None else logits + bias[:vocab_size].double()


def labels_for(n_tokens, ignore_index=-100, seed=4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=generator)
    labels[::4] = ignore_index
    labels[1] = VOCAB_SIZE - 1
    return labels.to(KERNEL_DEVICE)


def upstream_like(loss, reduction):
    if reduction != "none":
        return torch.tensor(0.75, dtype=loss.dtype, device=KERNEL_DEVICE)
    generator = torch.Generator().manual_seed(3)
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(KERNEL_DEVICE, loss.dtype)


def check_against_float64(loss_fn, reference_fn, inputs, dtype, reduction):
    """Values and every gradient of ``loss_fn(*inputs)`` against ``reference_fn`` on float64 copies, within the fixed
    per-dtype tolerance."""
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


KERNEL_VARIANTS = {"plain": (False, False, None), "bias+mask": (True, True, None), "2-d tokens": (True, True, (3, 13))}


# ---- tiny Hugging Face models and samples for the training tests (transformers is imported only when used) ----------

TINY_VOCAB = 48
TINY = dict(vocab_size=TINY_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32)


def tiny_model(kind="llama", **overrides):
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **overrides))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **overrides))
    if kind == "gemma":
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(**TINY, head_dim=8, **overrides))
    if kind == "phi":  # an LM head with a bias
        return transformers.PhiForCausalLM(transformers.PhiConfig(**TINY, **overrides))
    if kind == "gpt2":  # a head tied to the input embeddings
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=TINY_VOCAB, n_embd=16, n_layer=2,
                                                                    n_head=2, n_positions=32, bos_token_id=1,
                                                                    eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                    attn_pdrop=0.0))
    raise ValueError(kind)


def qa_samples(count, seed=0, prompt=4, answer=3):
    """Random token sequences whose first ``prompt`` tokens are the (masked) prompt; lengths vary by one."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        ids = torch.randint(3, TINY_VOCAB, (prompt + answer + index % 2,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def forbid_head_calls(model):
    from ceu.heads import lm_head

    def fail(*_):
        raise AssertionError("the training step called the LM head module")

    return lm_head(model).register_forward_pre_hook(fail)


# ---- two launched processes on this machine (CPU, gloo) --------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun() -> list[str]:
    """``torchrun`` on two processes, the arguments after ``python``."""
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port())]


def accelerate_launch(config: Path | None = None) -> list[str]:
    """``accelerate launch`` on two processes, the arguments after ``python``: with ``config`` (from
    :func:`accelerate_config`), or else ``--multi_gpu``, which runs torchrun (``--cpu`` starts one process only;
    ``use_cpu=True`` in the training arguments then sets up MULTI_CPU with gloo)."""
    how = ["--config_file", str(config)] if config is not None else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
        "no"]
    return ["-m", "accelerate.commands.launch", *how, "--main_process_port", str(free_port())]


def accelerate_config(folder: Path, distributed_type: str, **settings) -> Path:
    """``folder``/accelerate.yaml, an accelerate launch config for two CPU processes on this machine:
    ``distributed_type`` and its ``settings`` (e.g. ``fsdp_config={...}``)."""
    import yaml

    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": distributed_type, **settings,
              "num_machines": 1, "num_processes": 2, "use_cpu": True, "machine_rank": 0, "rdzv_backend": "static",
              "same_network": True}
    path = folder / "accelerate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(arguments: list[str], folder: Path, timeout: float = 300) -> str:
    """Runs ``python *arguments`` from the repository root with one thread per process and ``HF_HOME`` in ``folder``
    (no accelerate config of the machine's user can change the launch); asserts that it succeeded and returns its
    standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(folder / "hf"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


class FakeTokenizer:
    """What the evaluation cache's key reads of a tokenizer, without loading one."""
    backend_tokenizer = None
    special_tokens_map = {"eos_token": "</s>"}
    bos_token_id = eos_token_id = pad_token_id = 0
    chat_template = None

    def get_vocab(self):
        return {"a": 0, "b": 1}
