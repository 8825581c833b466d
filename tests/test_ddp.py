"""Two CPU processes (gloo) running ceu.unlearn on a DDP-wrapped model with different data: the forward with the LM
head bypassed still goes through DDP, so gradients are averaged and both ranks end with the same weights and λ, which match one process given the whole
global batch."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")


def _rank_main(rank, world_size, init_file, results):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import qa_samples, tiny_model

    from ceu.train import UnlearnConfig, unlearn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(tiny_model())
    config = UnlearnConfig(epochs=2, lr=1e-2, batch_size=2, lambda_init=1.0, dual_lr=3.0, epsilon=0.0,
                           dual_warmup_epochs=0, progress=False)
    result = unlearn(model, qa_samples(2, seed=rank), qa_samples(2, seed=10 + rank), config)
    results[rank] = (torch.cat([p.detach().flatten() for p in model.parameters()]), result.final_lambda)
    dist.destroy_process_group()


def test_ddp_ranks_stay_in_sync(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), results), nprocs=2)
    (weights0, lambda0), (weights1, lambda1) = results[0], results[1]
    torch.testing.assert_close(weights0, weights1)
    assert lambda0 == pytest.approx(lambda1) and lambda0 != 1.0


GLOBAL_BATCH_CONFIG = {"epochs": 3, "lr": 1e-2, "lambda_init": 1.0, "dual_lr": 3.0, "epsilon": 0.0,
                       "dual_warmup_epochs": 0, "progress": False}


def rank_data(rank):
    """Two forget and two retain samples per rank, with the same answer-token counts on both ranks: then the mean of
    the per-rank token means is the global token mean, and DDP's gradient average is the global batch's gradient."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import qa_samples

    return qa_samples(2, seed=rank), qa_samples(2, seed=10 + rank)


def _half_of_global_batch(rank, world_size, init_file, results):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_model

    from ceu.train import UnlearnConfig, unlearn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = torch.nn.parallel.DistributedDataParallel(tiny_model())
    forget, retain = rank_data(rank)
    result = unlearn(model, forget, retain, UnlearnConfig(batch_size=2, **GLOBAL_BATCH_CONFIG))
    results[rank] = (torch.cat([p.detach().flatten() for p in model.parameters()]), result.final_lambda)
    dist.destroy_process_group()


def test_two_ranks_with_half_a_global_batch_each_match_one_process_on_the_whole_batch(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_model

    from ceu.train import UnlearnConfig, unlearn

    results = mp.Manager().dict()
    mp.spawn(_half_of_global_batch, args=(2, str(tmp_path / "init"), results), nprocs=2)
    (forget0, retain0), (forget1, retain1) = rank_data(0), rank_data(1)
    model = tiny_model()
    single = unlearn(model, forget0 + forget1, retain0 + retain1, UnlearnConfig(batch_size=4, **GLOBAL_BATCH_CONFIG))
    single_weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(single_weights, torch.cat([p.detach().flatten() for p in tiny_model().parameters()]))
    for weights, final_lambda in (results[0], results[1]):
        assert final_lambda == pytest.approx(single.final_lambda, rel=1e-5) and final_lambda != 1.0
        torch.testing.assert_close(weights, single_weights, rtol=1e-4, atol=1e-5)
