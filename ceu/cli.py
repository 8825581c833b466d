"""``ceu``: command-line entry point. ``ceu unlearn`` with no argument runs the embedded default end to end."""
import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

from ceu.config import CHOICES, METHOD, REFERENCE, TRAINING, ConfigError, UnlearnConfig, check_field, config_fields

DESCRIPTION = """\
Constrained entropic unlearning: make a language model forget a set of facts (flatten its logits on the forget set)
while its loss on a retain set stays below a bound epsilon, by primal-dual optimisation. Losses are computed on the
LM head without materialising the logits.

  ceu unlearn            the embedded default, no download: build a fictitious-author QA set (TOFU format), train a
                         small Llama on it and a gold model without the forget set (cached), unlearn forget10,
                         evaluate with TOFU's metrics, print a before/after table, write results to runs/unlearn/
  ceu unlearn --model PATH --data locuslab/TOFU --forget-split forget10 --retain-split retain90
                         the same job on a Hugging Face causal LM and TOFU (hub name, or a folder of <split>.json)
  ceu eval --tofu-log MODEL.json --retain-log RETAIN.json
                         TOFU's model utility and forget quality from TOFU-format evaluation logs
  ceu finetune --model PATH --data DATA --split full --output-dir LEARNED
                         fine-tune a causal LM on a QA set's answers (the "learned" model TOFU unlearns from; with
                         --split retain90, its gold retain model), saved with its tokenizer as a model folder
  ceu export-synthetic --output-dir DATA
                         write the embedded default's synthetic QA set as a TOFU-format --data folder
  torchrun --nproc_per_node 8 -m ceu unlearn --model PATH [--parallel fsdp] ...
                         data parallel over 8 GPUs (DDP, or FSDP2 for models too large to replicate)
  accelerate launch --multi_gpu --num_processes 8 -m ceu unlearn --trainer hf --model PATH ...
                         the same with transformers.Trainer under accelerate

Before training, ceu unlearn prints its plan and warns when too few optimizer steps follow the dual warm-up for lambda
to move. It caches the evaluations of the learned and retain-only models, keyed by their weights, the data and the
settings (--no-eval-cache measures them again); the unlearned model is always measured.
"""

# Settings of the embedded default (a ~0.4M-parameter model learns much faster than a 7B one). The forget weight and
# λ₀ are the choice of a documented sweep (`python -m benchmarks unlearning --sweep`, README "PDU against the
# baselines"), which started from forget weight 1 and λ₀ 100.
EMBEDDED = dict(epochs=30.0, lr=2e-4, batch_size=8, lambda_init=300.0, dual_lr=20.0, epsilon=0.02,
                dual_warmup_epochs=2.0, forget_weight=0.3)
GROUP_TITLES = {METHOD: "method (defaults: the PDU authors' TOFU settings; the embedded default uses its own)",
                TRAINING: "training",
                REFERENCE: "reproduce the reference implementation's behaviour (open-unlearning)"}
# The data options' defaults with --model; without it they are refused, as are the others only a --model run reads.
DATA_DEFAULTS = {"data": "locuslab/TOFU", "forget_split": "forget10", "retain_split": "retain90"}
NEEDS_MODEL = ("tokenizer", "retain_model", "data", "forget_split", "retain_split", "text", "chat_template",
               "system_prompt")
# What `ceu unlearn` writes in --output-dir: what --overwrite deletes first.
OUTPUTS = ("results.json", "log.jsonl", "training.png", "eval_log_learned.json", "eval_log_unlearned.json",
           "eval_log_retain_model.json", "model", "trainer")
