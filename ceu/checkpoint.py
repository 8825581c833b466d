"""Checkpoints of :func:`ceu.unlearn`: everything the loop needs to continue after an optimizer step as if never
stopped (weights, optimizer, LR schedule, λ, RNG states, the open log window), and the signature of the seeded data
order a checkpoint may resume. (:class:`ceu.hf.PrimalDualTrainer` uses Trainer's checkpoints plus λ.)"""
import os
import random
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ceu.config import UnlearnConfig
from ceu.distributed import is_main_process
from ceu.heads import causal_lm
from ceu.primal_dual import PrimalDual


def plan_signature(n_forget: int, n_retain: int, config: UnlearnConfig, world_size: int) -> dict:
    """What fixes the seeded data order: a checkpoint only resumes a run with the same signature. ``windows`` names the
    accumulation rule (:mod:`ceu.schedule`), so a checkpoint of the earlier epoch-straddling windows is refused."""
    return {"windows": "per-epoch", "n_forget": n_forget, "n_retain": n_retain, "seed": config.seed, "batch_size": config.batch_size,
            "grad_accum_steps": config.grad_accum_steps, "epochs": config.epochs, "world_size": world_size}


def save_checkpoint(path: Path, model, optimizer, scheduler, primal_dual: PrimalDual, step: int, signature: dict,
                    log_window: dict, initial_retain_loss: float | None) -> None:
    """Everything the loop needs to continue after optimizer step ``step`` as if never stopped. Every rank calls it
    (gathering FSDP shards is a collective); rank 0 writes, to a temporary file first, so a crash mid-write leaves
    no truncated checkpoint."""
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
