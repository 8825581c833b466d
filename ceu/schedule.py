"""The training schedule both loops run: optimizer steps, LR at each step, steps with λ held, weight-decay groups.

:func:`ceu.unlearn` and :class:`ceu.hf.PrimalDualTrainer` both call :func:`training_schedule` and
:func:`parameter_groups`, so one :class:`~ceu.config.UnlearnConfig` gives one schedule whichever loop runs it. Each
definition is the one users of the field already know, ``transformers.Trainer``'s (and so open-unlearning's, which
runs on Trainer):

* **Steps.** An epoch is ``M = ⌈n_forget / (batch_size · world size)⌉`` micro-batches, cut into accumulation windows
  of ``grad_accum_steps``; the last window of an epoch takes what is left (a partial window, averaged over its own
  micro-batches), and no window straddles two epochs, so each epoch has ``S = ⌈M / grad_accum_steps⌉`` optimizer
  steps, and the run ``T = ⌈epochs · S⌉`` (a fractional last epoch stops after its steps). Trainer's own rule; a
  window that straddles epochs would make ``S`` fractional and shift the dual warm-up and the epoch boundaries.
* **LR.** Linear warm-up over ``W = ⌈lr_warmup_ratio · T⌉`` steps, the LR of step ``k`` (0-based) being
  ``lr · k / W`` (so the first step runs at 0), then ``"linear"`` decay ``(T − k) / (T − W)``, ``"cosine"``
  ``½(1 + cos(π (k − W) / (T − W)))`` or ``"constant"``: Trainer's ``linear``, ``cosine`` and
  ``constant_with_warmup`` schedules, exactly. A ratio of 1 warms up over the whole run.
* **Dual warm-up.** Counted in epochs, as open-unlearning's PDU counts it (its callback enables the dual update at
  the end of epoch ``dual_warmup_epochs``), and converted to optimizer steps with the same ``S``: λ stays at λ₀ for
  the first ``D = ⌈dual_warmup_epochs · S⌉`` optimizer steps, and the dual update of step ``D + 1`` is the first that
  moves it. For a whole number of epochs (the authors' 5, MUSE's 3) that is open-unlearning's warm-up; a fractional
  one ends on the step it names rather than at the next epoch end.
* **Weight decay.** Biases and normalisation weights are exempt (Trainer's ``get_decay_parameter_names``: names with
  ``bias``, ``layernorm``, ``rmsnorm``, ``norm`` or ``_norm`` as a component, and everything in an ``nn.LayerNorm``);
  decaying a norm's gain pulls it towards 0, which no recipe in this field does.
"""
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ceu.config import UnlearnConfig

NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _ceil(value: float) -> int:
    """``⌈value⌉`` that does not round ``3.0000000000000004`` (``0.1 · 30``) up to 4."""
    return math.ceil(round(value, 9))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): warm-up ``step / warmup_steps``, then constant,
    linear or cosine decay to 0 at ``total_steps`` (Trainer's schedules, see the module docstring)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


@dataclass(frozen=True)
class Schedule:
    """How a run's micro-batches become optimizer steps, and what the LR and λ do at each step."""

    micro_batches_per_epoch: int  # M, global micro-batches (of batch_size · world size samples)
    grad_accum_steps: int
    steps_per_epoch: int          # S = ⌈M / grad_accum_steps⌉
    total_steps: int              # T = ⌈epochs · S⌉
    lr_warmup_steps: int          # W
    dual_warmup_steps: int        # D: λ held at λ₀ for optimizer steps 1..D
    lr_schedule: str = "linear"

    @property
    def epochs_touched(self) -> int:
        """Epochs the run starts (the last one possibly cut short)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def windows(self) -> Iterator[range]:
        """The micro-batches of each optimizer step, as index ranges into the run's micro-batches (epoch ``e``'s
        being ``e·M .. (e+1)·M − 1``), one step at a time: a run of a billion epochs holds none of them in memory."""
        step = 0
        for epoch in range(self.epochs_touched):
            first = epoch * self.micro_batches_per_epoch
            for start in range(0, self.micro_batches_per_epoch, self.grad_accum_steps):
                if step == self.total_steps:
                    return
                yield range(first + start, first + min(start + self.grad_accum_steps, self.micro_batches_per_epoch))
                step += 1

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
        return lr_factor(step, self.total_steps, self.lr_warmup_steps, self.lr_schedule)

    def lambda_held(self, step: int) -> bool:
        """Whether λ stays at λ₀ through optimizer step ``step`` (1-based, as logged)."""
        return step <= self.dual_warmup_steps

    def epoch(self, step: int) -> float:
        """Epochs done after optimizer step ``step`` (1-based), counted in micro-batches as Trainer counts them (a
        step ending on a partial window ends its epoch)."""
        epoch, within = divmod(step - 1, self.steps_per_epoch)
        return epoch + min((within + 1) * self.grad_accum_steps, self.micro_batches_per_epoch) / \
            self.micro_batches_per_epoch


def training_schedule(n_forget: int, config: UnlearnConfig, world_size: int = 1) -> Schedule:
    """The schedule of a run over ``n_forget`` forget samples on ``world_size`` data-parallel ranks (see the module
    docstring for each definition)."""
    if n_forget < 1:
        raise ValueError(f"need at least one forget sample, got {n_forget}")
    micro_batches = math.ceil(n_forget / (config.batch_size * world_size))
    steps_per_epoch = math.ceil(micro_batches / config.grad_accum_steps)
    total_steps = max(1, _ceil(config.epochs * steps_per_epoch))
    return Schedule(micro_batches_per_epoch=micro_batches, grad_accum_steps=config.grad_accum_steps,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                    lr_warmup_steps=_ceil(config.lr_warmup_ratio * total_steps),
                    dual_warmup_steps=_ceil(config.dual_warmup_epochs * steps_per_epoch),
                    lr_schedule=config.lr_schedule)


class MicroBatchPlan:
    """Seeded ``(forget indices, retain indices)`` per global micro-batch of ``batch_size · world_size`` samples, for
    every epoch the run starts: an epoch is one shuffled pass over the forget set; retain samples come from shuffled
    passes over the retain set, as many as forget samples in each pair. Every rank builds the same plan and takes its
    share (:func:`ceu.distributed.rank_share`).

    Lazy: iterating draws the pairs in order, so memory does not grow with ``epochs``; each iteration starts afresh
    from the seed. :meth:`optimizer_steps` groups them as :meth:`Schedule.windows` does."""

    def __init__(self, n_forget: int, n_retain: int, config: UnlearnConfig, world_size: int = 1):
        if n_retain < 1:
            raise ValueError(f"need at least one retain sample, got {n_retain}")
        self.schedule = training_schedule(n_forget, config, world_size)
        self.n_forget, self.n_retain, self.seed = n_forget, n_retain, config.seed
        self.batch_size = config.batch_size * world_size

    def __len__(self) -> int:
        return self.schedule.epochs_touched * self.schedule.micro_batches_per_epoch

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        generator = torch.Generator().manual_seed(self.seed)
        retain_queue, taken = [], 0
        for _ in range(self.schedule.epochs_touched):
            order = torch.randperm(self.n_forget, generator=generator).tolist()
            for start in range(0, self.n_forget, self.batch_size):
                forget_indices = order[start:start + self.batch_size]
                if len(retain_queue) - taken < len(forget_indices):
                    retain_queue = retain_queue[taken:]
                    taken = 0
                    while len(retain_queue) < len(forget_indices):
                        retain_queue += torch.randperm(self.n_retain, generator=generator).tolist()
                retain_indices = retain_queue[taken:taken + len(forget_indices)]
                taken += len(forget_indices)
                yield forget_indices, retain_indices

    def optimizer_steps(self, start: int = 0) -> Iterator[list[tuple[list[int], list[int]]]]:
        """The micro-batch pairs of each optimizer step from step ``start`` (0-based) on. A resumed run starts at its
        checkpoint's step: the steps before it are drawn (the seeded order depends on them) but not kept."""
        pairs = iter(self)
        for step, window in enumerate(self.schedule.windows()):
            micro_batches = list(itertools.islice(pairs, len(window)))
            if step >= start:
                yield micro_batches


def micro_batch_plan(n_forget: int, n_retain: int, config: UnlearnConfig, world_size: int = 1) -> MicroBatchPlan:
    """The run's :class:`MicroBatchPlan` (lazy, re-iterable)."""
    return MicroBatchPlan(n_forget, n_retain, config, world_size)


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters AdamW decays: all but biases and normalisation weights (Trainer's rule, see the module
    docstring). :class:`ceu.hf.PrimalDualTrainer` hands this to Trainer, so both loops decay the same parameters."""
    in_layer_norm = {f"{prefix}.{name}" if prefix else name
                     for prefix, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)
                     for name, _ in module.named_parameters(recurse=False)}
    patterns = [re.compile(pattern) for pattern in NO_DECAY_NAME_PATTERNS]
    return {name for name, _ in model.named_parameters()
            if name not in in_layer_norm and not any(pattern.search(name.lower()) for pattern in patterns)}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over the trainable parameters only (a frozen head gets no dW): ``weight_decay`` for
    :func:`decay_parameter_names`, none for the others."""
    decayed = decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name in decayed], "weight_decay": weight_decay},
              {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
