"""Checkpoint and resume: a run continued from a mid-run checkpoint (mid log window, with dropout drawing from the
RNG) retraces the uninterrupted run bitwise on CPU: λ trajectory, logged losses and final weights."""
import dataclasses
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

    # The interrupted run had logged past its last checkpoint, and was killed while writing a line; resuming rewrites
    # those lines.
    shutil.copy(tmp_path / "full.jsonl", tmp_path / "resumed.jsonl")
    with open(tmp_path / "resumed.jsonl", "a") as log:
        log.write('{"step": 7, "epoch": 3.5, "forget_lo')
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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 2-step run's checkpoints (4 forget, 4 retain samples, one step an epoch), and its config."""
    folder = tmp_path_factory.mktemp("run")
    config = run_config(folder, epochs=2, checkpoint_every=1, dual_warmup_epochs=0)
    unlearn(tiny_model(), qa_samples(4), qa_samples(4, seed=1), config)
    return folder / "checkpoints", config


def resume(config, path, forget=4, model=None, **changes):
    return unlearn(model or tiny_model(), qa_samples(forget), qa_samples(4, seed=1),
                   dataclasses.replace(config, resume_from=str(path), **changes))


@pytest.mark.parametrize("changes, named", [
    ({"seed": 1}, ["seed 0 (checkpoint) != 1 (now)"]),
    ({"lr": 1e-3, "epsilon": 0.4}, ["lr 0.01 (checkpoint) != 0.001 (now)", "epsilon 0.5 (checkpoint) != 0.4 (now)"]),
    ({"forget_mask": "unshifted"}, ["forget_mask 'shifted' (checkpoint) != 'unshifted' (now)"]),
    ({"epochs": 3}, ["epochs 2 (checkpoint) != 3 (now)"]),
    ({"max_grad_norm": None, "lambda_init": 2.0}, ["max_grad_norm 1.0 (checkpoint) != None (now)",
                                                   "lambda_init 1.0 (checkpoint) != 2.0 (now)"]),
])
def test_resume_refuses_changed_settings_naming_each(checkpoints, changes, named):
    """A resumed run continues the same run: a changed ε, LR, mask, ... would be half-applied (ε from the checkpoint,
    the LR schedule from the checkpoint's, the rest from the new config), so it is refused, every difference named."""
    folder, config = checkpoints
    with pytest.raises(ValueError, match="written with other settings") as error:
        resume(config, folder / "step-000002.pt", **changes)
    for difference in named:
        assert difference in str(error.value)


def test_resume_refuses_a_different_data_order(checkpoints):
    folder, config = checkpoints
    with pytest.raises(ValueError, match="different data order.*'n_forget': 4.*'n_forget': 5"):
        resume(config, folder / "step-000002.pt", forget=5)


def test_resume_may_change_where_and_how_often_it_logs_and_checkpoints(checkpoints, tmp_path):
    folder, config = checkpoints
    result = resume(config, folder / "step-000001.pt", log_every=1, progress=True, checkpoint_every=0,
                    checkpoint_dir=None, log_path=str(tmp_path / "log.jsonl"), gradient_checkpointing=True,
                    impl="torch")
    assert result.steps == 2 and [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").open()] == [2]


def damaged(folder, name, content: bytes):
    (folder / name).write_bytes(content)
    return folder / name


class NotAState:  # an arbitrary pickled object: weights_only=True refuses to build it (no code runs)
    pass


@pytest.mark.parametrize("make, message", [
    (lambda folder, good: folder / "missing.pt", "no such checkpoint file"),
    (lambda folder, good: damaged(folder, "empty.pt", b""), "is empty"),
    (lambda folder, good: damaged(folder, "half.pt", good.read_bytes()[:good.stat().st_size // 2]), "truncated"),
    (lambda folder, good: damaged(folder, "notes.pt", b"step 2\n"), "truncated .* or another kind of file"),
    (lambda folder, good: folder, "is a folder"),
    (lambda folder, good: (torch.save({"weight": torch.ones(2)}, folder / "weights.pt"), folder / "weights.pt")[1],
     "not a ceu.unlearn checkpoint"),
    (lambda folder, good: (torch.save(NotAState(), folder / "object.pt"), folder / "object.pt")[1], "unreadable"),
])
def test_a_bad_checkpoint_file_is_refused_naming_it_before_anything_changes(checkpoints, tmp_path, make, message):
    folder, config = checkpoints
    path = make(tmp_path, folder / "step-000002.pt")
    model = tiny_model()
    before = weights(model).clone()
    with pytest.raises((ValueError, FileNotFoundError), match=f"checkpoint {path}.*{message}"):
        resume(config, path, model=model)
    assert torch.equal(weights(model), before)


def test_a_failed_checkpoint_write_leaves_the_earlier_ones_and_no_debris(tmp_path, monkeypatch):
    """A full disk while writing step 2's checkpoint: step 1's is intact, no temporary file is left, and the run stops
    with the error (it would not be resumable past step 1 anyway)."""
    real_save = torch.save
    calls = []

    def save_then_fill_the_disk(state, path):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr("ceu.checkpoint.torch.save", save_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        unlearn(tiny_model(), qa_samples(4), qa_samples(4, seed=1), run_config(tmp_path, epochs=2, checkpoint_every=1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001.pt"]
    monkeypatch.undo()
    config = run_config(tmp_path, epochs=2, checkpoint_every=1)
    assert resume(config, tmp_path / "checkpoints" / "step-000001.pt").steps == 2


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
