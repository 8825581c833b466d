"""The configuration of an unlearning run: :class:`UnlearnConfig` and its choices, in one place.

No torch here: the CLI builds its options from these fields (``ceu --help`` stays fast) and both training loops,
:func:`ceu.unlearn` and :class:`ceu.hf.PrimalDualTrainer`, read the same object. A field's ``metadata`` holds its
help text and, for the fields the ``ceu unlearn`` command exposes, its option group there.
"""
import math
import numbers
import os
from dataclasses import dataclass, field, fields

LR_SCHEDULES = ("constant", "linear", "cosine")
IMPLS = ("auto", "torch", "triton", "cuda")
CHOICES = {"forget_mask": ("shifted", "unshifted"), "dual_update": ("optimizer_step", "micro_batch"),
           "empty_batch": ("zero", "nan"), "mixed_precision": ("auto", "bf16", "no"), "lr_schedule": LR_SCHEDULES,
           "impl": IMPLS}
# Unlearning methods (ceu.methods) and their reference-implementation options.
METHODS = ("pdu", "graddiff", "gradascent", "npo", "simnpo")
CHOICES.update(method=METHODS, retain_loss=("nll", "kl"), forget_positions=("answer", "all"))

METHOD, TRAINING, REFERENCE = "method", "training", "reference"


def knob(default, help: str, group: str | None = None):
    """A field of :class:`UnlearnConfig` with its help text (and its ``ceu unlearn`` option group, if it has one)."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class UnlearnConfig:
    """Every knob of :func:`ceu.unlearn` and :class:`ceu.hf.PrimalDualTrainer`. The defaults are the PDU authors' TOFU
    settings (λ₀=100, η_λ=5, ε=0.3, 5 warm-up epochs, lr 1e-5, 10 epochs); MUSE used λ₀=50, η_λ=1, 3 warm-up epochs.
    How epochs, accumulation and the two warm-ups become optimizer steps: :mod:`ceu.schedule`. An invalid value (NaN,
    infinite, out of :data:`RANGES`, of the wrong type) is refused here, by a :class:`ConfigError` naming the field,
    not deep inside a run."""

    epochs: float = knob(10.0, "passes over the forget set", TRAINING)
    lr: float = knob(1e-5, "AdamW learning rate", TRAINING)
    batch_size: int = knob(4, "forget (and retain) samples per micro-batch", TRAINING)
    grad_accum_steps: int = knob(1, "micro-batches per optimizer step (an epoch's last step takes what is left)",
                                 TRAINING)
    weight_decay: float = knob(0.01, "AdamW weight decay (biases and norm weights are exempt)", TRAINING)
    lr_schedule: str = knob("linear", "LR decay after the warm-up", TRAINING)
    lr_warmup_ratio: float = knob(0.0, "fraction of the optimizer steps with a linear LR warm-up", TRAINING)
    max_grad_norm: float | None = knob(1.0, "gradient clipping norm (None: off)")
    lambda_init: float = knob(100.0, "initial dual variable lambda_0 (the retain loss weight)", METHOD)
    dual_lr: float = knob(5.0, "dual step size eta_lambda", METHOD)
    epsilon: float = knob(0.3, "bound on the retain loss (absolute)", METHOD)
    epsilon_alpha: float | None = knob(None, "bound relative to the model before unlearning: "
                                             "epsilon = (1 + alpha) * retain loss", METHOD)
    dual_warmup_epochs: float = knob(5.0, "epochs during which lambda stays at lambda_0", METHOD)
    forget_weight: float | None = knob(None, "weight gamma of the forget loss (None: the method's, 1; SimNPO 0.125)",
                                       METHOD)
    impl: str = knob("auto", "fused-loss backend")
    mixed_precision: str = knob("auto", "auto (bf16 autocast where the GPU supports it), bf16 or no")
    seed: int = knob(0, "seed of the data order", TRAINING)
    log_every: int = knob(1, "optimizer steps between log lines (the only host syncs in the loop)")
    log_path: str | None = knob(None, "JSONL log (None: no file)")
    progress: bool = knob(True, "tqdm progress bar")
    deterministic: bool = knob(False, "deterministic algorithms: a rerun gives bitwise the same model", TRAINING)
    checkpoint_dir: str | None = knob(None, "where checkpoints go (step-NNNNNN.pt; checkpoint-N/ with --trainer hf)",
                                      TRAINING)
    checkpoint_every: int = knob(0, "optimizer steps between checkpoints (0: never)", TRAINING)
    resume_from: str | None = knob(None, "a checkpoint to continue from (same data and settings)", TRAINING)
    gradient_checkpointing: bool = knob(False, "recompute each transformer layer's activations in the backward "
                                               "instead of keeping them: less memory, about one more forward of time",
                                        TRAINING)
    # Reproduce the reference implementation (open-unlearning's PDU) instead of fixing it:
    forget_mask: str = knob("shifted", "unshifted: its off-by-one forget mask labels != -100", REFERENCE)
    dual_update: str = knob("optimizer_step", "micro_batch: update lambda per micro-batch from the local rank's loss",
                            REFERENCE)
    empty_batch: str = knob("zero", "nan: divide by zero on a batch with no answer token", REFERENCE)
    # The method (ceu.methods: the baselines on the same fused losses) and its hyperparameters; None: its default.
    method: str = knob("pdu", "pdu (primal-dual, LMF forget loss), graddiff, gradascent, npo or simnpo", METHOD)
    retain_weight: float | None = knob(None, "alpha, the fixed retain-loss weight of graddiff/npo/simnpo "
                                             "(None: 1; gradascent has none)", METHOD)
    beta: float | None = knob(None, "NPO/SimNPO inverse temperature beta (None: NPO 0.1, SimNPO 4.5)", METHOD)
    delta: float = knob(0.0, "SimNPO margin delta on the length-normalised NLL", METHOD)
    retain_loss: str = knob("nll", "kl: KL(starting model || model) on the retain answer tokens instead of the NLL "
                                   "(retain_loss_type: KL)", REFERENCE)
    dual_update_per_epoch: bool = knob(False, "update lambda once per epoch from the retain loss over the whole retain "
                                              "set (dual_update_upon: epoch)", REFERENCE)
    forget_positions: str = knob("answer", "all: the authors' first PDU forget loss, LMF averaged over every position "
                                           "of the padded forget batch", REFERENCE)

    def __post_init__(self):
        for spec in fields(self):
            _check_field(spec, getattr(self, spec.name))
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("checkpoint_every", "needs a checkpoint_dir")


# What each number may be (low, high, whether low itself is allowed), and why where it is not obvious. Every other
# numeric field only has to be finite.
RANGES = {"epochs": (0, math.inf, False), "lr": (0, math.inf, True), "batch_size": (1, math.inf, True),
          "grad_accum_steps": (1, math.inf, True), "weight_decay": (0, math.inf, True),
          "lr_warmup_ratio": (0, 1, True), "max_grad_norm": (0, math.inf, False), "lambda_init": (0, math.inf, True),
          "dual_lr": (0, math.inf, True), "epsilon": (0, math.inf, True), "epsilon_alpha": (0, math.inf, True),
          "dual_warmup_epochs": (0, math.inf, True), "forget_weight": (0, math.inf, True),
          "seed": (0, 2 ** 63 - 1, True), "log_every": (1, math.inf, True), "checkpoint_every": (0, math.inf, True)}
WHY = {"max_grad_norm": " (a negative norm would turn clipping into gradient ascent; None: no clipping)",
       "epsilon": " (the retain loss is a cross-entropy, never negative)",
       "forget_weight": " (a negative weight would train on the forget set)",
       "lambda_init": " (lambda weighs the retain loss; the dual step keeps it >= 0)"}
# Fields a resumed run may set differently from the run that wrote the checkpoint (where to log and checkpoint, how
# often, the progress bar, the backend, determinism and activation-recomputation switches): the others change what
# the run computes, and ceu.checkpoint refuses a resume that changes them.
CHANGEABLE_ON_RESUME = ("log_path", "log_every", "progress", "checkpoint_dir", "checkpoint_every", "resume_from",
                        "impl", "deterministic", "gradient_checkpointing")


class ConfigError(ValueError):
    """An invalid :class:`UnlearnConfig` field; ``field`` names it (the CLI turns it into its option)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field


