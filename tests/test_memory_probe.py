"""The benchmarks' CPU memory probe counts ceu's kept chunk buffer, as a first call would, even after a warm-up."""
import pytest
import torch

from benchmarks.memory import MIB, MemoryProbe
from ceu import linear_cross_entropy


def test_cpu_probe_counts_the_kept_chunk_buffer_after_a_warm_up():
    tokens, hidden_size, vocab = 512, 64, 32768
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def call():
        linear_cross_entropy(hidden, weight, labels, impl="torch", chunk_size=tokens).backward()
        hidden.grad = weight.grad = None

    call()  # the warm-up keeps the buffer
    with MemoryProbe(torch.device("cpu")) as probe:
        call()
    if probe.peak_mb is None:
        pytest.skip("this kernel cannot reset the peak resident set (/proc/self/clear_refs)")
    buffer_mb = tokens * vocab * 4 / MIB
    assert probe.peak_mb >= 0.9 * buffer_mb
