"""Fine-tuning a causal LM on the answers of a QA set: how ``ceu finetune`` (and so ``make demo-real``) teaches a
model the facts it will later unlearn, and how the embedded default trains its stage-one models from scratch.

One training loop for both, so that a model fine-tuned from the command line and the embedded default's models are
trained the same way.
"""
import math

import torch
from tqdm.auto import tqdm

from ceu.data import pad_batch
from ceu.heads import answer_token_losses
from ceu.schedule import lr_factor


def fit(model, samples: list[dict], pad_token_id: int, epochs: int = 60, lr: float = 3e-3, batch_size: int = 32,
        seed: int = 0, progress: bool = True, desc: str = "learn") -> float:
    """Train on the answers with the fused cross-entropy (AdamW, cosine LR); returns the last epoch's loss.

    Plain fine-tuning, not unlearning: one loss over one set, no forget/retain pairs, no λ, no data parallelism, so
    it is not :func:`ceu.unlearn` (which would run a dead forget forward per step, γ = 0, and count its epochs over a
    forget set). It keeps the schedule the embedded default's cached models were trained with (warm-up ``(k+1)/w``
    over the first epoch, decay on all weights): changing it would make a cold run differ from the cache. The
    defaults are the embedded default's (a tiny model from scratch); ``ceu finetune`` has its own.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total_steps, warmup_steps = epochs * steps_per_epoch, steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup_steps
                                                  if step < warmup_steps
                                                  else lr_factor(step, total_steps, warmup_steps, "cosine"))
    model.train()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(len(samples), generator=generator).tolist()
        epoch_loss = torch.zeros((), device=device)
        for start in range(0, len(samples), batch_size):
            batch = pad_batch([samples[i] for i in order[start:start + batch_size]], pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            losses, mask = answer_token_losses(model, batch)
            loss = losses.sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.detach()
        bar.set_postfix(loss=f"{epoch_loss.item() / steps_per_epoch:.4f}")
    model.eval()
    return epoch_loss.item() / steps_per_epoch
