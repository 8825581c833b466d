"""The PDU step inside ``transformers.Trainer``, for users of the Hugging Face / accelerate / DeepSpeed stack.

``PrimalDualTrainer`` computes the same losses as :func:`ceu.unlearn` (:func:`ceu.heads.pdu_losses`: fused, on the LM
head, no logits) and minimises the same Lagrangian; a callback runs the dual update once per optimizer step
(``on_step_end``), averaged over the accumulation window and across ranks (``torch.distributed``, which accelerate
initialises). Train on a :class:`ForgetRetainDataset` with :class:`ForgetRetainCollator`::

    trainer = PrimalDualTrainer(model=model, args=training_arguments(config, "runs/hf"), unlearn_config=config,
                                train_dataset=ForgetRetainDataset(forget, retain),
                                data_collator=ForgetRetainCollator(tokenizer.pad_token_id))
    trainer.train()

or call :func:`unlearn_with_trainer`, which does that and returns what :func:`ceu.unlearn` returns. λ is saved with
every Trainer checkpoint and restored by ``trainer.train(resume_from_checkpoint=...)``.
"""
import dataclasses
import math
import random
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ceu.config import UnlearnConfig
from ceu.data import check_answer_tokens, check_not_empty, pad_batch
from ceu.distributed import ACCELERATE_FSDP_DROPPED, accelerate_fsdp_dropped, distributed_mean, local_device
from ceu.files import replacing
from ceu.methods import Objective, global_scales
from ceu.primal_dual import PrimalDual
from ceu.runlog import log_record, open_log, write_record
from ceu.schedule import Schedule, decay_parameter_names, training_schedule
from ceu.train import UnlearnResult, constraint_bound, deterministic_algorithms, uses_bf16
from ceu.zero3 import gathered_lm_head, is_zero3_parameter, release

PRIMAL_DUAL_FILE = "primal_dual.pt"
LR_SCHEDULER_TYPES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
CEU_SCHEDULES = {"constant_with_warmup": "constant", "constant": "constant", "linear": "linear", "cosine": "cosine"}


class ForgetRetainDataset(torch.utils.data.Dataset):
    """One item per forget sample, each paired with a retain sample.

    Each epoch pairs the forget set with seeded shuffled passes over the retain set, a function of (seed, epoch)
    alone: no two forget samples share a partner unless the forget set outnumbers the retain set, so data-parallel
    ranks never train on the same retain sample in an epoch; each epoch draws new partners; and a resumed run, or
    DataLoader workers, pair exactly as an uninterrupted run does. :class:`PrimalDualTrainer` calls
    :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, forget: list[dict], retain: list[dict], seed: int = 0):
        check_not_empty(forget, retain)
        self.forget, self.retain, self.seed = forget, retain, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        passes = []
        for index in range(math.ceil(len(self.forget) / len(self.retain))):
            order = list(range(len(self.retain)))
            random.Random(f"{self.seed}/{epoch}/{index}").shuffle(order)
            passes += order
        self.epoch, self.partners = epoch, passes[:len(self.forget)]

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict:
        return {"forget": self.forget[index], "retain": self.retain[self.partners[index]]}


class ForgetRetainCollator:
    """Pads the forget and the retain halves of a batch separately (see :func:`ceu.data.pad_batch`)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        return {half: pad_batch([item[half] for item in items], self.pad_token_id) for half in ("forget", "retain")}


class DualStepCallback(TrainerCallback):
    """Tells the dataset the epoch, and runs the dual update after each optimizer step."""

    def __init__(self, primal_dual: PrimalDual):
        self.primal_dual = primal_dual

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(math.floor(state.epoch or 0))  # on resume, the checkpoint's epoch

    def on_step_end(self, args, state, control, **kwargs):
        self.primal_dual.step()


