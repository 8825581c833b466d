"""ceu.hf: the PDU step as a transformers.Trainer on a tiny model."""
import json

import pytest
import torch

from ceu.primal_dual import PrimalDual
from ceu.config import UnlearnConfig
from helpers import forbid_head_calls, qa_samples, tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_trainer_runs_the_pdu_step_with_one_dual_update_per_optimizer_step(tmp_path):
    from ceu.hf import ForgetRetainCollator, ForgetRetainDataset, PrimalDualTrainer

    window_means = []

    def record(value):  # stands in for the all-reduce; sees each optimizer step's window mean
        window_means.append(value.item())
        return value

    primal_dual = PrimalDual(lambda_init=1.0, dual_lr=2.0, epsilon=0.0, warmup_steps=1, reduce_mean=record)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=1e-3,
                                          report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                                          disable_tqdm=True)
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PrimalDualTrainer(model=model, args=args, unlearn_config=UnlearnConfig(), primal_dual=primal_dual,
                                train_dataset=ForgetRetainDataset(qa_samples(4), qa_samples(4, seed=1)),
                                data_collator=ForgetRetainCollator(pad_token_id=0))
    hook = forbid_head_calls(model)
    trainer.train()
    hook.remove()
    assert trainer.state.global_step == primal_dual.steps == len(window_means) == 2
    # step 1 is the warm start; step 2 moves lambda by eta * (window mean - epsilon)
    assert primal_dual.lam.item() == pytest.approx(1.0 + 2.0 * window_means[1], rel=1e-5)
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    logged = [entry for entry in trainer.state.log_history if "lambda" in entry]
    assert logged and "retain_loss" in logged[0]


def test_dataset_and_collator():
    from ceu.hf import ForgetRetainCollator, ForgetRetainDataset

    dataset = ForgetRetainDataset(qa_samples(3), qa_samples(2, seed=1))
    batch = ForgetRetainCollator(0)([dataset[0], dataset[1]])
    assert len(dataset) == 3
    assert batch["forget"]["input_ids"].shape[0] == batch["retain"]["labels"].shape[0] == 2
    with pytest.raises(ValueError, match="need forget and retain"):
        ForgetRetainDataset([], qa_samples(1))


def test_retain_partners_are_distinct_within_an_epoch_and_follow_the_epoch():
    from ceu.hf import ForgetRetainDataset

    retain = [{"input_ids": [i], "labels": [i]} for i in range(10)]

    def partners(dataset, indices):
        return [dataset[i]["retain"]["input_ids"][0] for i in indices]

    # Two ranks' copies with one seed: the partners follow the index, not the order of the fetches, and no two
    # forget samples share one, so the ranks' retain samples never overlap.
    rank0, rank1 = ForgetRetainDataset(qa_samples(6), retain), ForgetRetainDataset(qa_samples(6), retain)
    first_epoch = partners(rank0, range(6))
    assert len(set(first_epoch)) == 6 and partners(rank1, [5, 3, 1]) == [first_epoch[i] for i in (5, 3, 1)]
    # The next epoch draws new partners, the same on every copy of the dataset.
    rank0.set_epoch(1)
    rank1.set_epoch(1)
    assert partners(rank0, range(6)) == partners(rank1, range(6)) != partners(ForgetRetainDataset(
        qa_samples(6), retain), range(6))
    # A forget set larger than the retain set goes through it in whole passes.
    large = ForgetRetainDataset(qa_samples(25), retain, seed=3)
    drawn = partners(large, range(25))
    assert sorted(drawn[:10]) == sorted(drawn[10:20]) == list(range(10)) and len(set(drawn[20:])) == 5


def test_training_arguments_carry_the_config():
    from ceu.hf import training_arguments

    config = UnlearnConfig(epochs=3, lr=2e-4, batch_size=3, grad_accum_steps=2, weight_decay=0.1, lr_schedule="cosine",
                           lr_warmup_ratio=0.25, max_grad_norm=None, seed=7, log_every=5, checkpoint_every=4,
                           checkpoint_dir="unused", progress=False, mixed_precision="no")
    args = training_arguments(config, "out", logging_steps=2)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (3, 2, 3)
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type.value) == (2e-4, 0.1, "cosine")
    # the LR warm-up ratio stays in the UnlearnConfig, which PrimalDualTrainer's schedule reads (tests/test_schedule.py)
    assert (args.warmup_steps, args.max_grad_norm, args.seed, args.bf16) == (0, 0.0, 7, False)
    assert (args.save_strategy.value, args.save_steps, args.logging_steps, args.disable_tqdm) == ("steps", 4, 2, True)
    assert training_arguments(UnlearnConfig(lr_schedule="constant"), "out").lr_scheduler_type.value \
        == "constant_with_warmup"


