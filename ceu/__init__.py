"""ceu: Constrained Entropic Unlearning with fused LM-head losses."""
from .cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .lmf import LinearLMFLoss, LMFStats, linear_lmf_loss
from .parallel import vocab_parallel_lmf_loss
from .primal_dual import PrimalDual, relative_epsilon
from .reference import lmf_loss
from .train import UnlearnConfig, UnlearnResult, unlearn

__version__ = "0.1.0"
__all__ = ["lmf_loss", "linear_lmf_loss", "LinearLMFLoss", "LMFStats", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "vocab_parallel_lmf_loss",
           "PrimalDual", "relative_epsilon", "unlearn", "UnlearnConfig", "UnlearnResult"]