class JsonlLogCallback(TrainerCallback):
    """Writes the slim loop's JSONL log lines (:func:`ceu.runlog.log_record`) from the Trainer's logs, into a log
    opened as :func:`ceu.runlog.open_log` opens it (a resumed run keeps the lines up to its checkpoint)."""

    def __init__(self, path: str, primal_dual: PrimalDual):
        self.path, self.primal_dual, self.log_file = path, primal_dual, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.log_file = open_log(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log_file is None or "forget_loss" not in (logs or {}):
            return
        write_record(self.log_file, log_record(state.global_step, state.epoch, logs["forget_loss"],
                                               logs["retain_loss"], logs["lambda"], logs["epsilon"],
                                               logs.get("learning_rate"), self.primal_dual.held_last_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


class PrimalDualTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the PDU Lagrangian ``γ·L_fgt + λ·(L_rtn − ε)``.

    The fused losses use the LM-head weight outside the model's forward, so under DDP ``ddp_find_unused_parameters``
    defaults to False here: Trainer's default search (True) marks the head unused at the forward, and DDP then fails
    in the backward ("marked as ready twice"). Setting it to True is refused.

    While training, the losses are token-means over the global micro-batch (the ranks' answer-token counts are
    all-reduced, :func:`ceu.heads.global_token_scales`), so N ranks match one process with N times the batch.
    Logs add ``lambda``, ``epsilon`` and the forget and retain losses averaged over the logging interval and the ranks.
    Checkpoints add ``primal_dual.pt`` (λ, ε, dual steps), which ``train(resume_from_checkpoint=...)`` restores.

    The schedule is :func:`ceu.schedule.training_schedule`'s, the one :func:`ceu.unlearn` runs: the batch size,
    accumulation and epochs come from ``args`` (Trainer's per-epoch accumulation windows are ceu's), the LR schedule,
    the LR warm-up ratio and the dual warm-up from ``unlearn_config``, and weight decay spares the parameters
    :func:`ceu.schedule.decay_parameter_names` spares. ``args`` that ask for another LR schedule or warm-up, or for
    ``max_steps``, are refused rather than silently overridden (:func:`training_arguments` makes matching ones).

    Args:
        unlearn_config: ε, λ₀, η_λ, γ, the LR schedule and warm-up ratio, the dual warm-up (in epochs), ``impl`` and
            the reference-quirk options (default: ``UnlearnConfig()``).
        primal_dual: an existing :class:`PrimalDual`; its warm-up is kept as is.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest,
                 unlearn_config: UnlearnConfig | None = None, primal_dual: PrimalDual | None = None, **kwargs):
        args = args if args is not None else TrainingArguments(output_dir="tmp_trainer")
        config = unlearn_config if unlearn_config is not None else UnlearnConfig()
        if args.ddp_find_unused_parameters:
            raise ValueError("ddp_find_unused_parameters=True breaks DDP here: the fused losses use the LM-head weight "
                             "outside the model's forward, so DDP marks it unused and then ready in the backward")
        if CEU_SCHEDULES.get(args.lr_scheduler_type.value) != config.lr_schedule:
            raise ValueError(f"args.lr_scheduler_type is {args.lr_scheduler_type.value!r} but the UnlearnConfig's "
                             f"lr_schedule is {config.lr_schedule!r}: PrimalDualTrainer runs ceu's schedule, set it "
                             "in UnlearnConfig (training_arguments(config, ...) makes matching arguments)")
        if args.warmup_steps:
            raise ValueError(f"args.warmup_steps is {args.warmup_steps}: PrimalDualTrainer's LR warm-up is "
                             "UnlearnConfig.lr_warmup_ratio (a fraction of the optimizer steps); leave warmup_steps 0")
        if args.max_steps > 0:
            raise ValueError("args.max_steps is set: PrimalDualTrainer's schedule is counted in epochs "
                             "(num_train_epochs), as ceu.unlearn's is")
        args.ddp_find_unused_parameters = False
        super().__init__(model, args, *rest, **kwargs)
        check_fsdp_plugin(self.accelerator)
        self.unlearn_config = config
        if config.dual_update_per_epoch:
            raise ValueError("dual_update_per_epoch runs in ceu.unlearn's loop only, not under PrimalDualTrainer")
        # The method (ceu.methods); NPO and the KL retain loss measure the starting model here.
        self.objective = Objective(self.model, getattr(self.train_dataset, "forget", []), config)
        self.primal_dual = primal_dual or self.objective.primal_dual(config.epsilon, 0)
        self._sizes_dual_warmup = primal_dual is None
        self.schedule: Schedule | None = None  # known once train() has the data
        self.add_callback(DualStepCallback(self.primal_dual))
        self.args.remove_unused_columns = False  # the batches are {"forget": ..., "retain": ...}
        # The Lagrangian is a mean per micro-batch: let the Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._logged_losses, self._logged_micro_batches = None, 0

    def training_schedule(self) -> Schedule:
        """ceu's schedule for this Trainer's data, batch size, accumulation, epochs and number of processes."""
        config = dataclasses.replace(self.unlearn_config, batch_size=self.args.per_device_train_batch_size,
                                     grad_accum_steps=self.args.gradient_accumulation_steps,
                                     epochs=self.args.num_train_epochs)
        return training_schedule(len(self.train_dataset), config, world_size=self.args.world_size)

    def get_decay_parameter_names(self, model) -> list[str]:
        """The parameters AdamW decays: ceu's rule (:func:`ceu.schedule.decay_parameter_names`)."""
        return sorted(decay_parameter_names(model))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """ceu's LR schedule (:meth:`ceu.schedule.Schedule.lr_factor`), after checking that Trainer plans the same
        number of optimizer steps; sizes the dual warm-up from the same schedule."""
        self.schedule = schedule = self.training_schedule()
        if schedule.total_steps != num_training_steps:
            raise RuntimeError(f"Trainer plans {num_training_steps} optimizer steps, ceu's schedule "
                               f"{schedule.total_steps} ({schedule}): a sampler or dataloader setting "
                               "(dataloader_drop_last?) changes the steps per epoch")
        if self._sizes_dual_warmup:
            self.primal_dual.warmup_steps = schedule.dual_warmup_steps
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                  lambda step: schedule.lr_factor(step))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Token-means over the global micro-batch, as in ceu.unlearn, however unevenly the ranks' tokens fall.
        token_scales, sample_scale = global_scales(inputs["forget"], inputs["retain"], self.unlearn_config) \
            if model.training and self.unlearn_config.empty_batch == "zero" else (None, None)
        with gathered_lm_head(model):  # under ZeRO-3, the head's weight is gathered for the fused losses
            forget_loss, retain_loss = self.objective.losses(model, inputs["forget"], inputs["retain"], token_scales,
                                                             sample_scale)
        loss = self.primal_dual.lagrangian(forget_loss, retain_loss)
        if model.training:
            self.primal_dual.observe(retain_loss)
            losses = torch.stack([forget_loss.detach().float(), retain_loss.detach().float()])
            self._logged_losses = losses if self._logged_losses is None else self._logged_losses + losses
            self._logged_micro_batches += 1
        return (loss, {"forget_loss": forget_loss.detach(), "retain_loss": retain_loss.detach()}) \
            if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        """Every rank calls this (Trainer gathers the loss first), so the interval means are all-reduced here."""
        logs = {**logs, "lambda": self.primal_dual.lam.item(), "epsilon": self.primal_dual.epsilon}
        if self._logged_micro_batches:
            forget_loss, retain_loss = (distributed_mean(self._logged_losses) / self._logged_micro_batches).tolist()
            logs.update(forget_loss=forget_loss, retain_loss=retain_loss)
            self._logged_losses, self._logged_micro_batches = None, 0
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            with replacing(folder / PRIMAL_DUAL_FILE) as temporary:  # a failed write leaves no partial file
                torch.save(self.primal_dual.state_dict(), temporary)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / PRIMAL_DUAL_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {resume_from_checkpoint} was not written by "
                                        "PrimalDualTrainer, so λ cannot be restored")
            self.primal_dual.load_state_dict(torch.load(path, map_location="cpu"))
        return super().train(resume_from_checkpoint, *args, **kwargs)


