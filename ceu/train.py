"""The unlearning loop: primal-dual unlearning (PDU) with the fused LM-head losses.

``unlearn(model, forget_data, retain_data, config)`` pairs each forget micro-batch with a retain micro-batch, takes the
final hidden states of the model and computes the LMF forget loss and the retain cross-entropy with the fused
functions on the LM-head weight (no ``[tokens, V]`` logits), minimises the Lagrangian with AdamW and updates λ once
per optimizer step (:class:`ceu.primal_dual.PrimalDual`). Read top to bottom: data, model, optimizer, loop, log.
"""
import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ceu.cross_entropy import linear_cross_entropy
from ceu.data import IGNORE_INDEX, pad_batch
from ceu.lmf import linear_lmf_loss
from ceu.primal_dual import PrimalDual, distributed_mean, relative_epsilon

LR_SCHEDULES = ("constant", "linear", "cosine")
CHOICES = {"forget_mask": ("shifted", "unshifted"), "dual_update": ("optimizer_step", "micro_batch"),
           "empty_batch": ("zero", "nan"), "mixed_precision": ("auto", "bf16", "no"), "lr_schedule": LR_SCHEDULES}


@dataclass
class UnlearnConfig:
    """Every knob of :func:`unlearn`. The defaults are the PDU authors' TOFU settings (λ₀=100, η_λ=5, ε=0.3, 5 warm-up
    epochs, lr 1e-5, 10 epochs); MUSE used λ₀=50, η_λ=1, 3 warm-up epochs."""

    epochs: float = 10.0
    lr: float = 1e-5
    batch_size: int = 4                   # forget samples per micro-batch, paired with as many retain samples
    grad_accum_steps: int = 1             # micro-batches per optimizer step
    weight_decay: float = 0.01
    lr_schedule: str = "linear"           # "constant", "linear" or "cosine" decay after the warm-up
    lr_warmup_ratio: float = 0.0          # fraction of the optimizer steps with a linear LR warm-up
    max_grad_norm: float | None = 1.0     # gradient clipping (None: off)
    lambda_init: float = 100.0            # λ₀
    dual_lr: float = 5.0                  # η_λ
    epsilon: float = 0.3                  # bound on the retain loss ...
    epsilon_alpha: float | None = None    # ... or, when set, ε = (1 + α)·L_rtn(θ₀) measured on the retain set first
    dual_warmup_epochs: float = 5.0       # λ stays at λ₀ this long
    forget_weight: float = 1.0            # γ
    impl: str = "auto"                    # fused-loss backend: "auto", "torch", "triton", "cuda"
    mixed_precision: str = "auto"         # "auto" (bf16 autocast where the GPU supports it), "bf16" or "no"
    seed: int = 0                         # data order
    log_every: int = 1                    # optimizer steps between log lines (the only host syncs in the loop)
    log_path: str | None = None           # JSONL log; None: no file
    progress: bool = True                 # tqdm bar
    deterministic: bool = False           # torch.use_deterministic_algorithms for the run: bitwise repeatable
    checkpoint_dir: str | None = None     # where step-NNNNNN.pt checkpoints go ...
    checkpoint_every: int = 0             # ... every this many optimizer steps (0: never)
    resume_from: str | None = None        # a checkpoint file to continue from (same data and data-order settings)
    # Reproduce the reference implementation (open-unlearning's PDU) instead of fixing it:
    forget_mask: str = "shifted"          # "unshifted": its forget mask labels != -100 is off by one position
    dual_update: str = "optimizer_step"   # "micro_batch": it updates λ per micro-batch from the local rank's loss
    empty_batch: str = "zero"             # "nan": it divides by zero when a batch has no answer token

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