COMMANDS = ("unlearn", "eval", "finetune", "export-synthetic")
# `ceu finetune`'s training options: TOFU's fine-tuning settings for its 7B models (5 epochs, LR 1e-5, 16 samples per
# step), with ceu.finetune.fit's schedule; the split is TOFU's whole set, as TOFU fine-tunes before unlearning.
FINETUNE = dict(epochs=5, lr=1e-5, batch_size=16)
FINETUNE_SPLIT = "full"
# Fewer optimizer steps than this after the dual warm-up and `ceu unlearn` warns before training: λ gets too few
# updates to find the weight that holds the retain loss at ε. The PDU authors' TOFU settings (10 epochs, batch 4, λ
# held for 5) on a forget set of one micro-batch make 10 steps, 5 of them with λ moving.
MIN_DUAL_STEPS = 20
TOFU_EVAL_SPLITS = {"retain": ("retain", "retain_perturbed"), "real_authors": ("held", "real_authors_perturbed"),
                    "world_facts": ("held", "world_facts_perturbed")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ceu", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    unlearn = commands.add_parser("unlearn", help="unlearn a forget set under a retain-loss bound (default command)",
                                  description="Unlearn a forget set with the primal-dual method. With no argument: "
                                              "the embedded default (see `ceu --help`).")
    _add_data_arguments(unlearn)
    groups = {}
    for group, title in GROUP_TITLES.items():
        groups[group] = unlearn.add_argument_group(title)
        for field in config_fields(group):
            _add_config_option(groups[group], field)
    training = groups[TRAINING]
    training.add_argument("--lora-rank", type=positive_int,
                          help="train LoRA adapters of this rank instead of all weights (default: none, all weights)")
    training.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                          help="under torchrun: replicate the model (ddp, default) or shard it (fsdp: FSDP2)")
    training.add_argument("--trainer", choices=("ceu", "hf"), default="ceu",
                          help="the training loop: ceu's own (default) or transformers.Trainer "
                               "(ceu.hf.PrimalDualTrainer; for accelerate launch, whose config rules the parallelism)")
    unlearn.add_argument("--no-save-model", action="store_true", help="do not save the unlearned model")
    unlearn.add_argument("--no-eval-cache", action="store_true",
                         help="evaluate the learned and retain-only models again instead of reusing their cached "
                              "evaluations (default: off: reuse an evaluation of the same weights on the same data "
                              "with the same settings, from <cache>/evals, $CEU_CACHE or ~/.cache/ceu)")
    unlearn.add_argument("--overwrite", action="store_true",
                         help=f"start afresh in a non-empty --output-dir: the files an earlier run wrote there "
                              f"({', '.join(OUTPUTS)}) and its step-*.pt / checkpoint-* in --checkpoint-dir are "
                              "deleted first (default: off: a "
                              "non-empty --output-dir, or a --checkpoint-dir holding checkpoints, is refused, unless "
                              "--resume-from continues that run)")

    evaluate = commands.add_parser("eval", help="TOFU metrics of a model, or of TOFU-format evaluation logs",
                                   description="Evaluate with TOFU's metrics. With no argument: the embedded "
                                               "default's learned model against its gold retain model.")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--tofu-log", type=Path, help="a TOFU *_eval_log_aggregated.json to score instead of a "
                                                        "model (default: none: evaluate the model)")
    evaluate.add_argument("--retain-log", type=Path, help="the retain-only model's log, for forget quality (default: "
                                                          "none: no forget quality)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an earlier eval.json in --output-dir (refused without it)")

    finetune = commands.add_parser("finetune", help="fine-tune a causal LM on the answers of a QA set",
                                   description="Fine-tune a causal LM on the answers of TOFU-format QA splits "
                                               "(AdamW, one epoch of warm-up, cosine decay, the fused cross-entropy) "
                                               "and save it with its tokenizer in --output-dir, a model folder that "
                                               "`ceu unlearn --model` reads. The defaults are TOFU's fine-tuning "
                                               "settings for its 7B models; a small model wants a larger --lr.")
    model = finetune.add_argument_group("model and data")
    model.add_argument("--model", required=True, help="model to fine-tune: Hugging Face hub name or folder, a GGUF "
                                                      "file, or a folder holding one GGUF file (required, no default)")
    model.add_argument("--data", default=DATA_DEFAULTS["data"],
                       help=f"TOFU-format data: hub name or a folder of <split>.json(l) (default: "
                            f"{DATA_DEFAULTS['data']})")
    model.add_argument("--split", action="append",
                       help=f"split to train on; repeat to train on several together (default: {FINETUNE_SPLIT}, "
                            "TOFU's whole set)")
    _add_tokenizing_arguments(model)
    training = finetune.add_argument_group("training")
    training.add_argument("--epochs", type=config_value("epochs", int), default=FINETUNE["epochs"],
                          help=f"passes over the data (default: {FINETUNE['epochs']})")
    training.add_argument("--lr", type=config_value("lr", float), default=FINETUNE["lr"],
                          help=f"peak learning rate (AdamW, cosine decay after one epoch of warm-up; default: "
                               f"{FINETUNE['lr']:g})")
    training.add_argument("--batch-size", type=config_value("batch_size", int), default=FINETUNE["batch_size"],
                          help=f"samples per optimizer step (default: {FINETUNE['batch_size']})")
    training.add_argument("--seed", type=config_value("seed", int), default=0,
                          help="seed of the data order (default: 0)")
    training.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    finetune.add_argument("--output-dir", type=Path, default=Path("runs") / "finetune",
                          help="the model folder to write (default: runs/finetune)")
    finetune.add_argument("--overwrite", action="store_true",
                          help="replace the model an earlier `ceu finetune` saved in --output-dir (default: off: a "
                               "non-empty --output-dir is refused; one that holds no config.json always is)")
    # What Job reads of `ceu unlearn`'s data options: finetune trains on QA records of its --split(s), no retain model.
    finetune.set_defaults(text=False, forget_split=None, retain_split=None, retain_model=None)

    export = commands.add_parser("export-synthetic", help="write the embedded synthetic QA set as a --data folder",
                                 description="Write the embedded default's fictitious-author QA set (TOFU format: "
                                             "full, forget01/05/10, retain99/95/90, the held sets and the "
                                             "*_perturbed eval splits) as <split>.json files, a folder that "
                                             "`ceu unlearn --data` and `ceu finetune --data` read.")
    export.add_argument("--output-dir", type=Path, required=True, help="the data folder to write (required, no "
                                                                       "default)")
    export.add_argument("--authors", type=int, default=40,
                        help="fictitious authors, 8 questions each (default: 40, the embedded default's)")
    export.add_argument("--seed", type=int, default=0, help="seed of the generated world (default: 0)")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output-dir, replacing its <split>.json files (default: off: "
                             "refused)")
    return parser


