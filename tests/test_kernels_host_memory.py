"""ceu_kernels.host_memory: head-sized CPU buffers on transparent huge pages behave as ``torch.empty``'s."""
import os

import pytest
import torch

from ceu_kernels import host_memory

LARGE = (host_memory.MIN_BYTES // 4 // 1000 + 1, 1000)  # float32 rows just over the threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_a_large_buffer_is_an_ordinary_writable_tensor(dtype):
    like = torch.zeros(1)
    buffer = host_memory.empty(LARGE, dtype, like)
    assert buffer.shape == LARGE and buffer.dtype == dtype and buffer.device == like.device
    assert buffer.is_contiguous()
    torch.mm(torch.ones(LARGE[0], 2, dtype=dtype), torch.ones(2, LARGE[1], dtype=dtype), out=buffer)
    assert torch.equal(buffer, torch.full(LARGE, 2, dtype=dtype))


def test_large_cpu_buffers_are_huge_page_mappings_where_the_kernel_offers_them():
    """A mapping of its own, aligned to a huge page, for a large CPU buffer (a parameter's too) where huge pages are
    available; PyTorch's allocation otherwise, and always for a small one."""
    large = host_memory.empty(LARGE, torch.float32, torch.nn.Parameter(torch.zeros(1)))
    assert host_memory.empty((1000,), torch.float32, torch.zeros(1)).untyped_storage().resizable()
    if host_memory.HUGE_PAGES:
        assert not large.untyped_storage().resizable()  # torch.frombuffer's storage: the mapping
        assert large.data_ptr() % host_memory.HUGE_PAGE_BYTES == 0
    else:
        assert large.untyped_storage().resizable()


def test_torch_compile_traces_through_it():
    """Under torch.compile the tracer's tensors get ``new_empty``: no graph break on the mapping."""
    compiled = torch.compile(lambda like: host_memory.empty(LARGE, torch.float32, like).fill_(1).sum(),
                             backend="eager", fullgraph=True)
    assert compiled(torch.zeros(1)).item() == LARGE[0] * LARGE[1]


def _resident_bytes():
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident set")
def test_a_freed_buffer_returns_its_memory():
    """Twenty buffers written and dropped one after another leave the resident set where one buffer would."""
    host_memory.empty(LARGE, torch.float32, torch.zeros(1)).fill_(1)
    before = _resident_bytes()
    for _ in range(20):
        host_memory.empty(LARGE, torch.float32, torch.zeros(1)).fill_(1)
    assert _resident_bytes() - before < 3 * host_memory.MIN_BYTES
