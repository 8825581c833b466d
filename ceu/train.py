"""The unlearning loop: primal-dual unlearning (PDU) with the fused LM-head losses.

``unlearn(model, forget_data, retain_data, config)`` pairs each forget micro-batch with a retain micro-batch, takes the
final hidden states of the model and computes the LMF forget loss and the retain cross-entropy with the fused
functions on the LM-head weight (no ``[tokens, V]`` logits), minimises the Lagrangian with AdamW and updates λ once
per optimizer step (:class:`ceu.primal_dual.PrimalDual`). Read top to bottom: data and schedule, constraint, optimizer,
resume, loop, log, checkpoint. The schedule (optimizer steps, LR, dual warm-up, weight-decay groups) is
:mod:`ceu.schedule`'s, the one :class:`ceu.hf.PrimalDualTrainer` runs too; the model access and the losses are
:mod:`ceu.heads`', the checkpoints :mod:`ceu.checkpoint`'s, the data-parallel helpers :mod:`ceu.distributed`'s.
"""
import contextlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ceu.checkpoint import load_checkpoint, plan_signature, save_checkpoint
from ceu.config import CHOICES, LR_SCHEDULES, UnlearnConfig
from ceu.data import answer_token_counts, check_answer_tokens, check_not_empty, pad_batch
from ceu.distributed import data_parallel_position, distributed_mean, gradient_sync, is_main_process, rank_share
from ceu.heads import (answer_token_losses, causal_lm, dataset_loss, final_hidden_states, forget_answer_mask,
                       global_token_scales, head_parameters, is_dtensor, lm_head, pdu_losses,
                       enable_gradient_checkpointing)
from ceu.methods import Objective
from ceu.primal_dual import PrimalDual, relative_epsilon
from ceu.runlog import log_record, open_log, write_record
from ceu.schedule import lr_factor, micro_batch_plan, parameter_groups, training_schedule

# Names that lived here before the split, importable from here as before.
__all__ = ["unlearn", "UnlearnResult", "UnlearnConfig", "CHOICES", "LR_SCHEDULES", "constraint_bound",
           "deterministic_algorithms", "uses_bf16", "autocast_context",
           "causal_lm", "lm_head", "final_hidden_states", "is_dtensor", "head_parameters", "answer_token_losses",
           "forget_answer_mask", "global_token_scales", "pdu_losses", "dataset_loss",
           "answer_token_counts", "check_answer_tokens", "check_not_empty",
           "data_parallel_position", "is_main_process", "rank_share",
           "plan_signature", "save_checkpoint", "load_checkpoint", "open_log", "lr_factor", "micro_batch_plan"]


@dataclass
class UnlearnResult:
    epsilon: float
    final_lambda: float
    steps: int
    initial_retain_loss: float | None
    primal_dual: PrimalDual
    final_retain_loss: float | None = None  # mean retain loss of the last optimizer step's micro-batches
    # final_retain_loss <= epsilon: measured on the last step's micro-batches only; the `ceu unlearn` command's
    # checks.retain_loss_within_epsilon measures the whole retain set after the run
    last_step_within_epsilon: bool | None = None

    @classmethod
    def of(cls, primal_dual: PrimalDual, steps: int, initial_retain_loss: float | None) -> "UnlearnResult":
        """The result of a run whose dual state ended as ``primal_dual``."""
        last = primal_dual.last_retain_loss
        final_retain_loss = None if last is None else last.item()
        return cls(primal_dual.epsilon, primal_dual.lam.item(), steps, initial_retain_loss, primal_dual,
                   final_retain_loss, None if final_retain_loss is None else final_retain_loss <= primal_dual.epsilon)


