"""Trains ``ceu.hf.PrimalDualTrainer`` for a few steps on a tiny Llama; run by ``tests/test_accelerate_launch.py``
under ``accelerate launch``. Usage: ``accelerate_pdu_script.py OUTDIR``.

Each rank saves ``OUTDIR/rank<R>.pt``: its rank, world size and backend, λ and the all-reduced window retain loss
after every optimizer step, its own window means before the all-reduce, the forget indices of each micro-batch it
trained on (in order), and its final weights as one flat vector.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import qa_samples, tiny_model  # tests/ is sys.path[0] when this file runs as a script
from transformers import TrainerCallback, TrainingArguments

from ceu.hf import ForgetRetainCollator, ForgetRetainDataset, PrimalDualTrainer
from ceu.config import UnlearnConfig

FORGET = 8
BATCH_SIZE, GRAD_ACCUM, EPOCHS = 1, 2, 2  # 2 ranks: 2 optimizer steps per epoch, 4 in all
LAMBDA_INIT, DUAL_LR, EPSILON = 1.0, 2.0, 0.0


class RecordingCollator(ForgetRetainCollator):
    """Notes the forget indices of every micro-batch it builds (one rank's batches, in training order)."""

    def __init__(self, forget: list[dict]):
        super().__init__(pad_token_id=0)
        self.forget, self.batches = forget, []

    def __call__(self, items: list[dict]) -> dict:
        self.batches.append([self.forget.index(item["forget"]) for item in items])
        return super().__call__(items)


class RecordLambda(TrainerCallback):
    def __init__(self):
        self.trainer, self.lambdas, self.retain_losses = None, [], []

    def on_step_end(self, args, state, control, **kwargs):  # runs after DualStepCallback's, added later
        primal_dual = self.trainer.primal_dual
        self.lambdas.append(primal_dual.lam.item())
        self.retain_losses.append(primal_dual.last_retain_loss.item())


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    forget = qa_samples(FORGET)
    collator = RecordingCollator(forget)
    args = TrainingArguments(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=BATCH_SIZE,
                             gradient_accumulation_steps=GRAD_ACCUM, num_train_epochs=EPOCHS, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    config = UnlearnConfig(lambda_init=LAMBDA_INIT, dual_lr=DUAL_LR, epsilon=EPSILON, dual_warmup_epochs=0)
    # One seed on every rank: the ranks' retain partners still differ (an epoch pairs each forget sample with its own
    # retain sample), so their retain losses differ and the λ agreement tests the all-reduce.
    dataset = ForgetRetainDataset(forget, qa_samples(4, seed=1), seed=0)
    trainer = PrimalDualTrainer(model=tiny_model(), args=args, unlearn_config=config, train_dataset=dataset,
                                data_collator=collator)
    recorder = RecordLambda()
    recorder.trainer = trainer
    trainer.add_callback(recorder)

    local_means, all_reduce = [], trainer.primal_dual.reduce_mean

    def reduce_mean(value):  # the default all-reduce, noting this rank's window mean on the way in
        local_means.append(value.item())
        return all_reduce(value)

    trainer.primal_dual.reduce_mean = reduce_mean
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save({"rank": trainer.args.process_index, "world_size": dist.get_world_size(),
                "backend": dist.get_backend(), "lambdas": recorder.lambdas, "retain_losses": recorder.retain_losses,
                "local_means": local_means, "batches": collator.batches, "weights": weights},
               out_dir / f"rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
