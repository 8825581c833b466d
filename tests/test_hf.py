"""ceu.hf: the PDU step as a transformers.Trainer on a tiny model."""
import pytest
import torch

from ceu.primal_dual import PrimalDual
from ceu.train import UnlearnConfig
from test_train import forbid_head_calls, qa_samples, tiny_model

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


def test_retain_partners_follow_the_forget_index_and_change_with_each_visit():
    from ceu.hf import ForgetRetainDataset

    retain = [{"input_ids": [i], "labels": [i]} for i in range(50)]
    forget = qa_samples(6)

    def partners(dataset, indices):
        return [dataset[i]["retain"]["input_ids"][0] for i in indices]

    # Two ranks with one seed fetch disjoint indices: their partners differ.
    rank0, rank1 = ForgetRetainDataset(forget, retain), ForgetRetainDataset(forget, retain)
    first_epoch = partners(rank0, [0, 2, 4])
    assert first_epoch != partners(rank1, [1, 3, 5])
    # The partner follows the index, not the order of the fetches.
    assert partners(ForgetRetainDataset(forget, retain), [4, 2, 0]) == first_epoch[::-1]
    # A second fetch of the same indices (the next epoch) draws new partners.
    assert partners(rank0, [0, 2, 4]) != first_epoch