def test_trainer_run_resumed_from_a_checkpoint_retraces_the_uninterrupted_run(tmp_path):
    from ceu.hf import unlearn_with_trainer

    settings = dict(epochs=2, lr=1e-2, batch_size=1, grad_accum_steps=2, lambda_init=1.0, dual_lr=2.0, epsilon=0.0,
                    dual_warmup_epochs=1, progress=False, checkpoint_every=2)
    forget, retain = qa_samples(6), qa_samples(5, seed=1)

    def run(name, **overrides):
        config = UnlearnConfig(**settings, checkpoint_dir=str(tmp_path / "checkpoints"),
                               log_path=str(tmp_path / f"{name}.jsonl"), **overrides)
        model = tiny_model()
        result = unlearn_with_trainer(model, forget, retain, config, output_dir=tmp_path)
        lines = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        return result, torch.cat([p.detach().flatten() for p in model.parameters()]), lines

    full, full_weights, full_log = run("full")
    assert full.steps == 6 and [line["dual_warmup"] for line in full_log] == [True] * 3 + [False] * 3
    assert full.final_lambda != 1.0 and full.last_step_within_epsilon is False
    # The interrupted run's log goes on: lines past the checkpoint are dropped, then logged again.
    (tmp_path / "resumed.jsonl").write_text((tmp_path / "full.jsonl").read_text())
    resumed, resumed_weights, resumed_log = run("resumed", resume_from=str(tmp_path / "checkpoints" / "checkpoint-4"))
    assert resumed.final_lambda == full.final_lambda and resumed.steps == 6
    assert torch.equal(resumed_weights, full_weights)
    assert [line["step"] for line in resumed_log] == list(range(1, 7))
    for mine, theirs in zip(resumed_log, full_log):
        assert mine["lambda"] == theirs["lambda"] and mine["forget_loss"] == theirs["forget_loss"]
    with pytest.raises(FileNotFoundError, match="primal_dual.pt"):
        run("broken", resume_from=str(tmp_path))
    # resume_from_checkpoint=True takes the newest checkpoint, and says so when there is none
    from ceu.hf import PrimalDualTrainer

    trainer = PrimalDualTrainer(model=tiny_model(), args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "empty"), use_cpu=True, report_to=[]))
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)


def test_trainer_run_refuses_empty_data_and_samples_without_answer_tokens(tmp_path):
    from ceu.hf import unlearn_with_trainer

    config = UnlearnConfig(progress=False)
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn_with_trainer(tiny_model(), [], qa_samples(2), config, output_dir=tmp_path)
    truncated = qa_samples(3)
    truncated[1] = {"input_ids": truncated[1]["input_ids"][:4], "labels": truncated[1]["labels"][:4]}
    with pytest.raises(ValueError, match=r"forget samples \[1\] have no answer token"):
        unlearn_with_trainer(tiny_model(), truncated, qa_samples(2), config, output_dir=tmp_path)


def test_fsdp_plugin_version_1_is_refused_and_version_2_accepted(monkeypatch):
    # accelerate applies its FSDP plugin only on GPUs (a CPU launch runs DDP), so the check is tested on its input
    from types import SimpleNamespace

    from ceu.hf import check_fsdp_plugin

    def accelerator(version):
        plugin = None if version is None else SimpleNamespace(fsdp_version=version)
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin,
                                                     distributed_type=SimpleNamespace(value="MULTI_CPU")))

    with pytest.raises(ValueError, match="fsdp_version 1 is not supported"):
        check_fsdp_plugin(accelerator(1))
    check_fsdp_plugin(accelerator(2))
    check_fsdp_plugin(accelerator(None))
    # asked for FSDP (ceu.distributed.accelerate_fsdp_dropped): no plugin kept is refused, whatever the device
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="accelerate was asked for FSDP .* distributed type MULTI_CPU instead"):
        check_fsdp_plugin(accelerator(None))
    check_fsdp_plugin(accelerator(2))
