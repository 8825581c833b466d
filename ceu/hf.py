"""The PDU step inside ``transformers.Trainer``, for users of the Hugging Face / accelerate / DeepSpeed stack.

``PrimalDualTrainer`` computes the same losses as :func:`ceu.unlearn` (:func:`ceu.train.pdu_losses`: fused, on the LM
head, no logits) and minimises the same Lagrangian; a callback runs the dual update once per optimizer step
(``on_step_end``), averaged over the accumulation window and across ranks (``torch.distributed``, which accelerate
initialises). Train on a :class:`ForgetRetainDataset` with :class:`ForgetRetainCollator`::

    trainer = PrimalDualTrainer(model=model, args=TrainingArguments(...), unlearn_config=UnlearnConfig(...),
                                train_dataset=ForgetRetainDataset(forget, retain),
                                data_collator=ForgetRetainCollator(tokenizer.pad_token_id))
    trainer.train()

The config's optimisation fields (lr, epochs, batch size, schedule) are ignored here: ``TrainingArguments`` rules.
"""
import collections
import random

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ceu.data import pad_batch
from ceu.primal_dual import PrimalDual
from ceu.train import UnlearnConfig, pdu_losses


class ForgetRetainDataset(torch.utils.data.Dataset):
    """One item per forget sample, each paired with a retain sample drawn at random.

    The draw is a function of (seed, forget index, how often this process has fetched that index), not of a shared
    generator's call order: under data parallelism every rank fetches different forget indices, so the ranks also get
    different retain samples, and each new epoch draws new partners. (DataLoader workers each count their own
    fetches; without ``persistent_workers`` they restart every epoch and so repeat the first epoch's partners.)
    """

    def __init__(self, forget: list[dict], retain: list[dict], seed: int = 0):
        if not forget or not retain:
            raise ValueError(f"need forget and retain samples, got {len(forget)} and {len(retain)}")
        self.forget, self.retain, self.seed = forget, retain, seed
        self.visits = collections.Counter()

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict:
        draw = random.Random(f"{self.seed}/{index}/{self.visits[index]}").randrange(len(self.retain))
        self.visits[index] += 1
        return {"forget": self.forget[index], "retain": self.retain[draw]}


class ForgetRetainCollator:
    """Pads the forget and the retain halves of a batch separately (see :func:`ceu.data.pad_batch`)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        return {half: pad_batch([item[half] for item in items], self.pad_token_id) for half in ("forget", "retain")}


class DualStepCallback(TrainerCallback):
    """Sizes the warm start from the run's steps per epoch, then runs the dual update after each optimizer step."""

    def __init__(self, primal_dual: PrimalDual, warmup_epochs: float | None):
        self.primal_dual, self.warmup_epochs = primal_dual, warmup_epochs

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup_epochs is not None and state.max_steps > 0 and args.num_train_epochs > 0:
            steps_per_epoch = state.max_steps / args.num_train_epochs
            self.primal_dual.warmup_steps = round(self.warmup_epochs * steps_per_epoch)

    def on_step_end(self, args, state, control, **kwargs):
        self.primal_dual.step()


class PrimalDualTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the PDU Lagrangian ``γ·L_fgt + λ·(L_rtn − ε)``.

    The fused losses use the LM-head weight outside the model's forward, so under DDP ``ddp_find_unused_parameters``
    defaults to False here: Trainer's default search (True) marks the head unused at the forward, and DDP then fails
    in the backward ("marked as ready twice"). Setting it to True is refused.

    Args:
        unlearn_config: ε, λ₀, η_λ, γ, the dual warm-up (in epochs), ``impl`` and the reference-quirk options
            (default: ``UnlearnConfig()``).
        primal_dual: an existing :class:`PrimalDual` (e.g. restored from a checkpoint); its warm-up is kept as is.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest,
                 unlearn_config: UnlearnConfig | None = None, primal_dual: PrimalDual | None = None, **kwargs):
        args = args if args is not None else TrainingArguments(output_dir="tmp_trainer")
        if args.ddp_find_unused_parameters:
            raise ValueError("ddp_find_unused_parameters=True breaks DDP here: the fused losses use the LM-head weight "
                             "outside the model's forward, so DDP marks it unused and then ready in the backward")
        args.ddp_find_unused_parameters = False
        super().__init__(model, args, *rest, **kwargs)
        self.unlearn_config = config = unlearn_config or UnlearnConfig()
        self.primal_dual = primal_dual or PrimalDual(config.lambda_init, config.dual_lr, config.epsilon,
                                                     forget_weight=config.forget_weight,
                                                     update_every=config.dual_update)
        self.add_callback(DualStepCallback(self.primal_dual, None if primal_dual else config.dual_warmup_epochs))
        self.args.remove_unused_columns = False  # the batches are {"forget": ..., "retain": ...}
        # The Lagrangian is a mean per micro-batch: let the Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget_loss, retain_loss = pdu_losses(model, inputs["forget"], inputs["retain"], self.unlearn_config)
        loss = self.primal_dual.lagrangian(forget_loss, retain_loss)
        if model.training:
            self.primal_dual.observe(retain_loss)
        return (loss, {"forget_loss": forget_loss.detach(), "retain_loss": retain_loss.detach()}) \
            if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        logs = {**logs, "lambda": self.primal_dual.lam.item(), "epsilon": self.primal_dual.epsilon}
        if self.primal_dual.last_retain_loss is not None:
            logs["retain_loss"] = self.primal_dual.last_retain_loss.item()
        super().log(logs, *args, **kwargs)