def _add_config_option(group, field) -> None:
    """``--field-name`` for an :class:`~ceu.config.UnlearnConfig` field: its type, choices and help from the
    dataclass. The option's default is None, so the config's default (or the embedded default's) applies."""
    option = "--" + field.name.replace("_", "-")
    embedded = f"; embedded default: {EMBEDDED[field.name]}" if field.name in EMBEDDED else ""
    help = field.metadata["help"] + f" (default: {'none' if field.default is None else field.default}{embedded})"
    if field.type is bool:
        group.add_argument(option, action="store_true", default=None, help=help)
        return
    kind = next((t for t in (int, float, str) if field.type is t or t in getattr(field.type, "__args__", ())), str)
    group.add_argument(option, type=kind, choices=CHOICES.get(field.name), help=help)


def _add_data_arguments(parser):
    model = parser.add_argument_group("model and data (default: the embedded synthetic set and tiny Llama)")
    model.add_argument("--model", help="model to unlearn or evaluate: Hugging Face hub name or folder, a GGUF file, "
                                       "or a folder holding one GGUF file (default: none: the embedded default's "
                                       "tiny Llama and synthetic data)")
    model.add_argument("--retain-model", help="model trained without the forget set, for forget quality (default: "
                                              "none: no forget quality; the embedded default has its own)")
    model.add_argument("--data", help=f"TOFU-format data: hub name or a folder of <split>.json(l) (default: "
                                      f"{DATA_DEFAULTS['data']})")
    model.add_argument("--forget-split", help=f"forget split (default: {DATA_DEFAULTS['forget_split']})")
    model.add_argument("--retain-split", help=f"retain split (default: {DATA_DEFAULTS['retain_split']})")
    model.add_argument("--text", action="store_true",
                       help="MUSE-style raw text: the splits hold a 'text' field and every token counts")
    _add_tokenizing_arguments(model)
    model.add_argument("--impl", choices=CHOICES["impl"], default="auto",
                       help="fused-loss backend (default: auto)")
    model.add_argument("--threads", type=positive_int,
                       help="CPU threads for torch (default: torch's choice; embedded default: 1)")
    model.add_argument("--output-dir", type=Path, default=Path("runs") / "unlearn",
                       help="where results go (default: runs/unlearn)")


