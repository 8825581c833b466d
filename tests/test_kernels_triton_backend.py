"""ceu_kernels.triton_backend: the deprecated module still imports, warns, and hands out the launchers."""
import pytest


def test_deprecated_triton_backend_module_still_works():
    import importlib
    import sys

    pytest.importorskip("triton")
    from ceu_kernels import contract

    sys.modules.pop("ceu_kernels.triton_backend", None)
    with pytest.warns(DeprecationWarning, match="contract.load"):
        triton_backend = importlib.import_module("ceu_kernels.triton_backend")
    assert triton_backend.lmf_forward is contract.load("triton").lmf_forward
