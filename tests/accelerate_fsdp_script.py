"""Runs under ``accelerate launch`` with an FSDP2 config on CPU processes (``tests/test_accelerate_fsdp.py``): first a
plain ``transformers.Trainer`` for one step, to record what accelerate made of the FSDP request, then
``PrimalDualTrainer``, which must refuse it. Usage: ``accelerate_fsdp_script.py OUTDIR``.

Rank 0 saves ``OUTDIR/fsdp.json``: whether the FSDP request reached the process (``ACCELERATE_USE_FSDP``), the
distributed type accelerate set up, whether Trainer saw an FSDP plugin, the class that wrapped the trained model, and
``PrimalDualTrainer``'s error (None if it accepted the launch).
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from helpers import qa_samples, tiny_model  # tests/ is sys.path[0] when this file runs as a script

from ceu.data import pad_batch
from ceu.hf import ForgetRetainCollator, ForgetRetainDataset, PrimalDualTrainer


def arguments(out_dir: Path, **extra) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=1, optim="sgd",
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                          **extra)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    plain = transformers.Trainer(model=tiny_model(), args=arguments(out_dir / "plain", max_steps=1),
                                 train_dataset=qa_samples(4), data_collator=lambda items: pad_batch(items, 0))
    plain.train()
    result = {"requested": os.environ.get("ACCELERATE_USE_FSDP"),
              "distributed_type": plain.accelerator.state.distributed_type.value,
              "trainer_fsdp_enabled": plain.is_fsdp_enabled, "wrapped": type(plain.model_wrapped).__name__,
              "error": None}
    try:
        PrimalDualTrainer(model=tiny_model(), args=arguments(out_dir / "pdu"),
                          train_dataset=ForgetRetainDataset(qa_samples(4), qa_samples(4, seed=1)),
                          data_collator=ForgetRetainCollator(0))
    except ValueError as error:
        result["error"] = str(error)
    if dist.get_rank() == 0:
        (out_dir / "fsdp.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