def _add_tokenizing_arguments(group) -> None:
    """How QA records become token ids, the same options for every command that reads them."""
    group.add_argument("--tokenizer", help="tokenizer name, folder or GGUF file (default: --model)")
    group.add_argument("--chat-template", action="store_true", help="wrap questions with the tokenizer's chat "
                                                                    "template")
    group.add_argument("--system-prompt", metavar="TEXT",
                       help="the chat template's system turn (implies --chat-template; default: the template's own, "
                            "which many inject into every sample; an empty string drops it)")
    group.add_argument("--max-length", type=positive_int, default=512, help="tokens per sample (default: 512)")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def config_value(name: str, kind: type):
    """An argparse type for an option that means what :class:`~ceu.config.UnlearnConfig`'s field ``name`` means: the
    text read as ``kind``, then the field's own check (:func:`ceu.config.check_field`: finite, in
    :data:`ceu.config.RANGES`), whose error names the field after argparse's ``argument --option:``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        try:
            check_field(name, value)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["unlearn", *argv]  # `ceu [options]` is `ceu unlearn [options]`
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "trainer", None) == "hf" and args.parallel == "fsdp":
        parser.error("--parallel fsdp is for ceu's loop; with --trainer hf, accelerate's config sets up FSDP")
    try:  # every check that needs no model, before the minutes of loading, training and evaluating
        config = check_arguments(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.command == "export-synthetic":
        return run_export(args)
    import torch

    if args.threads or args.model is None:
        torch.set_num_threads(args.threads or 1)  # the embedded model is too small to gain from more threads
    if args.command == "eval":
        return run_eval(args)
    if args.command == "finetune":
        return run_finetune(args)
    return run_unlearn(args, config)


def check_arguments(args) -> UnlearnConfig | None:
    """Refuse what would fail or be ignored later, naming the option: data options without ``--model`` (the embedded
    default ignores them), a model path that does not exist, conflicting or invalid settings, an unreadable or
    mismatched ``--resume-from``, an output folder that holds an earlier run or cannot be written. Returns the run's
    config (``ceu unlearn``); fills in the data options' defaults."""
    if args.command == "export-synthetic":
        from ceu.synthetic import check_n_authors

        try:
            check_n_authors(args.authors)
        except ValueError as error:
            raise ValueError(f"argument --authors: {error}") from None
        _check_output_dir(args.output_dir, fresh=not args.overwrite,
                          remedy="pass --overwrite to replace its <split>.json files, or another --output-dir")
        return None
    if args.command == "finetune":
        _check_finetune(args)
        return None
    if args.model is None:
        given = [f"--{name.replace('_', '-')}" for name in NEEDS_MODEL if getattr(args, name, None) not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)}: need --model (without it the embedded default runs, on its own "
                             "synthetic data, tokenizer and retain model)")
    for name, default in DATA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    _check_tokenizing(args)
    if args.retain_model is not None:
        _check_model_path("--retain-model", args.retain_model)
    if args.command == "eval":
        if args.retain_log is not None and args.tofu_log is None:
            raise ValueError("--retain-log scores a --tofu-log: give both (to evaluate a model against its retain-only "
                             "model, pass --retain-model)")
        if (args.output_dir / "eval.json").exists() and args.tofu_log is None and not args.overwrite:
            raise ValueError(f"--output-dir {args.output_dir} already holds an eval.json: pass --overwrite to replace "
                             "it, or another --output-dir")
        return None
    if args.overwrite and args.resume_from:
        raise ValueError("--overwrite starts afresh and --resume-from continues a run: give one")
    _check_accelerate_plugins(args.trainer)
    try:
        config = _config(args, args.output_dir)
    except ConfigError as error:
        raise ValueError(f"argument --{error.field.replace('_', '-')}: {error}") from None
    if config.resume_from:
        _check_resume(config, args.trainer)
    if config.checkpoint_dir and not (args.overwrite or config.resume_from):
        earlier = sorted(Path(config.checkpoint_dir).glob("step-*.pt")) + sorted(
            Path(config.checkpoint_dir).glob("checkpoint-*"))
        if earlier:
            raise ValueError(f"--checkpoint-dir {config.checkpoint_dir} holds an earlier run's checkpoints "
                             f"({earlier[-1].name}, ...): --resume-from one to continue it, --overwrite to start "
                             "afresh, or another --checkpoint-dir")
    _check_output_dir(args.output_dir, fresh=not (args.overwrite or config.resume_from))
    return config


def _check_accelerate_plugins(trainer: str) -> None:
    """An ``accelerate launch`` config that the run would ignore: DeepSpeed or FSDP for ceu's loop (it runs DDP), FSDP
    on CPU for ``--trainer hf`` (accelerate drops it there and runs DDP)."""
    from ceu.distributed import ACCELERATE_FSDP_DROPPED, accelerate_fsdp_dropped, accelerate_requested

    plugin = next((name for name in ("DeepSpeed", "FSDP") if accelerate_requested(name)), None)
    if plugin is None:
        return
    if trainer == "ceu":
        raise ValueError(f"the accelerate launch's {plugin} config is read by --trainer hf only: ceu's loop would "
                         "ignore it and run DDP. Add --trainer hf, or run ceu's loop under torchrun (--parallel fsdp "
                         "to shard)")
    if accelerate_fsdp_dropped():
        raise ValueError(ACCELERATE_FSDP_DROPPED.format(runs="DDP (accelerate's MULTI_CPU) instead"))


def _check_tokenizing(args) -> None:
    """``--max-length``, and ``--model`` and ``--tokenizer`` where given."""
    from ceu.data import check_max_length

    try:
        check_max_length(args.max_length, allow_none=False)
    except ValueError as error:
        raise ValueError(f"argument --max-length: {error}") from None
    for name in ("model", "tokenizer"):
        if getattr(args, name) is not None:
            _check_model_path(f"--{name}", getattr(args, name))


def _check_finetune(args) -> None:
    """``ceu finetune``'s model, tokenizer and output folder. ``--overwrite`` replaces the whole folder, so it is
    refused on a folder that holds no saved model: it could be anything. It trains in one process: launched on
    several, every rank would train its own copy and write the same folder."""
    from ceu.distributed import launched_world_size

    world_size = launched_world_size()
    if world_size > 1:
        raise ValueError(f"ceu finetune runs in one process, not under a launcher ({world_size} processes here): "
                         "run it as a plain command")
    if args.split is None:
        args.split = [FINETUNE_SPLIT]
    _check_tokenizing(args)
    output_dir = args.output_dir
    if args.overwrite and output_dir.is_dir() and any(output_dir.iterdir()) \
            and not (output_dir / "config.json").is_file():
        raise ValueError(f"--output-dir {output_dir} holds no config.json, so no model an earlier `ceu finetune` "
                         "saved: --overwrite replaces only such a folder (all of it); give another --output-dir")
    _check_output_dir(output_dir, fresh=not args.overwrite,
                      remedy="pass --overwrite to replace the model saved there, or another --output-dir")