def uses_bf16(config: UnlearnConfig, device_type: str) -> bool:
    """bf16 mixed precision on GPUs that support it (``"auto"``), everywhere for ``"bf16"``, never for ``"no"``."""
    return config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and device_type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_context(config: UnlearnConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(config, device.type) \
        else contextlib.nullcontext()


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


def unlearn(model, forget_data: list[dict], retain_data: list[dict], config: UnlearnConfig | None = None,
            pad_token_id: int = 0) -> UnlearnResult:
    """Unlearn ``forget_data`` while keeping the retain loss on ``retain_data`` at most ε (PDU).

    ``forget_data``/``retain_data`` are tokenised samples ``{"input_ids", "labels"}`` (see :mod:`ceu.data`); the
    model is any Hugging Face causal LM (or a PEFT model: only trainable parameters are optimised). ``config``
    defaults to ``UnlearnConfig()``. Returns ε, the final λ, whether the last step met the constraint and the
    :class:`PrimalDual` state. Writes a JSONL line per ``log_every`` optimizer steps to ``log_path``, a checkpoint per
    ``checkpoint_every`` steps to ``checkpoint_dir``, and continues from ``resume_from`` when set.

    Data parallel (``torchrun``, a DDP- or FSDP2-wrapped model): pass the same full data on every rank. Each global
    micro-batch holds ``batch_size · world size`` forget samples, every rank takes its own share, and the losses are
    the global micro-batch's token-means, so the run matches one process with ``batch_size · world size``. Gradients
    are reduced once per optimizer step, on the last micro-batch of its window.
    """
    config = config if config is not None else UnlearnConfig()
    check_answer_tokens(forget_data, retain_data, forget_shifted=config.forget_mask == "shifted")
    with deterministic_algorithms(config.deterministic):
        return _unlearn(model, forget_data, retain_data, config, pad_token_id)


def _unlearn(model, forget_data: list[dict], retain_data: list[dict], config: UnlearnConfig,
             pad_token_id: int) -> UnlearnResult:
    device = next(model.parameters()).device
    rank, world_size = data_parallel_position()
    if not config.resume_from:  # dropout draws from here; a resumed run restores the RNG states instead
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    # Data and schedule: global micro-batch pairs, grouped per epoch into optimizer steps (ceu.schedule); this rank's
    # share is picked in the loop.
    schedule = training_schedule(len(forget_data), config, world_size)
    plan = micro_batch_plan(len(forget_data), len(retain_data), config, world_size)  # lazy: drawn step by step
    forget_counts = answer_token_counts(forget_data, shifted=config.forget_mask == "shifted")
    retain_counts = answer_token_counts(retain_data)

    # The constraint and its dual variable (a resumed run takes ε from its checkpoint: θ₀ is gone).
    epsilon, initial_retain_loss = constraint_bound(model, retain_data, config, pad_token_id)
    # The method's losses (ceu.methods; NPO and the KL retain loss measure the starting model here) and λ.
    objective = Objective(model, forget_data, config)
    primal_dual = objective.primal_dual(epsilon, schedule.dual_warmup_steps)

    # AdamW over the trainable parameters, biases and norm weights without decay, and the LR schedule.
    groups = parameter_groups(model, config.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_factor(step))

    # Resume: weights, optimizer, schedule, λ, RNG and the position in the seeded plan.
    signature = plan_signature(len(forget_data), len(retain_data), config, world_size)
    start_step = 0
    forget_sum = retain_sum = torch.zeros((), device=device)
    logged_micro_batches, logged_tokens = 0, 0
    if config.resume_from:
        state = load_checkpoint(config.resume_from, model, optimizer, scheduler, primal_dual, signature, config)
        start_step, epsilon = state["step"], primal_dual.epsilon
        initial_retain_loss = state["initial_retain_loss"]
        forget_sum = state["log_window"]["forget_sum"].to(device)
        retain_sum = state["log_window"]["retain_sum"].to(device)
        logged_micro_batches = state["log_window"]["micro_batches"]
        logged_tokens = state["log_window"]["tokens"]

    log_file = open_log(config.log_path, start_step) if rank == 0 else None
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    last_log_time = time.perf_counter()
    bar = tqdm(plan.optimizer_steps(start_step), initial=start_step, total=schedule.total_steps, desc="unlearn",
               disable=not config.progress or rank != 0, dynamic_ncols=True)
    for step, window in enumerate(bar, start_step):
        for position, (forget_indices, retain_indices) in enumerate(window):
            forget_share, counts = rank_share(forget_indices, rank, world_size)
            retain_share, _ = rank_share(retain_indices, rank, world_size)
            token_scales = (world_size / sum(forget_counts[i] for i in forget_indices) if counts else 0.0,
                            world_size / sum(retain_counts[i] for i in retain_indices) if counts else 0.0)
            forget = pad_batch([forget_data[i] for i in forget_share], pad_token_id)
            retain = pad_batch([retain_data[i] for i in retain_share], pad_token_id)
            logged_tokens += int(forget["attention_mask"].sum() + retain["attention_mask"].sum()) if counts else 0
            forget = {k: v.to(device, non_blocking=True) for k, v in forget.items()}
            retain = {k: v.to(device, non_blocking=True) for k, v in retain.items()}
            # DDP/FSDP reduce the gradients once, in the backward of the window's last micro-batch.
            with gradient_sync(model, position == len(window) - 1):
                with autocast_context(config, device):
                    forget_loss, retain_loss = objective.losses(model, forget, retain, token_scales,
                                                                world_size / len(forget_indices) if counts else 0.0)
                    loss = primal_dual.lagrangian(forget_loss, retain_loss)
                (loss / len(window)).backward()
            if not config.dual_update_per_epoch:
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
        if config.dual_update_per_epoch and (step + 1) % schedule.steps_per_epoch == 0:  # the epoch's end
            primal_dual.observe(torch.tensor(objective.retain_set_loss(model, retain_data, pad_token_id), device=device))
        primal_dual.step()

        if (step + 1) % config.log_every == 0 or step + 1 == schedule.total_steps:
            now = time.perf_counter()
            window_totals = torch.stack([forget_sum, retain_sum, torch.tensor(float(logged_tokens), device=device)])
            forget_total, retain_total, tokens = distributed_mean(window_totals).tolist()  # means over the ranks
            forget_mean, retain_mean = forget_total / logged_micro_batches, retain_total / logged_micro_batches
            record = log_record(step + 1, schedule.epoch(step + 1), forget_mean, retain_mean, primal_dual.lam.item(),
                                epsilon, lr, primal_dual.held_last_step,
                                tokens_per_s=tokens * world_size / max(now - last_log_time, 1e-9))
            bar.set_postfix(fgt=f"{forget_mean:.3g}", rtn=f"{retain_mean:.3g}", lam=f"{record['lambda']:.3g}")
            write_record(log_file, record)
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
    return UnlearnResult.of(primal_dual, schedule.total_steps, initial_retain_loss)
