"""A disk cache of the evaluations every ``ceu unlearn`` run repeats: the TOFU evaluation log and retain loss of the
learned model (before unlearning) and of the retain-only (gold) model, the same from run to run and most of a small
run's wall time.

An entry is keyed by a hash of everything its numbers depend on: the model's weights (every tensor's bytes, so a
retrained or edited model misses whatever its files are called or dated: a stale hit would be a wrong result), its
class, config and generation config; the tokenizer (its rules and vocabulary, special tokens, chat template); the
prompt template (chat template, system prompt); the eval sets' records; the tokenised retain samples (so
``--max-length`` too); the loss backend, device type, torch and transformers versions; and :data:`VERSION`, bumped
whenever ceu's evaluation changes what it measures. Entries live in ``<cache root>/evals/<key>.json``
(:func:`ceu.files.cache_root`), written atomically (:func:`ceu.files.write_text`).

Hashing reads every weight, so :func:`lookup` does it once per run and where the model was loaded: before it is moved
to the device it will be measured on (no device-to-host copy, and none at all on a hit), and under
``torch.distributed`` on rank 0 only, which sends the key and the entry to the other ranks.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ceu.files import cache_root, write_text

VERSION = 1  # bump when ceu.eval.evaluate_model or ceu.heads.dataset_loss changes what they return


def cache_key(model, tokenizer, template, eval_sets: dict | None, retain_samples: list[dict], impl: str,
              device: str | torch.device | None = None) -> str:
    """The hex digest naming ``model``'s evaluation on ``device`` (default: where its weights are) on these sets
    with these settings (see the module docstring). Reads every weight: a model on an accelerator is copied to the
    host, so hash it before moving it there (:func:`lookup`)."""
    import transformers

    device = next(model.parameters()).device if device is None else torch.device(device)

    config = {key: value for key, value in model.config.to_dict().items() if key != "_name_or_path"}
    generation = getattr(model, "generation_config", None)
    settings = {"version": VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
                "impl": impl, "device": device.type, "class": type(model).__name__,
                "config": config, "generation": generation.to_dict() if generation is not None else None,
                "tokenizer": _tokenizer_state(tokenizer), "template": dataclasses.asdict(template),
                "eval_sets": None if eval_sets is None else
                {name: [role, [dict(record) for record in records]] for name, (role, records) in eval_sets.items()},
                "retain_samples": retain_samples}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    hashed = {}  # a tensor seen under another name (tied embeddings): its bytes once, then that name
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        same = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if same in hashed:
            digest.update(f"same as {hashed[same]}".encode())
            continue
        hashed[same] = name
        digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _tokenizer_state(tokenizer) -> dict:
    """What decides how the tokenizer encodes and decodes: a fast tokenizer's full serialisation (model, vocabulary,
    normaliser, pre-tokeniser, decoder, added tokens), else its vocabulary; its special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {"class": type(tokenizer).__name__,
            "rules": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
            "special": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
            "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
            "chat_template": getattr(tokenizer, "chat_template", None)}


def lookup(model, tokenizer, template, eval_sets: dict | None, retain_samples: list[dict], impl: str,
           device: str | torch.device | None = None) -> tuple[str, tuple[dict | None, float] | None]:
    """``(key, entry)``: the :func:`cache_key` of ``model``'s evaluation on ``device`` and what :func:`read` finds
    under it. Pass the model as loaded and the device it will be measured on: it is hashed where it is and neither
    moved nor copied (on a hit it need never go to the device). Under ``torch.distributed`` rank 0 alone hashes and
    reads, then broadcasts both, so every rank gets the same key and takes the same branch (hit or measure); only
    rank 0 should :func:`write`. Every rank of the default group must call it."""
    import torch.distributed as dist

    from ceu.distributed import data_parallel_position

    rank, world_size = data_parallel_position()
    found = [None, None]
    if rank == 0:
        key = cache_key(model, tokenizer, template, eval_sets, retain_samples, impl, device)
        found = [key, read(key)]
    if world_size > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0], found[1]


def entry_path(key: str) -> Path:
    return cache_root() / "evals" / f"{key}.json"


def read(key: str) -> tuple[dict | None, float] | None:
    """``(evaluation log or None, retain loss)`` cached under ``key``; None when there is none, or when the entry is
    unreadable (edited by hand: entries are written atomically), so that it is measured again and rewritten."""
    try:
        entry = json.loads(entry_path(key).read_text())
        return entry["log"], float(entry["retain_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(key: str, log: dict | None, retain_loss: float) -> None:
    write_text(entry_path(key), json.dumps({"log": log, "retain_loss": retain_loss}))