@dataclass
class UnlearnResult:
    epsilon: float
    final_lambda: float
    steps: int
    initial_retain_loss: float | None
    primal_dual: PrimalDual
    final_retain_loss: float | None = None  # mean retain loss of the last optimizer step
    constraint_met: bool | None = None      # final_retain_loss <= epsilon

    @classmethod
    def of(cls, primal_dual: PrimalDual, steps: int, initial_retain_loss: float | None) -> "UnlearnResult":
        """The result of a run whose dual state ended as ``primal_dual``."""
        last = primal_dual.last_retain_loss
        final_retain_loss = None if last is None else last.item()
        return cls(primal_dual.epsilon, primal_dual.lam.item(), steps, initial_retain_loss, primal_dual,
                   final_retain_loss, None if final_retain_loss is None else final_retain_loss <= primal_dual.epsilon)


def causal_lm(model):
    """The ``*ForCausalLM`` inside DDP, ``torch.compile`` and PEFT wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def lm_head(model) -> torch.nn.Linear:
    """The LM head, checked to be a plain linear layer whose output is the logits."""
    lm = causal_lm(model)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(lm.config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(lm).__name__} transforms its logits ({name}={getattr(lm.config, name)}):"
                                      " the fused losses need logits = hidden @ W.T + b")
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the LM head is a {type(head).__name__}, not torch.nn.Linear (an adapter on the head?): "
                        "the fused losses need its plain weight")
    return head


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states ``[B, T, H]`` from the model's own forward with the LM head bypassed.

    The head is swapped for an identity for the duration of the call, so the top-level forward still runs (DDP's
    gradient sync, PEFT and accelerate wrappers keep working) while no logits are computed.
    """
    lm = causal_lm(model)
    head = lm_head(model)
    lm.set_output_embeddings(torch.nn.Identity())
    try:
        with warnings.catch_warnings():  # FSDP2 warns of in-place ops on a returned view; the losses make none
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        lm.set_output_embeddings(head)
    return outputs.logits


