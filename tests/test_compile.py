"""torch.compile(fullgraph=True) traces a training step that calls both fused losses, with no graph break, and
autocast around the compiled step changes nothing (the fused losses disable it inside)."""
import pytest
import torch

import ceu
from helpers import assert_close, leaf, make_labels, random_mask, small_gap_inputs


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=str)
def test_fullgraph_compile_matches_eager(device, autocast_dtype):
    hidden, weight, bias = small_gap_inputs(12, 16, 48, torch.float32, device)
    hidden = hidden.reshape(2, 6, 16)
    mask = random_mask((2, 6), device)
    labels = make_labels((2, 6), 45, device)

    def lagrangian(hidden, weight, bias):
        forget, stats = ceu.linear_lmf_loss(hidden, weight, bias, mask=mask, vocab_size=45, impl="torch",
                                            return_stats=True)
        retain = ceu.linear_cross_entropy(torch.tanh(hidden), weight, labels, bias, vocab_size=45, impl="torch")
        return forget + 3.0 * retain, stats.mean

    torch._dynamo.reset()  # a fresh trace under this test's autocast state
    compiled = torch.compile(lagrangian, fullgraph=True)
    results = []
    for function, autocast in ((lagrangian, None), (compiled, autocast_dtype)):  # eager without autocast: expected
        inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss, mean = function(*inputs)
            results.append([loss, mean, *torch.autograd.grad(loss, inputs)])
    for expected, got in zip(*results):
        assert got.dtype == expected.dtype
        assert_close("compiled", got, expected, torch.float32)
