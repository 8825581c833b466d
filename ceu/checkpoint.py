"""Checkpoints of :func:`ceu.unlearn`: everything the loop needs to continue after an optimizer step as if never
stopped (weights, optimizer, LR schedule, λ, RNG states, the open log window), and the signature of the seeded data
order a checkpoint may resume. (:class:`ceu.hf.PrimalDualTrainer` uses Trainer's checkpoints plus λ.)"""
import os
import random
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ceu.config import CHANGEABLE_ON_RESUME, UnlearnConfig
from ceu.distributed import is_main_process
from ceu.files import replacing
from ceu.heads import causal_lm
from ceu.primal_dual import PrimalDual


FORMAT = "ceu.unlearn checkpoint"


def plan_signature(n_forget: int, n_retain: int, config: UnlearnConfig, world_size: int) -> dict:
    """What a checkpoint may only be resumed with: the data sizes and ranks that fix the seeded data order, and every
    setting of ``config`` that changes what the run computes (all fields but
    :data:`ceu.config.CHANGEABLE_ON_RESUME`). ``windows`` names the accumulation rule (:mod:`ceu.schedule`), so a
    checkpoint of the earlier epoch-straddling windows is refused."""
    return {"windows": "per-epoch", "n_forget": n_forget, "n_retain": n_retain, "world_size": world_size,
            "settings": run_settings(config)}


def run_settings(config: UnlearnConfig) -> dict:
    return {name: value for name, value in asdict(config).items() if name not in CHANGEABLE_ON_RESUME}


def save_checkpoint(path: Path, model, optimizer, scheduler, primal_dual: PrimalDual, step: int, signature: dict,
                    log_window: dict, initial_retain_loss: float | None) -> None:
    """Everything the loop needs to continue after optimizer step ``step`` as if never stopped. Every rank calls it
    (gathering FSDP shards is a collective); rank 0 writes, atomically (:func:`ceu.files.replacing`): a crash or a
    full disk mid-write leaves the previous checkpoints and no temporary file."""
    # Unsharded states keyed by parameter name, alike for plain, DDP and FSDP2 models.
    model_state, optimizer_state = get_state_dict(causal_lm(model), optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_process():
        return
    state = {"format": FORMAT, "model": model_state, "optimizer": optimizer_state,
             "scheduler": scheduler.state_dict(), "primal_dual": primal_dual.state_dict(), "step": step,
             "signature": signature, "log_window": log_window, "initial_retain_loss": initial_retain_loss,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    with replacing(path) as temporary:
        torch.save(state, temporary)


def read_checkpoint(path: str | os.PathLike, config: UnlearnConfig, mmap: bool = False) -> dict:
    """The checkpoint at ``path``, refused with a message naming the file when it is missing, empty, truncated, not a
    ceu checkpoint, or written with settings that differ from ``config`` (each differing field named, with both
    values). ``mmap=True`` maps the tensors instead of reading them: the CLI's check before it loads any model.
    Loaded with ``weights_only=True``: a foreign file cannot run code."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; ceu's loop resumes from a checkpoint file "
                         "(<checkpoint_dir>/step-NNNNNN.pt; Trainer's checkpoint-N/ folders are for --trainer hf)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (a checkpoint whose write was interrupted?)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path} is not a checkpoint: truncated (its write was interrupted?) or another "
                         "kind of file (torch.save writes a zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise ValueError(f"checkpoint {path} is unreadable (damaged, or holds objects a checkpoint does not): "
                         f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a ceu.unlearn checkpoint (those are the step-NNNNNN.pt files "
                         "that checkpoint_every writes; ones written before ceu recorded the run's settings in them "
                         "cannot be checked, and are refused too)")
    differing = [f"{name} {theirs!r} (checkpoint) != {ours!r} (now)"
                 for name, (theirs, ours) in _pairs(state["signature"]["settings"], run_settings(config)).items()
                 if theirs != ours]
    if differing:
        raise ValueError(f"checkpoint {path} was written with other settings: {'; '.join(differing)}. A resumed "
                         "run continues the same run: use the checkpoint's settings, or start a new run")
    return state


def _pairs(theirs: dict, ours: dict) -> dict:
    return {name: (theirs.get(name, "absent"), ours.get(name, "absent")) for name in {**theirs, **ours}}


def load_checkpoint(path: str, model, optimizer, scheduler, primal_dual: PrimalDual, signature: dict,
                    config: UnlearnConfig) -> dict:
    """Restore a :func:`save_checkpoint` state in place on every rank (checked by :func:`read_checkpoint`, then
    against this run's data sizes and ranks); returns it for the step and the log window."""
    state = read_checkpoint(path, config)
    plan = {key: value for key, value in signature.items() if key != "settings"}
    theirs = {key: value for key, value in state["signature"].items() if key != "settings"}
    if theirs != plan:
        raise ValueError(f"checkpoint {path} was written for a different data order: {theirs} != {plan}")
    set_state_dict(causal_lm(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    primal_dual.load_state_dict(state["primal_dual"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