def is_dtensor(tensor: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def head_parameters(model, dtype: torch.dtype):
    """LM-head weight and bias in ``dtype`` (the hidden states' dtype under autocast).

    Under FSDP2 the head must be sharded with the root module (``fully_shard(model)``), which keeps its parameters
    gathered from the forward until the backward; a head with its own ``fully_shard`` is never gathered here, since
    the forward bypasses it.
    """
    head = lm_head(model)
    if is_dtensor(head.weight):
        raise RuntimeError("the LM-head weight is still sharded (a DTensor) after the model's forward: shard the head "
                           "with the root module, fully_shard(model), not with its own fully_shard(model.lm_head)")
    weight = head.weight.to(dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    return weight, bias


def answer_token_losses(model, batch: dict, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per answer token ``[B, T-1]`` (0 elsewhere) and the answer-token mask."""
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    weight, bias = head_parameters(model, hidden.dtype)
    targets = batch["labels"][:, 1:]
    losses = linear_cross_entropy(hidden, weight, targets, bias, reduction="none", impl=impl)
    return losses, targets != IGNORE_INDEX


def forget_answer_mask(labels: torch.Tensor, config: UnlearnConfig) -> torch.Tensor:
    """The forget positions the LMF loss counts: position t predicts token t+1, so it counts when t+1 is an answer
    token (``[B, T-1]``); ``forget_mask="unshifted"`` is the reference's ``labels != -100`` (``[B, T]``)."""
    return (labels[:, 1:] if config.forget_mask == "shifted" else labels) != IGNORE_INDEX


def global_token_scales(forget: dict, retain: dict, config: UnlearnConfig) -> torch.Tensor:
    """``pdu_losses``' ``token_scales`` for a micro-batch whose global answer-token counts are not known in advance
    (a sampler hands each rank its share): ``world size / global count`` of forget and retain tokens, from one
    all-reduce of the local counts. A global micro-batch without answer tokens gets loss 0."""
    counts = torch.stack([forget_answer_mask(forget["labels"], config).sum(),
                          (retain["labels"][:, 1:] != IGNORE_INDEX).sum()]).float()
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return world_size / counts.clamp_min(1.0)


def pdu_losses(model, forget: dict, retain: dict, config: UnlearnConfig,
               token_scales: tuple[float, float] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_fgt, L_rtn)`` of one micro-batch pair: the LMF loss over the forget answer tokens and the token-mean
    cross-entropy over the retain answer tokens, both fused on the LM-head weight.

    ``token_scales=(forget, retain)`` replaces each local token-mean by ``scale · sum``: with ``scale = world size /
    answer tokens of the global micro-batch`` the mean over data-parallel ranks (DDP's and FSDP's gradient average, the
    all-reduced retain loss) is the global micro-batch's token-mean, however unevenly the ranks' tokens fall.
    """
    forget_hidden = final_hidden_states(model, forget["input_ids"], forget["attention_mask"])
    weight, bias = head_parameters(model, forget_hidden.dtype)
    forget_mask = forget_answer_mask(forget["labels"], config)
    if config.forget_mask == "shifted":
        forget_hidden = forget_hidden[:, :-1]
    retain_hidden = final_hidden_states(model, retain["input_ids"], retain["attention_mask"])[:, :-1]
    retain_targets = retain["labels"][:, 1:]
    if config.empty_batch == "zero" and token_scales is None:
        forget_loss = linear_lmf_loss(forget_hidden, weight, bias, mask=forget_mask, impl=config.impl)
        retain_loss = linear_cross_entropy(retain_hidden, weight, retain_targets, bias, impl=config.impl)
        return forget_loss, retain_loss
    forget_loss = linear_lmf_loss(forget_hidden, weight, bias, mask=forget_mask, reduction="sum", impl=config.impl)
    retain_loss = linear_cross_entropy(retain_hidden, weight, retain_targets, bias, reduction="sum", impl=config.impl)
    if config.empty_batch == "nan":  # the reference's local token-mean, 0/0 on a batch without answer tokens
        return forget_loss / forget_mask.sum(), retain_loss / (retain_targets != IGNORE_INDEX).sum()
    return forget_loss * token_scales[0], retain_loss * token_scales[1]


@torch.no_grad()
def dataset_loss(model, samples: list[dict], pad_token_id: int = 0, batch_size: int = 32,
                 impl: str = "auto") -> float:
    """Token-mean cross-entropy over every answer token of ``samples`` (the retain loss of the constraint)."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(samples[start:start + batch_size], pad_token_id).items()}
        losses, mask = answer_token_losses(model, batch, impl)
        total += losses.float().sum()
        count += mask.sum()
    return (total / count.clamp_min(1)).item()


def uses_bf16(config: UnlearnConfig, device_type: str) -> bool:
    """bf16 mixed precision on GPUs that support it (``"auto"``), everywhere for ``"bf16"``, never for ``"no"``."""
    return config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and device_type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_context(config: UnlearnConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(config, device.type) \
        else contextlib.nullcontext()


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then constant, linear or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def micro_batch_plan(n_forget: int, n_retain: int, config: UnlearnConfig,
                     world_size: int = 1) -> list[tuple[list[int], list[int]]]:
    """Seeded ``(forget indices, retain indices)`` per global micro-batch of ``batch_size · world_size`` samples: an
    epoch is one shuffled pass over the forget set; retain samples come from shuffled passes over the retain set, as
    many as forget samples in each pair. Every rank builds the same plan and takes its share (:func:`rank_share`)."""
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = config.batch_size * world_size
    per_epoch = math.ceil(n_forget / batch_size)
    total = max(1, round(config.epochs * per_epoch))
    plan, retain_queue = [], []
    while len(plan) < total:
        order = torch.randperm(n_forget, generator=generator).tolist()
        for start in range(0, n_forget, batch_size):
            forget_indices = order[start:start + batch_size]
            while len(retain_queue) < len(forget_indices):
                retain_queue += torch.randperm(n_retain, generator=generator).tolist()
            retain_indices, retain_queue = retain_queue[:len(forget_indices)], retain_queue[len(forget_indices):]
            plan.append((forget_indices, retain_indices))
    return plan[:total]


def answer_token_counts(samples: list[dict], shifted: bool = True) -> list[int]:
    """Answer tokens per sample that a loss counts: those of ``labels[1:]`` for next-token prediction."""
    return [sum(label != IGNORE_INDEX for label in sample["labels"][1 if shifted else 0:]) for sample in samples]


def check_answer_tokens(plan: list[tuple[list[int], list[int]]], forget_counts: list[int],
                        retain_counts: list[int]) -> None:
    """Refuse a plan with a micro-batch that has no answer token to learn from: its loss would be a silent 0 (or NaN),
    typically because ``max_length`` truncated the answers away."""
    for name, counts, side in (("forget", forget_counts, 0), ("retain", retain_counts, 1)):
        for batch_index, pair in enumerate(plan):
            if not any(counts[i] for i in pair[side]):
                raise ValueError(f"{name} micro-batch {batch_index} (samples {pair[side]}) has no answer token: the "
                                 f"answers are all truncated or masked; raise max_length or drop those samples")


def data_parallel_position() -> tuple[int, int]:
    """``(rank, world size)`` of this process in the default ``torch.distributed`` group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(indices: list[int], rank: int, world_size: int) -> tuple[list[int], bool]:
    """This rank's samples of a global micro-batch (every ``world_size``-th, so the ranks never overlap) and whether
    they count. A rank left without samples (a short last batch) runs one stand-in sample with weight 0, so that every
    rank still takes part in the forward and backward that DDP and FSDP synchronise."""
    share = indices[rank::world_size]
    return (share, True) if share else (indices[:1], False)


def is_main_process() -> bool:
    return data_parallel_position()[0] == 0


def plan_signature(n_forget: int, n_retain: int, config: UnlearnConfig, world_size: int) -> dict:
    """What fixes the seeded data order: a checkpoint only resumes a run with the same signature."""
    return {"n_forget": n_forget, "n_retain": n_retain, "seed": config.seed, "batch_size": config.batch_size,
            "grad_accum_steps": config.grad_accum_steps, "epochs": config.epochs, "world_size": world_size}


def save_checkpoint(path: Path, model, optimizer, scheduler, primal_dual: PrimalDual, step: int, signature: dict,
                    log_window: dict, initial_retain_loss: float | None) -> None:
    """Everything the loop needs to continue after optimizer step ``step`` as if never stopped. Every rank calls it
    (gathering FSDP shards is a collective); rank 0 writes, to a temporary file first, so a crash mid-write leaves
    no truncated checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Unsharded states keyed by parameter name, alike for plain, DDP and FSDP2 models.
    model_state, optimizer_state = get_state_dict(causal_lm(model), optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return
    state = {"model": model_state, "optimizer": optimizer_state,
             "scheduler": scheduler.state_dict(), "primal_dual": primal_dual.state_dict(), "step": step,
             "signature": signature, "log_window": log_window, "initial_retain_loss": initial_retain_loss,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str, model, optimizer, scheduler, primal_dual: PrimalDual, signature: dict) -> dict:
    """Restore a :func:`save_checkpoint` state in place on every rank; returns it for the step and the log window."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["signature"] != signature:
        raise ValueError(f"checkpoint {path} was written for a different data order: {state['signature']} "
                         f"!= {signature}")
    set_state_dict(causal_lm(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    primal_dual.load_state_dict(state["primal_dual"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def open_log(path: str | None, resumed_step: int):
    """The JSONL log, fresh for a new run; on resume, keeping only the lines up to the checkpoint's step, so lines
    logged after it by the interrupted run are not duplicated."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resumed_step and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
    log_file = open(path, "w")
    log_file.writelines(line + "\n" for line in kept)
    return log_file


def check_not_empty(forget_data: list[dict], retain_data: list[dict]) -> None:
    if not forget_data or not retain_data:
        empty = "forget set is empty: nothing to unlearn" if not forget_data else "retain set is empty: no constraint"
        raise ValueError(f"need forget and retain samples, got {len(forget_data)} and {len(retain_data)}: the {empty}")


def constraint_bound(model, retain_data: list[dict], config: UnlearnConfig,
                     pad_token_id: int) -> tuple[float, float | None]:
    """``(ε, L_rtn(θ₀))``: ``config.epsilon``, or ``(1 + α)·L_rtn(θ₀)`` measured now when ``epsilon_alpha`` is set
    (not on resume, where θ₀ is gone and ε comes from the checkpoint)."""
    if config.epsilon_alpha is None or config.resume_from:
        return config.epsilon, None
    model.eval()
    initial_retain_loss = dataset_loss(model, retain_data, pad_token_id, impl=config.impl)
    return relative_epsilon(initial_retain_loss, config.epsilon_alpha), initial_retain_loss


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` while the block runs (the fused losses then avoid their atomic
    paths), with the cuBLAS workspace setting it needs on CUDA; the previous setting is restored after."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def unlearn(model, forget_data: list[dict], retain_data: list[dict], config: UnlearnConfig = UnlearnConfig(),
            pad_token_id: int = 0) -> UnlearnResult:
    """Unlearn ``forget_data`` while keeping the retain loss on ``retain_data`` at most ε (PDU).

    ``forget_data``/``retain_data`` are tokenised samples ``{"input_ids", "labels"}`` (see :mod:`ceu.data`); the
    model is any Hugging Face causal LM (or a PEFT model: only trainable parameters are optimised). Returns ε, the
    final λ, whether the last step met the constraint and the :class:`PrimalDual` state. Writes a JSONL line per
    ``log_every`` optimizer steps to ``log_path``, a checkpoint per ``checkpoint_every`` steps to ``checkpoint_dir``,
    and continues from ``resume_from`` when set.

    Data parallel (``torchrun``, a DDP- or FSDP2-wrapped model): pass the same full data on every rank. Each global
    micro-batch holds ``batch_size · world size`` forget samples, every rank takes its own share, and the losses are
    the global micro-batch's token-means, so the run matches one process with ``batch_size · world size``.
    """
    check_not_empty(forget_data, retain_data)
    with deterministic_algorithms(config.deterministic):
        return _unlearn(model, forget_data, retain_data, config, pad_token_id)


def _unlearn(model, forget_data: list[dict], retain_data: list[dict], config: UnlearnConfig,
             pad_token_id: int) -> UnlearnResult:
    device = next(model.parameters()).device
    rank, world_size = data_parallel_position()
    if not config.resume_from:  # dropout draws from here; a resumed run restores the RNG states instead
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    # Data: global micro-batch pairs, grouped into optimizer steps; this rank's share is picked in the loop.
    plan = micro_batch_plan(len(forget_data), len(retain_data), config, world_size)
    forget_counts = answer_token_counts(forget_data, shifted=config.forget_mask == "shifted")
    retain_counts = answer_token_counts(retain_data)
    check_answer_tokens(plan, forget_counts, retain_counts)
    windows = [plan[i:i + config.grad_accum_steps] for i in range(0, len(plan), config.grad_accum_steps)]
    steps_per_epoch = math.ceil(math.ceil(len(forget_data) / (config.batch_size * world_size))
                                / config.grad_accum_steps)

    # The constraint and its dual variable (a resumed run takes ε from its checkpoint: θ₀ is gone).
    epsilon, initial_retain_loss = constraint_bound(model, retain_data, config, pad_token_id)
    primal_dual = PrimalDual(config.lambda_init, config.dual_lr, epsilon,
                             warmup_steps=round(config.dual_warmup_epochs * steps_per_epoch),
                             forget_weight=config.forget_weight, update_every=config.dual_update)

    # Optimizer and LR schedule over the trainable parameters only (a frozen head gets no dW).
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = round(config.lr_warmup_ratio * len(windows))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, len(windows), warmup_steps, config.lr_schedule))

    # Resume: weights, optimizer, schedule, λ, RNG and the position in the seeded plan.
    signature = plan_signature(len(forget_data), len(retain_data), config, world_size)
    start_step = 0
    forget_sum = retain_sum = torch.zeros((), device=device)
    logged_micro_batches, logged_tokens = 0, 0
    if config.resume_from:
        state = load_checkpoint(config.resume_from, model, optimizer, scheduler, primal_dual, signature)
        start_step, epsilon = state["step"], primal_dual.epsilon
        initial_retain_loss = state["initial_retain_loss"]
        forget_sum = state["log_window"]["forget_sum"].to(device)
        retain_sum = state["log_window"]["retain_sum"].to(device)
        logged_micro_batches = state["log_window"]["micro_batches"]
        logged_tokens = state["log_window"]["tokens"]

    log_file = open_log(config.log_path, start_step) if rank == 0 else None
    model.train()
    last_log_time = time.perf_counter()
    bar = tqdm(range(start_step, len(windows)), initial=start_step, total=len(windows), desc="unlearn",
               disable=not config.progress or rank != 0, dynamic_ncols=True)
    for step in bar:
        window = windows[step]
        for forget_indices, retain_indices in window:
            forget_share, counts = rank_share(forget_indices, rank, world_size)
            retain_share, _ = rank_share(retain_indices, rank, world_size)
            token_scales = (world_size / sum(forget_counts[i] for i in forget_indices) if counts else 0.0,
                            world_size / sum(retain_counts[i] for i in retain_indices) if counts else 0.0)
            forget = pad_batch([forget_data[i] for i in forget_share], pad_token_id)
            retain = pad_batch([retain_data[i] for i in retain_share], pad_token_id)
            logged_tokens += int(forget["attention_mask"].sum() + retain["attention_mask"].sum()) if counts else 0
            forget = {k: v.to(device, non_blocking=True) for k, v in forget.items()}
            retain = {k: v.to(device, non_blocking=True) for k, v in retain.items()}
            with autocast_context(config, device):
                forget_loss, retain_loss = pdu_losses(model, forget, retain, config, token_scales)
                loss = primal_dual.lagrangian(forget_loss, retain_loss)
            (loss / len(window)).backward()
            primal_dual.observe(retain_loss)
            forget_sum = forget_sum + forget_loss.detach().float()
            retain_sum = retain_sum + retain_loss.detach().float()
            logged_micro_batches += 1
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        primal_dual.step()

        if (step + 1) % config.log_every == 0 or step + 1 == len(windows):
            now = time.perf_counter()
            window_totals = torch.stack([forget_sum, retain_sum, torch.tensor(float(logged_tokens), device=device)])
            forget_total, retain_total, tokens = distributed_mean(window_totals).tolist()  # means over the ranks
            forget_mean, retain_mean = forget_total / logged_micro_batches, retain_total / logged_micro_batches
            record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                      "forget_loss": forget_mean, "retain_loss": retain_mean,
                      "lambda": primal_dual.lam.item(), "epsilon": epsilon, "slack": retain_mean - epsilon,
                      "lr": lr, "tokens_per_s": tokens * world_size / max(now - last_log_time, 1e-9),
                      "dual_warmup": primal_dual.held_last_step}
            bar.set_postfix(fgt=f"{forget_mean:.3g}", rtn=f"{retain_mean:.3g}", lam=f"{record['lambda']:.3g}")
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            forget_sum = retain_sum = torch.zeros((), device=device)
            logged_micro_batches, logged_tokens, last_log_time = 0, 0, now

        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            forget_rank_mean, retain_rank_mean = distributed_mean(torch.stack([forget_sum, retain_sum])).cpu()
            log_window = {"forget_sum": forget_rank_mean, "retain_sum": retain_rank_mean,
                          "micro_batches": logged_micro_batches, "tokens": logged_tokens}
            save_checkpoint(Path(config.checkpoint_dir) / f"step-{step + 1:06d}.pt", model, optimizer, scheduler,
                            primal_dual, step + 1, signature, log_window, initial_retain_loss)
    if log_file:
        log_file.close()
    model.eval()
    return UnlearnResult.of(primal_dual, len(windows), initial_retain_loss)
