"""ceu: Constrained Entropic Unlearning with fused LM-head losses."""
from .cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .lmf import LinearLMFLoss, LMFStats, linear_lmf_loss
from .membership import mia_auc
from .methods import linear_kl_divergence
from .objective import PDUObjective, pdu_objective
from .parallel import vocab_parallel_lmf_loss
from .patch import FusedLossPatch, patch_causal_lm, unpatch_causal_lm
from .primal_dual import PrimalDual, relative_epsilon
from .reference import lmf_loss
from .train import UnlearnConfig, UnlearnResult, unlearn

__version__ = "0.1.0"
__all__ = ["lmf_loss", "linear_lmf_loss", "LinearLMFLoss", "LMFStats", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "vocab_parallel_lmf_loss",
           "PrimalDual", "relative_epsilon", "unlearn", "UnlearnConfig", "UnlearnResult",
           "patch_causal_lm", "unpatch_causal_lm", "FusedLossPatch", "pdu_objective", "PDUObjective",
           "linear_kl_divergence", "mia_auc"]