def _check_model_path(option: str, source: str) -> None:
    """A model argument names an existing file or folder, or a hub name (:func:`ceu.models.resolve` decides); a
    relative path whose parent folder exists but not itself is reported missing, not tried on the hub."""
    from ceu.models import resolve

    path = Path(source).expanduser()
    if not path.exists() and len(path.parts) > 1 and path.parent.is_dir():
        raise FileNotFoundError(f"{option} {source}: no such file or folder (its parent folder {path.parent} exists)")
    try:
        resolve(source)
    except (OSError, ValueError) as error:
        raise type(error)(f"{option}: {error}") from None


def _check_resume(config: UnlearnConfig, trainer: str) -> None:
    if trainer == "hf":  # Trainer's checkpoint-N/ folders, read by ceu.hf
        if not Path(config.resume_from).is_dir():
            raise FileNotFoundError(f"--resume-from {config.resume_from}: no such Trainer checkpoint folder")
        return
    from ceu.checkpoint import read_checkpoint

    read_checkpoint(config.resume_from, config, mmap=True)  # maps the tensors: cheap, and refuses it early


def _check_output_dir(output_dir: Path, fresh: bool,
                      remedy: str = "pass --overwrite to replace an earlier run's files there, --resume-from to "
                                    "continue it, or another --output-dir") -> None:
    """``output_dir`` is (or can be made) a writable folder; a fresh run also needs it empty (else the error says
    ``remedy``)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, not a folder")
    if fresh and output_dir.is_dir() and any(output_dir.iterdir()):
        entries = sorted(entry.name for entry in output_dir.iterdir())
        raise ValueError(f"--output-dir {output_dir} is not empty ({', '.join(entries[:5])}"
                         f"{', ...' if len(entries) > 5 else ''}): {remedy}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise OSError(f"--output-dir {output_dir} is not writable: {error}") from None


def _config(args, output_dir: Path) -> UnlearnConfig:
    settings = dict(EMBEDDED) if args.model is None else {}
    for field in fields(UnlearnConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            settings[field.name] = value
    if args.epsilon is not None and args.epsilon_alpha is not None:
        raise ValueError("--epsilon and --epsilon-alpha both set the bound: give one (absolute, or relative to the "
                         "model before unlearning)")
    if args.epsilon_alpha is not None:
        settings.pop("epsilon", None)  # the embedded default's absolute ε gives way to a relative one
    return UnlearnConfig(**settings, log_path=str(output_dir / "log.jsonl"))


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block before the other ranks of a process group do."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        dist.barrier()
    yield
    if distributed and dist.get_rank() == 0:
        dist.barrier()


def prompt_template(args):
    """The QA prompt template a Hugging Face model's run uses: its chat template with ``--chat-template`` or
    ``--system-prompt``, else plain text."""
    from ceu.data import QATemplate

    return QATemplate(chat=args.chat_template or args.system_prompt is not None, system_prompt=args.system_prompt)


class Job:
    """The models, samples and eval sets of one run: the embedded default's or a Hugging Face model's."""

    def __init__(self, args):
        self.args = args
        if args.model is None:
            from ceu.synthetic import TEMPLATE, stage_one

            with main_process_first():  # rank 0 trains and caches the stage-one models, the others load them
                self.stage = stage_one()
            self.tokenizer, self.template = self.stage.tokenizer, TEMPLATE
            self.forget_split, self.retain_split = self.stage.forget_split, self.stage.retain_split
        else:
            from ceu.models import load_tokenizer

            self.stage = None
            self.tokenizer = load_tokenizer(args.tokenizer or args.model)
            self.template = prompt_template(args)
            self.forget_split, self.retain_split = args.forget_split, args.retain_split

    def model(self, which: str):
        """``"learned"`` (the model to unlearn or evaluate) or ``"retain"`` (gold; None when not given)."""
        if self.stage is not None:
            return self.stage.load(which)
        path = self.args.model if which == "learned" else self.args.retain_model
        if path is None:
            return None
        from ceu.models import load_model

        return load_model(path)

    def records(self, split: str):
        if self.stage is not None:
            return self.stage.world[split]
        from ceu.data import load_records

        return load_records(self.args.data, split)

    def samples(self, split: str, records=None) -> list[dict]:
        """The split tokenized: its ``records`` when the caller has read them already, else :meth:`records`."""
        from ceu.data import records_name, tokenize_qa, tokenize_text

        records = self.records(split) if records is None else records
        where = split if self.stage is not None else records_name(self.args.data, split)  # errors name the file
        if self.args.text:
            return tokenize_text(records, self.tokenizer, self.args.max_length, where=where)
        return tokenize_qa(records, self.tokenizer, self.template, self.args.max_length, where=where)

    def eval_sets(self) -> dict | None:
        """TOFU's four eval sets, or None when the data has no perturbed answers to score (e.g. raw text)."""
        if self.stage is not None:
            world = self.stage.world
            return {self.forget_split: ("forget", world[self.forget_split]),
                    "retain": ("retain", world[self.retain_split]),
                    "real_authors": ("held", world["real_authors"]), "world_facts": ("held", world["world_facts"])}
        if self.args.text:
            return None
        try:
            sets = {self.forget_split: ("forget", self.records(f"{self.forget_split}_perturbed"))}
            for name, (role, split) in TOFU_EVAL_SPLITS.items():
                sets[name] = (role, self.records(split))
        except (FileNotFoundError, ValueError) as error:
            from ceu.distributed import is_main_process

            if is_main_process():  # once per run, not once per rank
                print(f"evaluation skipped: {error}")
            return None
        return sets