def check_field(name: str, value) -> None:
    """``value`` is one that :class:`UnlearnConfig`'s field ``name`` accepts on its own (its type, choices and
    :data:`RANGES`; not the checks across fields), else a :class:`ConfigError` naming it: how a command checks an
    option that means what the field means, with the same words."""
    _check_field(next(spec for spec in fields(UnlearnConfig) if spec.name == name), value)


def _check_field(spec, value) -> None:
    name = spec.name
    _check_type(spec, value)
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(name, f"must be one of {CHOICES[name]}, got {value!r}")
    if name in RANGES and value is not None:
        low, high, closed_low = RANGES[name]
        if not ((value >= low if closed_low else value > low) and value <= high):
            bound = f"{'>=' if closed_low else '>'} {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ConfigError(name, f"must be {bound}, got {value}" + WHY.get(name, ""))


def _check_type(spec, value) -> None:
    """A field's value is of its declared type: a real, finite number for numeric fields (an int for int fields,
    never a bool), a bool for flags, a string (or path) for text; None only where the field allows it."""
    kinds = getattr(spec.type, "__args__", (spec.type,))
    if value is None:
        if type(None) not in kinds:
            raise ConfigError(spec.name, "must be set, got None")
        return
    if bool in kinds:
        if not isinstance(value, bool):
            raise ConfigError(spec.name, f"must be True or False, got {value!r}")
    elif int in kinds or float in kinds:
        numeric = numbers.Real if float in kinds else numbers.Integral
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(spec.name, f"must be {'a number' if float in kinds else 'an integer'}, "
                                         f"got {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond float range
            finite = False
        if not finite:
            raise ConfigError(spec.name, f"must be finite, got {value}")
    elif str in kinds and not isinstance(value, (str, os.PathLike)):
        raise ConfigError(spec.name, f"must be a string, got {value!r}")


def config_fields(group: str | None = None) -> list:
    """The fields of :class:`UnlearnConfig` (those of one ``ceu unlearn`` option group when ``group`` is given)."""
    return [f for f in fields(UnlearnConfig) if group is None or f.metadata.get("group") == group]
