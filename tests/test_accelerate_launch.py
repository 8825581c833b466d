"""``PrimalDualTrainer`` under the real ``accelerate launch`` command: two CPU processes over gloo.

test_hf.py runs the Trainer in one process; what only a launched run shows is that accelerate's DDP wrapping accepts
the fused losses (the LM head is used outside the forward), that the dual update's all-reduce keeps one λ on every
rank, and that accelerate's sampler hands the ranks disjoint data. ``accelerate launch --cpu`` starts one process
(several only through mpirun), so the launch is ``--multi_gpu``, which runs torchrun; with ``use_cpu=True`` in the
script accelerate then sets up MULTI_CPU with gloo (helpers.accelerate_launch).
"""
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch, launch, tiny_model

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="accelerate is not installed: the launcher under test is missing")
import accelerate_pdu_script as script  # after the skips: it imports transformers

SCRIPT = Path(script.__file__).resolve()


def test_trainer_refuses_ddp_unused_parameter_search(tmp_path):
    from transformers import TrainingArguments

    from ceu.hf import PrimalDualTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert PrimalDualTrainer(model=tiny_model(), args=args).args.ddp_find_unused_parameters is False
    args.ddp_find_unused_parameters = True
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        PrimalDualTrainer(model=tiny_model(), args=args)


def test_accelerate_launch_two_cpu_ranks_keep_one_lambda_and_one_model(tmp_path):
    launch([*accelerate_launch(), str(SCRIPT), str(tmp_path)], tmp_path, timeout=240)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]

    steps = script.EPOCHS * script.FORGET // (script.BATCH_SIZE * script.GRAD_ACCUM * 2)
    for rank, result in enumerate(ranks):
        assert (result["rank"], result["world_size"], result["backend"]) == (rank, 2, "gloo")
        assert len(result["lambdas"]) == len(result["local_means"]) == steps
    first, second = ranks
    # one λ: the same all-reduced retain loss, the mean of the ranks' own, drives the same trajectory everywhere
    assert first["lambdas"] == second["lambdas"]
    assert first["retain_losses"] == second["retain_losses"]
    assert first["local_means"] != second["local_means"]  # so agreeing takes the all-reduce
    lam = script.LAMBDA_INIT
    for step, retain_loss in enumerate(first["retain_losses"]):
        assert retain_loss == pytest.approx((first["local_means"][step] + second["local_means"][step]) / 2)
        lam += script.DUAL_LR * (retain_loss - script.EPSILON)
        assert first["lambdas"][step] == pytest.approx(lam, rel=1e-5)
    assert all(before < after for before, after in zip([script.LAMBDA_INIT] + first["lambdas"], first["lambdas"]))
    # one model, and it trained
    assert torch.equal(first["weights"], second["weights"])
    initial = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    assert not torch.equal(first["weights"], initial)
    # the ranks split every optimizer step's samples, and each epoch covers the forget set once
    per_step = [[[index for batch in result["batches"][step * script.GRAD_ACCUM:(step + 1) * script.GRAD_ACCUM]
                  for index in batch] for result in ranks] for step in range(steps)]
    for mine, theirs in per_step:
        assert not set(mine) & set(theirs)
    steps_per_epoch = steps // script.EPOCHS
    for epoch in range(script.EPOCHS):
        seen = [index for step in per_step[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
                for rank_indices in step for index in rank_indices]
        assert sorted(seen) == list(range(script.FORGET))
