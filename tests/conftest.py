"""Shared test setup. Triton kernels run on the CPU through the interpreter when no GPU is present; the variable must
be set before any kernel is defined, hence here. The ``own_cache`` fixture keeps a test's ceu cache to itself."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """The test's evaluation cache (and stage-one cache) in its own folder, for it and the processes it launches: none
    leaks into ~/.cache or another test."""
    monkeypatch.setenv("CEU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
