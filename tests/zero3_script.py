"""Runs under ``accelerate launch`` with a DeepSpeed ZeRO-3 config (``tests/test_zero3.py``), as open-unlearning
launches: ``PrimalDualTrainer`` on a tiny GPT-2 (LM head tied to the input embeddings), then ``transformers.Trainer``
on a tiny Phi (a head with a bias) patched by ``ceu.patch_causal_lm``, each for ``STEPS`` optimizer steps of SGD with
the whole data set split over the ranks. Usage: ``zero3_script.py OUTDIR``.

Rank 0 saves ``OUTDIR/zero3.pt``: for each run the final weights (gathered) as one flat vector and the logged losses;
for the PDU run λ; and the LM-head weight's size outside the forward (0: ZeRO-3 partitioned it). Then
``unlearn_with_trainer`` on a tiny Llama: whether it handed the model back plain (no ZeRO-3 parameter left), its
weights and the retain loss measured on it afterwards. Last, examples/pdu_hf_trainer.py (``ceu.pdu_objective``) on a
tiny Qwen2: λ and the final weights.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from helpers import qa_samples, tiny_model  # tests/ is sys.path[0] when this file runs as a script

import ceu
from ceu.config import UnlearnConfig
from ceu.data import pad_batch
from ceu.heads import dataset_loss
from ceu.hf import ForgetRetainCollator, ForgetRetainDataset, PrimalDualTrainer, unlearn_with_trainer

SAMPLES, STEPS, LR = 4, 2, 1e-2
PDU = dict(lr_schedule="constant", lambda_init=1.0, dual_lr=2.0, epsilon=1.0, dual_warmup_epochs=0)


def arguments(out_dir: Path, batch_size: int, **extra) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=batch_size,
                                          learning_rate=LR, optim="sgd",
                                          lr_scheduler_type="constant_with_warmup", report_to=[], save_strategy="no",
                                          logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, **extra)


def pdu_trainer(args, model) -> PrimalDualTrainer:
    return PrimalDualTrainer(model=model, args=args, unlearn_config=UnlearnConfig(**PDU),
                             train_dataset=ForgetRetainDataset(qa_samples(SAMPLES), qa_samples(SAMPLES, seed=1)),
                             data_collator=ForgetRetainCollator(0))


def sft_trainer(args, model) -> transformers.Trainer:
    return transformers.Trainer(model=model, args=args, train_dataset=qa_samples(SAMPLES),
                                data_collator=lambda items: pad_batch(items, 0))


def unlearn_run(out_dir: Path, batch_size: int):
    """``unlearn_with_trainer`` (``ceu unlearn --trainer hf``) on a tiny Llama: the model it hands back and its retain
    loss measured afterwards, as the CLI then evaluates and saves it."""
    model = tiny_model()
    config = UnlearnConfig(**PDU, epochs=STEPS, batch_size=batch_size, lr=LR, progress=False)
    unlearn_with_trainer(model, qa_samples(SAMPLES), qa_samples(SAMPLES, seed=1), config, output_dir=out_dir)
    return model, dataset_loss(model, qa_samples(SAMPLES, seed=1))


def example_run(out_dir: Path, batch_size: int):
    """examples/pdu_hf_trainer.py (a Trainer subclass on ``ceu.pdu_objective``) on a tiny Qwen2: its λ and model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from pdu_hf_trainer import unlearn

    primal_dual = ceu.PrimalDual(lambda_init=PDU["lambda_init"], dual_lr=PDU["dual_lr"], epsilon=PDU["epsilon"])
    trainer = unlearn(tiny_model("qwen2"), qa_samples(SAMPLES), qa_samples(SAMPLES, seed=1), primal_dual,
                      arguments(out_dir, batch_size, num_train_epochs=STEPS))
    return primal_dual.lam.item(), trainer.model


def losses(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def flat_weights(model) -> torch.Tensor:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().clone() for p in params])


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    batch_size = SAMPLES // int(os.environ["WORLD_SIZE"])  # the whole data set in each optimizer step
    pdu = pdu_trainer(arguments(out_dir / "pdu", batch_size, num_train_epochs=STEPS), tiny_model("gpt2"))
    pdu.train()
    phi = tiny_model("phi")
    sft = sft_trainer(arguments(out_dir / "sft", batch_size, max_steps=STEPS), phi)
    with ceu.patch_causal_lm(phi, impl="torch"):
        sft.train()
    unlearned, unlearned_retain_loss = unlearn_run(out_dir / "unlearn", batch_size)
    example_lambda, example_model = example_run(out_dir / "example", batch_size)
    result = {"world_size": dist.get_world_size(), "engine": type(pdu.model_wrapped).__name__,
              "head_numel": [pdu.model.lm_head.weight.numel(), phi.lm_head.weight.numel()],
              "pdu_weights": flat_weights(pdu.model), "pdu_lambda": pdu.primal_dual.lam.item(),
              "pdu_retain_losses": losses(pdu, "retain_loss"), "sft_weights": flat_weights(phi),
              "sft_losses": losses(sft, "loss"),
              "unlearn_plain": not any(hasattr(p, "ds_id") for p in unlearned.parameters()),
              "unlearn_weights": torch.cat([p.detach().flatten() for p in unlearned.parameters()]),
              "unlearn_retain_loss": unlearned_retain_loss,
              "example_lambda": example_lambda, "example_weights": flat_weights(example_model)}
    if dist.get_rank() == 0:
        torch.save(result, out_dir / "zero3.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
