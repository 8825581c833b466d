"""Data-parallel unlearning on two CPU processes (gloo), with DDP and with FSDP2 (``fully_shard``).

Every rank gets the same full data and takes its own share of each global micro-batch. The ranks keep one λ and end
with the weights and λ trajectory of one process running ``batch_size · 2``. The data is chosen to make that hard: the
answer-token counts differ between the ranks' shares, and the last micro-batch of each epoch has one sample, so rank 1
runs a zero-weight stand-in. With gradient accumulation the ranks reduce gradients once per optimizer step (DDP's
all-reduce, FSDP2's reduce-scatter), on the window's last micro-batch, and still match one process. A run resumed from
an FSDP2 checkpoint retraces the uninterrupted one.
"""
import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from helpers import qa_samples, tiny_model

from ceu.distributed import distributed_mean
from ceu.train import UnlearnConfig, causal_lm, micro_batch_plan, rank_share, unlearn

pytest.importorskip("transformers")

CONFIG = {"epochs": 3, "lr": 1e-2, "batch_size": 2, "lambda_init": 1.0, "dual_lr": 3.0, "epsilon": 0.0,
          "dual_warmup_epochs": 0, "progress": False}


def data(n_forget: int = 5):
    """5 forget samples (global micro-batches of 4 and 1) whose lengths alternate, and 4 retain samples."""
    return qa_samples(n_forget, seed=0), qa_samples(4, seed=10)


def full_weights(model) -> torch.Tensor:
    """All parameters, unsharded, in name order (the same on every rank and for an unwrapped model)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(causal_lm(model), options=StateDictOptions(full_state_dict=True))
    return torch.cat([value.detach().flatten() for _, value in sorted(state.items())])


def wrap(model, parallel: str):
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in causal_lm(model).model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root holds the LM head (see ceu.train.head_parameters)
    return model


def count_gradient_reductions(model, parallel: str) -> list:
    """A list that grows by one each time the ranks reduce the gradients (one backward's worth)."""
    reductions = []
    if parallel == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            if bucket.index() == 0:
                reductions.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
    else:  # FSDP2 reduce-scatters each sharded module's gradients: count the root's (the LM head's)
        import torch.distributed.fsdp._fully_shard._fsdp_collectives as collectives

        reduce_scatter = collectives.foreach_reduce
        head_weight = causal_lm(model).get_output_embeddings().weight

        def counting(fsdp_params, *args, **kwargs):
            if any(param.sharded_param is head_weight for param in fsdp_params):
                reductions.append(1)
            return reduce_scatter(fsdp_params, *args, **kwargs)

        for module in (collectives, sys.modules["torch.distributed.fsdp._fully_shard._fsdp_param_group"]):
            module.foreach_reduce = counting
    return reductions


def _rank_main(rank, world_size, init_file, parallel, overrides, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = wrap(tiny_model(), parallel)
        reductions = count_gradient_reductions(model, parallel)
        n_forget = overrides.pop("n_forget", 5)
        result = unlearn(model, *data(n_forget), UnlearnConfig(**{**CONFIG, **overrides}))
        results[rank] = (full_weights(model), result.final_lambda, result.steps, len(reductions))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, parallel, **overrides):
    results = mp.Manager().dict()
    init_file = tmp_path / f"init-{uuid.uuid4().hex}"
    mp.spawn(_rank_main, args=(2, str(init_file), parallel, overrides, results), nprocs=2)
    return results[0], results[1]


def logged_lambdas(path):
    return [json.loads(line)["lambda"] for line in Path(path).read_text().splitlines()]


def test_distributed_mean_is_identity_without_a_process_group():
    value = torch.tensor(0.25)
    assert distributed_mean(value) is value


def test_ranks_take_disjoint_shares_that_cover_each_global_micro_batch():
    plan = micro_batch_plan(5, 4, UnlearnConfig(**CONFIG), world_size=2)
    assert [len(forget) for forget, _ in plan] == [4, 1] * 3
    for forget, retain in plan:
        for indices in (forget, retain):  # a retain batch may repeat a sample: it spans two passes over the set
            counted = [share for share, counts in (rank_share(indices, rank, 2) for rank in (0, 1)) if counts]
            assert sorted(index for share in counted for index in share) == sorted(indices)
        forget_shares = [set(rank_share(forget, rank, 2)[0]) for rank in (0, 1)]
        assert len(forget) == 1 or not forget_shares[0] & forget_shares[1]
    assert rank_share([7], 1, 2) == ([7], False)  # a stand-in that carries no weight


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path, parallel):
    log_path = tmp_path / "ranks.jsonl"
    (weights0, lambda0, *_), (weights1, lambda1, *_) = run_two_ranks(tmp_path, parallel, log_path=str(log_path))
    assert lambda0 == lambda1 != 1.0
    assert torch.equal(weights0, weights1)

    model = tiny_model()
    initial = full_weights(model)
    single = unlearn(model, *data(), UnlearnConfig(**{**CONFIG, "batch_size": 4}, log_path=str(tmp_path / "1.jsonl")))
    assert lambda0 == pytest.approx(single.final_lambda, rel=1e-5)
    assert logged_lambdas(log_path) == pytest.approx(logged_lambdas(tmp_path / "1.jsonl"), rel=1e-5)
    assert (full_weights(model) - initial).abs().max() > 1e-2
    torch.testing.assert_close(weights0, full_weights(model), rtol=1e-4, atol=5e-5)


def test_fsdp2_run_resumed_from_a_checkpoint_retraces_the_uninterrupted_run(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (uninterrupted, lambda_uninterrupted, *_), _ = run_two_ranks(
        tmp_path, "fsdp2", checkpoint_dir=str(checkpoints), checkpoint_every=2, log_path=str(tmp_path / "a.jsonl"))
    (resumed, lambda_resumed, *_), _ = run_two_ranks(tmp_path, "fsdp2", resume_from=str(checkpoints / "step-000004.pt"),
                                                 log_path=str(tmp_path / "b.jsonl"))
    assert lambda_resumed == lambda_uninterrupted
    assert torch.equal(resumed, uninterrupted)
    after_checkpoint = logged_lambdas(tmp_path / "a.jsonl")[4:]
    assert len(after_checkpoint) == 2 and logged_lambdas(tmp_path / "b.jsonl") == after_checkpoint


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_accumulation_reduces_gradients_once_per_optimizer_step_and_matches_one_process(tmp_path, parallel):
    """3 global micro-batches an epoch (4, 4 and 1 forget samples; rank 1's last is a stand-in) in windows of 2: an
    epoch is a full and a partial window, 2 optimizer steps and 2 reductions instead of 3."""
    (weights0, lambda0, steps, reductions), (weights1, lambda1, _, _) = run_two_ranks(
        tmp_path, parallel, grad_accum_steps=2, epochs=2, n_forget=9)
    assert steps == 4 and reductions == steps  # not one per micro-batch (6)
    assert lambda0 == lambda1 and torch.equal(weights0, weights1)
    model = tiny_model()
    single = unlearn(model, *data(9), UnlearnConfig(**{**CONFIG, "grad_accum_steps": 2, "epochs": 2, "batch_size": 4}))
    assert single.steps == steps and lambda0 == pytest.approx(single.final_lambda, rel=1e-5)
    torch.testing.assert_close(weights0, full_weights(model), rtol=1e-4, atol=5e-5)
