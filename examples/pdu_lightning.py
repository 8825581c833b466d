"""PDU unlearning in a Lightning ``training_step``. Quoted in README.md, run by tests/test_examples.py."""
import pytorch_lightning as pl
import torch

import ceu


class PDUModule(pl.LightningModule):
    def __init__(self, model, primal_dual: ceu.PrimalDual, lr: float = 1e-5):
        super().__init__()
        self.model, self.primal_dual, self.lr = model, primal_dual, lr

    def training_step(self, batch, batch_idx):
        objective = ceu.pdu_objective(self.model, batch["forget"], batch["retain"], self.primal_dual)
        self.log_dict({"forget_loss": objective.forget_loss.detach(), "retain_loss": objective.retain_loss.detach(),
                       "lambda": self.primal_dual.lam.item()}, batch_size=len(batch["forget"]["input_ids"]))
        return objective.loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.primal_dual.step()  # the dual update, once per optimizer step

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