def check_fsdp_plugin(accelerator) -> None:
    """Refuses an FSDP request accelerate dropped, and accelerate's FSDP plugin with ``fsdp_version: 1``.

    accelerate applies its plugin only on GPUs and other accelerators: on CPU (``use_cpu``) it sets up ``MULTI_CPU``
    (DDP) or no data parallelism and leaves ``state.fsdp_plugin`` unset, so an FSDP launch would silently train
    unsharded replicas. The fused losses read the LM head's weight outside its forward: FSDP2 shards the head with the
    root module, whose parameters stay gathered from the forward to the backward (the layout the ``--parallel fsdp``
    tests cover), while FSDP1's flat parameters are untested here."""
    if accelerate_fsdp_dropped(accelerator.state):
        raise ValueError(ACCELERATE_FSDP_DROPPED.format(
            runs=f"distributed type {accelerator.state.distributed_type.value} instead"))
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and plugin.fsdp_version == 1:
        raise ValueError("accelerate's FSDP plugin with fsdp_version 1 is not supported by PrimalDualTrainer (the "
                         "fused losses read the LM head's weight outside its forward): set fsdp_version: 2, or use "
                         "DDP or DeepSpeed ZeRO-3")


def training_arguments(config: UnlearnConfig, output_dir: str | Path, **overrides) -> TrainingArguments:
    """``TrainingArguments`` with ``config``'s optimisation settings (batch size per device, accumulation, epochs, LR,
    schedule, weight decay, clipping, seed, bf16, logging and checkpoint interval), so a Trainer run is set up as
    :func:`ceu.unlearn` is. The LR warm-up is not among them: :class:`PrimalDualTrainer` takes the ratio from its
    ``unlearn_config`` (Trainer's ``warmup_steps`` cannot say "the whole run": 1.0 means one step). The one
    difference left is the data order: Trainer's sampler shuffles with ``seed`` in its own order."""
    on_cpu = local_device().type == "cpu"  # what ceu.distributed.accelerate_fsdp_dropped foresees
    bf16 = uses_bf16(config, "cpu" if on_cpu else "cuda")
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=config.batch_size,
                    gradient_accumulation_steps=config.grad_accum_steps, num_train_epochs=config.epochs,
                    learning_rate=config.lr, weight_decay=config.weight_decay,
                    lr_scheduler_type=LR_SCHEDULER_TYPES[config.lr_schedule], warmup_steps=0,
                    max_grad_norm=config.max_grad_norm or 0.0, seed=config.seed, bf16=bf16, use_cpu=on_cpu,
                    logging_steps=config.log_every, disable_tqdm=not config.progress, report_to=[],
                    save_strategy="steps" if config.checkpoint_every else "no",
                    save_steps=config.checkpoint_every or 500,
                    activation_checkpointing=config.gradient_checkpointing)  # non-reentrant: Trainer's default
    return TrainingArguments(**{**settings, **overrides})


