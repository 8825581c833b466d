"""Checkpoint and resume: a run continued from a mid-run checkpoint (mid log window, with dropout drawing from the
RNG) retraces the uninterrupted run bitwise on CPU: λ trajectory, logged losses and final weights."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import qa_samples, tiny_model

from ceu.train import UnlearnConfig, unlearn


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(tmp_path, **overrides):
    settings = {"epochs": 3, "lr": 1e-2, "batch_size": 2, "grad_accum_steps": 2, "lambda_init": 1.0, "dual_lr": 2.0,
                "epsilon": 0.5, "dual_warmup_epochs": 1, "lr_schedule": "cosine", "lr_warmup_ratio": 0.2,
                "log_every": 2, "progress": False, "checkpoint_dir": str(tmp_path / "checkpoints"),
                "checkpoint_every": 3}
    return UnlearnConfig(**{**settings, **overrides})


def records_without_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in path.read_text().splitlines()]


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resumed_run_retraces_the_uninterrupted_run_bitwise(tmp_path, one_thread):
    forget, retain = qa_samples(8), qa_samples(5, seed=1)
    full_model = tiny_model(attention_dropout=0.1)
    full = unlearn(full_model, forget, retain, run_config(tmp_path, log_path=str(tmp_path / "full.jsonl")))
    assert full.steps == 6 and (tmp_path / "checkpoints" / "step-000003.pt").exists()

    # The interrupted run had logged past its last checkpoint; resuming rewrites those lines.
    shutil.copy(tmp_path / "full.jsonl", tmp_path / "resumed.jsonl")
    resumed_model = tiny_model(attention_dropout=0.1)
    with torch.no_grad():
        for parameter in resumed_model.parameters():
            parameter.add_(1.0)
    torch.manual_seed(123)
    resumed = unlearn(resumed_model, forget, retain,
                      run_config(tmp_path / "again", log_path=str(tmp_path / "resumed.jsonl"),
                                 resume_from=str(tmp_path / "checkpoints" / "step-000003.pt")))

    full_log, resumed_log = records_without_timing(tmp_path / "full.jsonl"), records_without_timing(
        tmp_path / "resumed.jsonl")
    assert [r["step"] for r in resumed_log] == [2, 4, 6]
    assert resumed_log == full_log
    assert resumed.final_lambda == full.final_lambda and resumed.final_lambda != 1.0
    assert torch.equal(weights(resumed_model), weights(full_model))


def test_resume_refuses_a_different_data_order(tmp_path):
    forget, retain = qa_samples(4), qa_samples(4, seed=1)
    unlearn(tiny_model(), forget, retain, run_config(tmp_path, epochs=2, checkpoint_every=1))
    with pytest.raises(ValueError, match="different data order"):
        unlearn(tiny_model(), forget, retain,
                run_config(tmp_path, epochs=2, seed=1, resume_from=str(tmp_path / "checkpoints" / "step-000001.pt")))


def test_deterministic_runs_are_bitwise_repeatable_and_restore_the_global_setting(tmp_path):
    forget, retain = qa_samples(6), qa_samples(5, seed=1)
    runs = []
    for name in ("first", "second"):
        model = tiny_model(attention_dropout=0.1)
        torch.manual_seed(len(name))  # the run seeds itself: what came before must not matter
        result = unlearn(model, forget, retain, run_config(tmp_path / name, deterministic=True, checkpoint_every=0,
                                                           log_path=str(tmp_path / f"{name}.jsonl")))
        runs.append((weights(model), result.final_lambda, records_without_timing(tmp_path / f"{name}.jsonl")))
        assert not torch.are_deterministic_algorithms_enabled()
    (first_weights, first_lambda, first_log), (second_weights, second_lambda, second_log) = runs
    assert torch.equal(first_weights, second_weights) and not torch.equal(first_weights, weights(tiny_model()))
    assert first_lambda == second_lambda != 1.0 and first_log == second_log
