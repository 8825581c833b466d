"""Deprecated: the Triton backend is ``ceu_kernels.contract.load("triton")``, whose four functions are the launchers
themselves (:func:`ceu_kernels.lmf_forward.lmf_row_stats`, :func:`ceu_kernels.lmf_backward.lmf_gradients`,
:func:`ceu_kernels.ce_forward.ce_token_losses`, :func:`ceu_kernels.ce_backward.ce_gradients`), which take the
contract's arguments. This module only keeps the old import path working."""
import warnings

from .ce_backward import ce_gradients as ce_backward
from .ce_forward import ce_token_losses as ce_forward
from .lmf_backward import lmf_gradients as lmf_backward
from .lmf_forward import lmf_row_stats as lmf_forward

warnings.warn("ceu_kernels.triton_backend is deprecated: use ceu_kernels.contract.load('triton'), or the launchers "
              "in ceu_kernels.lmf_forward, lmf_backward, ce_forward and ce_backward", DeprecationWarning, stacklevel=2)

__all__ = ["lmf_forward", "lmf_backward", "ce_forward", "ce_backward"]
