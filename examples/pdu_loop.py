"""PDU unlearning in a plain PyTorch loop: ``ceu.pdu_objective`` gives the fused forget and retain losses of a batch
pair and the Lagrangian to minimise. Quoted in README.md ("Use the fused losses in your own trainer"), run by
tests/test_examples.py."""
import torch

import ceu


def unlearn(model, batches, epsilon: float, lr: float = 1e-5, lambda_init: float = 1.0, dual_lr: float = 1.0):
    """``batches``: (forget, retain) pairs of padded batches (``ceu.data.pad_batch``); one optimizer step each."""
    primal_dual = ceu.PrimalDual(lambda_init=lambda_init, dual_lr=dual_lr, epsilon=epsilon)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for forget, retain in batches:
        objective = ceu.pdu_objective(model, forget, retain, primal_dual)  # records the retain loss for λ
        objective.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        primal_dual.step()  # λ ← max(0, λ + η·(retain loss − ε))
    return primal_dual