def unlearn_with_trainer(model, forget_data: list[dict], retain_data: list[dict],
                         config: UnlearnConfig | None = None, pad_token_id: int = 0,
                         output_dir: str | Path = "runs/trainer") -> UnlearnResult:
    """:func:`ceu.unlearn` run by :class:`PrimalDualTrainer`: the way to run PDU under ``accelerate launch`` (or a
    DeepSpeed config). Pass the unwrapped model and the full data on every rank; Trainer wraps the model and shards
    the data. ``config`` (default ``UnlearnConfig()``): ``checkpoint_dir`` (default ``output_dir``) receives Trainer
    checkpoints every ``checkpoint_every`` steps; ``resume_from`` is one of them. ``log_path`` gets the slim loop's
    JSONL log. After a DeepSpeed ZeRO-3 run the model is handed back whole on every rank
    (:func:`ceu.zero3.release`)."""
    config = config if config is not None else UnlearnConfig()
    check_answer_tokens(forget_data, retain_data, forget_shifted=config.forget_mask == "shifted")
    epsilon, initial_retain_loss = constraint_bound(model, retain_data, config, pad_token_id)
    args = training_arguments(config, config.checkpoint_dir or output_dir)
    trainer = PrimalDualTrainer(model=model, args=args,
                                unlearn_config=dataclasses.replace(config, epsilon=epsilon),
                                train_dataset=ForgetRetainDataset(forget_data, retain_data, seed=config.seed),
                                data_collator=ForgetRetainCollator(pad_token_id))
    if config.log_path:
        trainer.add_callback(JsonlLogCallback(config.log_path, trainer.primal_dual))
    with deterministic_algorithms(config.deterministic):
        trainer.train(resume_from_checkpoint=config.resume_from)
    if is_zero3_parameter(next(model.parameters())):  # partitioned: give the caller back a plain model
        release(trainer.model_wrapped)
    model.eval()
    return UnlearnResult.of(trainer.primal_dual, trainer.state.global_step, initial_retain_loss)
