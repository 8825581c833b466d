"""PDU unlearning in a ``transformers.Trainer`` subclass that overrides ``compute_loss``, as open-unlearning's
trainers do. Quoted in README.md, run by tests/test_examples.py. (``ceu.hf.PrimalDualTrainer`` is the full version:
ceu's schedule, logging, checkpoints with λ, global token means across ranks.)"""
import transformers

import ceu
from ceu.hf import ForgetRetainCollator, ForgetRetainDataset


class DualStep(transformers.TrainerCallback):
    def __init__(self, primal_dual):
        self.primal_dual = primal_dual

    def on_step_end(self, args, state, control, **kwargs):  # once per optimizer step
        self.primal_dual.step()


class PDUTrainer(transformers.Trainer):
    def __init__(self, *args, primal_dual: ceu.PrimalDual, **kwargs):
        super().__init__(*args, **kwargs)
        self.primal_dual = primal_dual
        self.add_callback(DualStep(primal_dual))
        self.model_accepts_loss_kwargs = False  # a mean per micro-batch: Trainer divides by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective = ceu.pdu_objective(model, inputs["forget"], inputs["retain"], self.primal_dual)
        return (objective.loss, objective._asdict()) if return_outputs else objective.loss


def unlearn(model, forget: list[dict], retain: list[dict], primal_dual: ceu.PrimalDual,
            args: transformers.TrainingArguments, pad_token_id: int = 0) -> PDUTrainer:
    args.remove_unused_columns = False  # the batches are {"forget": ..., "retain": ...}
    trainer = PDUTrainer(model=model, args=args, primal_dual=primal_dual,
                         train_dataset=ForgetRetainDataset(forget, retain),
                         data_collator=ForgetRetainCollator(pad_token_id))
    trainer.train()
    return trainer
