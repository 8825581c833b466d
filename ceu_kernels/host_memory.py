"""Head-sized CPU tensors on transparent huge pages.

PyTorch's CPU allocator gets each large tensor from the kernel as fresh 4 KiB pages, and the first write to every page
faults: about 50 ms per 128 MiB on the 2-core benchmark machine, where a logits chunk's GEMM takes ~130 ms. The
chunked backend allocates a few head-sized tensors per call (the logits chunk, dW, the scaled dW the cross-entropy
backward returns), so it asks for them here: on Linux with transparent huge pages in ``madvise`` or ``always`` mode
they are mapped on 2 MiB pages (about a fifth of the faulting time; PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` does
the same for every tensor of a process). Elsewhere, and for small or non-CPU tensors, it is ``torch.empty``.

The tensor owns its mapping (freed with the last tensor or view of it, like any other); its storage cannot be
resized, which no gradient or buffer here needs.
"""
import ctypes
import math
import mmap
import sys
from pathlib import Path

import torch

HUGE_PAGE_BYTES = 2 << 20
MIN_BYTES = 16 << 20
"""Smaller tensors come from ``torch.empty``: their faulting time is small, and a mapping per tensor is not free."""


def _huge_pages_available() -> bool:
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


HUGE_PAGES = _huge_pages_available()


def empty(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=like.device)``, on huge pages where that saves time (see the module).
    Only for a plain tensor or parameter ``like`` outside ``torch.compile`` (whose tracers get ``like.new_empty``)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    plain = type(like) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()
    if not (HUGE_PAGES and plain and like.device.type == "cpu" and nbytes >= MIN_BYTES):
        return like.new_empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE_BYTES  # a huge page's boundary
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset).view(shape)