def measure(job: Job, model, eval_sets, retain_samples, cache: bool = False, say=print,
            device=None) -> tuple[dict | None, float]:
    """The evaluation log of ``model`` (None without eval sets) and its retain loss (the constrained quantity), measured
    on ``device`` (default: where the model is), to which the model is moved in place when it is measured.

    ``cache``: reuse an earlier measurement of the same weights on the same data with the same settings, or store
    this one (:mod:`ceu.eval_cache`); only for the models every run measures alike (learned, retain-only), never the
    unlearned one. The key is hashed before the model is moved (a hit leaves it where it was loaded), by rank 0, which
    shares it and the entry with the other ranks (:func:`ceu.eval_cache.lookup`); rank 0 stores the measurement."""
    from ceu import eval_cache
    from ceu.distributed import is_main_process
    from ceu.eval import evaluate_model
    from ceu.heads import dataset_loss

    if cache:
        key, cached = eval_cache.lookup(model, job.tokenizer, job.template, eval_sets, retain_samples, job.args.impl,
                                        device)
        if cached is not None:
            say(f"  using its cached evaluation {eval_cache.entry_path(key)} (same weights, data and settings; "
                "--no-eval-cache measures again)")
            return cached
    if device is not None:
        model.to(device)
    log = None
    if eval_sets is not None:
        log = evaluate_model(model, job.tokenizer, eval_sets, job.template, impl=job.args.impl)
    retain_loss = dataset_loss(model, retain_samples, job.tokenizer.pad_token_id, impl=job.args.impl)
    if cache and is_main_process():
        eval_cache.write(key, log, retain_loss)
    return log, retain_loss


def plan_lines(n_forget: int, config: UnlearnConfig, world_size: int = 1) -> list[str]:
    """What the run will do (:func:`ceu.schedule.training_schedule`, the plan both loops follow), and a warning when
    fewer than :data:`MIN_DUAL_STEPS` optimizer steps follow the dual warm-up, saying which options change that."""
    from ceu.schedule import training_schedule

    schedule = training_schedule(n_forget, config, world_size)
    total, held = schedule.total_steps, min(schedule.dual_warmup_steps, schedule.total_steps)
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    lines = [f"plan: {total} optimizer steps ({config.epochs:g} epochs of {schedule.steps_per_epoch}: {n_forget} "
             f"forget samples, batch {config.batch_size}{ranks}, {config.grad_accum_steps} micro-batch(es) per step), "
             f"lambda held at lambda_0 = {config.lambda_init:g} for the first {held}"]
    moving = total - held
    if moving < MIN_DUAL_STEPS:
        epochs = math.ceil((MIN_DUAL_STEPS + schedule.dual_warmup_steps) / schedule.steps_per_epoch)
        what = ("the whole run is inside the dual warm-up, so lambda never moves" if moving == 0 else
                f"only {moving} optimizer step{'s' if moving > 1 else ''} after the dual warm-up")
        lines.append(f"WARNING: {what} (fewer than {MIN_DUAL_STEPS}): this barely unlearns. For more steps raise "
                     f"--epochs (--epochs {epochs} gives {MIN_DUAL_STEPS}+ after the warm-up) or lower --batch-size "
                     f"(or --grad-accum-steps); --dual-warmup-epochs shortens the warm-up.")
    return lines


def report_block(job: Job, log: dict | None, retain_loss: float, gold_log: dict | None) -> dict:
    from ceu.eval import headline, summarize

    block = headline(summarize(log, gold_log), job.forget_split) if log is not None else {}
    return {**block, "retain_loss": retain_loss}


