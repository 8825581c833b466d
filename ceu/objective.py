"""The PDU objective of one forget batch and one retain batch, for trainers that own their loop (a plain PyTorch
loop, a ``transformers.Trainer`` subclass's ``compute_loss``, Lightning's ``training_step``): the fused losses of
:func:`ceu.heads.pdu_losses` and the Lagrangian, in one call."""
from typing import NamedTuple

import torch

from ceu.config import UnlearnConfig
from ceu.heads import pdu_losses
from ceu.primal_dual import PrimalDual
from ceu.zero3 import gathered_lm_head


class PDUObjective(NamedTuple):
    """``loss``: the Lagrangian ``γ·L_fgt + λ·(L_rtn − ε)`` to minimise; the two losses it is made of."""
    loss: torch.Tensor
    forget_loss: torch.Tensor
    retain_loss: torch.Tensor


def pdu_objective(model, forget: dict, retain: dict, primal_dual: PrimalDual | None = None, *,
                  lam: float | None = None, epsilon: float | None = None, forget_weight: float = 1.0,
                  config: UnlearnConfig | None = None, token_scales=None) -> PDUObjective:
    """The PDU losses of a forget and a retain batch of any Hugging Face causal LM (inside DDP, PEFT,
    ``torch.compile`` or DeepSpeed wrappers), fused on the LM head (no ``[tokens, V]`` logits), and the Lagrangian.

    Batches are dicts of ``[B, T]`` ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` off the answer, not
    shifted: :func:`ceu.data.pad_batch` makes them). ``L_fgt`` is the LMF loss over the forget answer tokens,
    ``L_rtn`` the token-mean cross-entropy over the retain answer tokens.

    Give either ``primal_dual`` (its λ, ε and γ; while the model is training, the retain loss is also recorded for
    its dual step, so call ``primal_dual.step()`` after each optimizer step) or ``lam`` and ``epsilon`` (with
    ``forget_weight`` γ). ``config`` supplies ``impl`` and the reference-quirk options (default ``UnlearnConfig()``);
    ``token_scales`` is :func:`ceu.heads.pdu_losses`'s, for global token means across data-parallel ranks
    (:func:`ceu.heads.global_token_scales`). Under ZeRO-3 the head is gathered for the call
    (:func:`ceu.zero3.gathered_lm_head`).
    """
    if (primal_dual is None) == (lam is None or epsilon is None):
        raise ValueError("pass either primal_dual or both lam and epsilon (not both, not neither), got "
                         f"primal_dual={primal_dual!r}, lam={lam!r}, epsilon={epsilon!r}")
    if primal_dual is None and lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    config = config if config is not None else UnlearnConfig()
    with gathered_lm_head(model):
        forget_loss, retain_loss = pdu_losses(model, forget, retain, config, token_scales)
    if primal_dual is None:
        return PDUObjective(forget_weight * forget_loss + lam * (retain_loss - epsilon), forget_loss, retain_loss)
    loss = primal_dual.lagrangian(forget_loss, retain_loss)
    if model.training and torch.is_grad_enabled():
        primal_dual.observe(retain_loss)
    return PDUObjective(loss, forget_loss, retain_loss)
