"""Kept import path: the token-chunked PyTorch backend now lives in :mod:`ceu_kernels.chunked`, beside the other
backends, and its shared helpers in :mod:`ceu_kernels.contract`."""
from ceu_kernels.chunked import ce_backward, ce_forward, lmf_backward, lmf_forward, rank_one_plus_scatter
from ceu_kernels.contract import CHUNK_BUDGET_BYTES, chunk_rows, stat_dtype

__all__ = ["lmf_forward", "lmf_backward", "ce_forward", "ce_backward", "rank_one_plus_scatter", "CHUNK_BUDGET_BYTES",
           "chunk_rows", "stat_dtype"]