def start_distributed():
    """This process's device; under ``torchrun`` (``WORLD_SIZE`` > 1) it first joins the process group, NCCL on
    GPUs (one per local rank) and gloo on CPUs."""
    import torch
    import torch.distributed as dist

    from ceu.distributed import launched_world_size, local_device

    device = local_device()
    if launched_world_size() <= 1:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def data_parallel(model, how: str, device):
    """The model wrapped for the ranks of the process group: DDP, or FSDP2 with each transformer block (the model's
    ``_no_split_modules``) sharded on its own and the rest, LM head included, with the root."""
    import torch

    from ceu.heads import causal_lm

    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(causal_lm(model), "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def remove_earlier_outputs(output_dir: Path, checkpoint_dir: str | None) -> None:
    """``--overwrite``: delete what an earlier run wrote in ``output_dir`` (:data:`OUTPUTS` only) and its checkpoints
    in ``checkpoint_dir``, saying what: no file of the earlier run is left to be mistaken for one of the new run."""
    earlier = [output_dir / name for name in OUTPUTS if (output_dir / name).exists()]
    if checkpoint_dir:
        earlier += sorted(Path(checkpoint_dir).glob("step-*.pt")) + sorted(Path(checkpoint_dir).glob("checkpoint-*"))
    if earlier:
        print(f"--overwrite: deleting the earlier run's {', '.join(str(path) for path in earlier)}")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_unlearn(args, config: UnlearnConfig) -> int:
    import torch.distributed as dist

    from ceu.distributed import is_main_process
    from ceu.eval import format_table, plot_training_log
    from ceu.files import replacing, write_text
    from ceu.train import unlearn

    start = time.perf_counter()
    device = start_distributed()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    main_process = is_main_process()
    say = print if main_process else (lambda *_: None)
    output_dir = args.output_dir
    if args.overwrite and main_process:
        remove_earlier_outputs(output_dir, config.checkpoint_dir)
    job = Job(args)
    forget_samples, retain_samples = job.samples(job.forget_split), job.samples(job.retain_split)
    for line in plan_lines(len(forget_samples), config, world_size):
        say(line)
    eval_sets = job.eval_sets()

    # Every rank measures (under FSDP the forward is collective), rank 0 reports.
    logs, retain_losses = {}, {}
    cache = not args.no_eval_cache
    gold = job.model("retain")
    if gold is not None:  # moved to the device only when measured, not on a cache hit
        say("measuring the retain-only (gold) model")
        logs["retain_model"], retain_losses["retain_model"] = measure(job, gold, eval_sets, retain_samples, cache, say,
                                                                      device)
        del gold
    model = job.model("learned")  # hashed for the cache before it is moved (no copy back to the host)
    say(f"measuring the model before unlearning ({len(forget_samples)} forget, {len(retain_samples)} retain)")
    logs["learned"], retain_losses["learned"] = measure(job, model, eval_sets, retain_samples, cache, say, device)
    model = model.to(device)  # a cache hit left it where it was loaded
    if args.lora_rank:  # after measuring: fresh adapters change no output, but their random weights the cache key
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           target_modules="all-linear")).to(device)

    loop = args.parallel if args.trainer == "ceu" else "Trainer"
    say(f"unlearning {job.forget_split} under retain loss <= epsilon on {job.retain_split}"
        + (f" on {world_size} ranks ({loop})" if world_size > 1 else ""))
    if args.trainer == "hf":  # Trainer wraps the model and shards the data itself
        from ceu.hf import unlearn_with_trainer

        result = unlearn_with_trainer(model, forget_samples, retain_samples, config,
                                      pad_token_id=job.tokenizer.pad_token_id, output_dir=output_dir / "trainer")
    else:
        trained = data_parallel(model, args.parallel, device) if world_size > 1 else model
        result = unlearn(trained, forget_samples, retain_samples, config, pad_token_id=job.tokenizer.pad_token_id)
    logs["unlearned"], retain_losses["unlearned"] = measure(job, model, eval_sets, retain_samples)

    if not args.no_save_model:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # Gathers FSDP shards (every rank takes part); a plain model's own state otherwise.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if main_process:
            with replacing(output_dir / "model") as folder:
                model.save_pretrained(folder, state_dict=state)
                job.tokenizer.save_pretrained(folder)
    if world_size > 1:
        # no rank tears its group down while another may still be in a collective: rank 1 of a two-rank gloo FSDP
        # launch aborted at exit ("terminate called without an active exception") once in about a dozen test runs
        dist.barrier()
        dist.destroy_process_group()
    if not main_process:
        return 0
    with replacing(output_dir / "training.png") as png:
        plot_training_log(config.log_path, png)
    order = [name for name in ("learned", "unlearned", "retain_model") if name in logs]
    blocks = {name: report_block(job, logs[name], retain_losses[name], logs.get("retain_model")) for name in order}
    for name in order:
        if logs[name] is not None:
            write_text(output_dir / f"eval_log_{name}.json", json.dumps(logs[name]))
    learned, unlearned = blocks["learned"], blocks["unlearned"]
    checks = {"retain_loss_within_epsilon": unlearned["retain_loss"] <= result.epsilon}
    if "forget_answer_prob" in unlearned:
        checks["forget_answer_prob_drop"] = learned["forget_answer_prob"] / max(unlearned["forget_answer_prob"],
                                                                                1e-30)
        checks["model_utility_ratio"] = (unlearned["model_utility"] / learned["model_utility"]
                                         if learned["model_utility"] > 0 else None)
    results = {"epsilon": result.epsilon, "final_lambda": result.final_lambda, "steps": result.steps,
               **blocks, "checks": checks, "config": asdict(config),
               "model": args.model or "embedded tiny Llama", "forget_split": job.forget_split,
               "retain_split": job.retain_split, "wall_time_s": time.perf_counter() - start}
    write_text(output_dir / "results.json", json.dumps(results, indent=2))

    print()
    print(format_table(blocks))
    print(f"\nepsilon {result.epsilon:.4g}   final lambda {result.final_lambda:.4g}   steps {result.steps}")
    print("checks: " + "   ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in checks.items()))
    print(f"results, log, plot and model in {output_dir}/ ({results['wall_time_s']:.0f} s)")
    return 0


def run_eval(args) -> int:
    from ceu.eval import format_table, load_tofu_log, summarize
    from ceu.files import write_text

    if args.tofu_log is not None:
        retain_log = load_tofu_log(args.retain_log) if args.retain_log else None
        summary = summarize(load_tofu_log(args.tofu_log), retain_log)
        print(json.dumps(summary, indent=2))
        return 0
    job = Job(args)
    eval_sets = job.eval_sets()
    if eval_sets is None:
        print("nothing to evaluate: the data has no TOFU eval sets with perturbed answers")
        return 1
    retain_samples = job.samples(job.retain_split)
    logs, retain_losses = {}, {}
    gold = job.model("retain")
    if gold is not None:
        logs["retain_model"], retain_losses["retain_model"] = measure(job, gold, eval_sets, retain_samples)
    logs["model"], retain_losses["model"] = measure(job, job.model("learned"), eval_sets, retain_samples)
    blocks = {name: report_block(job, logs[name], retain_losses[name], logs.get("retain_model"))
              for name in ("model", "retain_model") if name in logs}
    write_text(args.output_dir / "eval.json", json.dumps({"blocks": blocks, "eval_logs": logs}, indent=1))
    print(format_table(blocks))
    print(f"written to {args.output_dir / 'eval.json'}")
    return 0


def finetune_records(args) -> dict:
    """The records of each split ``ceu finetune`` with ``args`` trains on, read once: the ones it digests
    (:func:`finetune_settings`) are the ones it tokenizes."""
    from ceu.data import load_records

    return {split: load_records(args.data, split) for split in args.split}


def finetune_settings(args, records: dict) -> dict:
    """How ``ceu finetune`` with ``args`` trains on ``records`` (:func:`finetune_records`), as its ``finetune.json``
    records it (beside the outcome): what tells whether a saved model was made this way (``tools/real_demo.py`` reuses
    one only then). ``data_sha256`` digests the records, so edited data tells whatever the files' times say."""
    template = prompt_template(args)
    digest = hashlib.sha256()
    for split_records in records.values():
        for record in split_records:
            digest.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
        digest.update(b"\0")  # where one split ends and the next begins
    return {"model": args.model, "data": args.data, "splits": args.split, "data_sha256": digest.hexdigest(),
            "template": {"chat": template.chat, "system_prompt": template.system_prompt},
            "max_length": args.max_length, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "seed": args.seed}


def run_finetune(args) -> int:
    """``ceu finetune``: the splits' answers taught to the model (:func:`ceu.finetune.fit`), the model and tokenizer
    saved as one folder, swapped in whole (:func:`ceu.files.replacing`), with ``finetune.json`` recording how. The
    tokenizer, template, samples and model are the :class:`Job`'s, as ``ceu unlearn`` makes them."""
    from ceu.distributed import local_device
    from ceu.files import replacing
    from ceu.finetune import fit

    start = time.perf_counter()
    records = finetune_records(args)
    settings = finetune_settings(args, records)
    job = Job(args)
    tokenizer = job.tokenizer
    samples = [sample for split, split_records in records.items() for sample in job.samples(split, split_records)]
    model = job.model("learned").to(local_device())
    print(f"fine-tuning {args.model} on {' + '.join(args.split)} of {args.data} ({len(samples)} QA): {args.epochs} "
          f"epochs, LR {args.lr:g}, batch {args.batch_size}")
    loss = fit(model, samples, tokenizer.pad_token_id, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
               seed=args.seed, desc="fine-tune")
    record = {**settings, "samples": len(samples), "final_loss": loss,
              "wall_time_s": time.perf_counter() - start}
    with replacing(args.output_dir.resolve()) as folder:  # resolved: `--output-dir .` has a name to swap
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "finetune.json").write_text(json.dumps(record, indent=2))
    print(f"final training loss {loss:.4f}; model and tokenizer saved in {args.output_dir}/ "
          f"({record['wall_time_s']:.0f} s)")
    return 0


def run_export(args) -> int:
    """``ceu export-synthetic``: the embedded default's world as a ``--data`` folder."""
    from ceu.synthetic import export_world, make_world

    written = export_world(args.output_dir, make_world(args.authors, args.seed))
    print(f"wrote {len(written)} splits ({', '.join(path.stem for path in written)}) to {args.output_dir}/; e.g. "
          f"ceu finetune --model MODEL --data {args.output_dir} --split full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
