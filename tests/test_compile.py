"""torch.compile(fullgraph=True) traces a training step that calls both fused losses, with no graph break."""
import pytest
import torch

import ceu
from helpers import head_inputs, leaf, random_mask

from test_cross_entropy import make_labels


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fullgraph_compile_matches_eager(device):
    hidden, weight, bias = head_inputs(12, 16, 48, torch.float32, device, bias=True, lead_shape=(2, 6))
    mask = random_mask((2, 6), device)
    labels = make_labels((2, 6), 45, device)

    def lagrangian(hidden, weight, bias):
        forget = ceu.linear_lmf_loss(hidden, weight, bias, mask=mask, vocab_size=45, impl="torch")
        retain = ceu.linear_cross_entropy(torch.tanh(hidden), weight, labels, bias, vocab_size=45, impl="torch")
        return forget + 3.0 * retain

    compiled = torch.compile(lagrangian, fullgraph=True)
    results = []
    for function in (lagrangian, compiled):
        inputs = [leaf(hidden), leaf(weight), leaf(bias)]
        loss = function(*inputs)
        results.append([loss, *torch.autograd.grad(loss, inputs)])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected)
