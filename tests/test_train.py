"""ceu.train: the loop on tiny Hugging Face models: the dual update per optimizer step, the relative epsilon, errors,
PEFT LoRA, bf16 autocast and the reference's per-micro-batch dual update, an unreachable constraint."""
import json
import math

import pytest
import torch

from ceu.data import IGNORE_INDEX
from ceu.train import UnlearnConfig, lm_head, unlearn
from helpers import forbid_head_calls, qa_samples, tiny_model

pytest.importorskip("transformers")

def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loop_updates_lambda_once_per_optimizer_step_after_the_warm_start(tmp_path):
    model = tiny_model()
    hook = forbid_head_calls(model)
    config = UnlearnConfig(epochs=3, lr=1e-3, batch_size=2, grad_accum_steps=2, lambda_init=1.0, dual_lr=2.0,
                           epsilon=0.5, dual_warmup_epochs=1, log_path=str(tmp_path / "log.jsonl"), progress=False)
    result = unlearn(model, qa_samples(8), qa_samples(5, seed=1), config)
    hook.remove()
    log = read_log(tmp_path / "log.jsonl")
    assert result.steps == len(log) == 6  # 8 forget samples / 2 per micro-batch / 2 per step = 2 steps per epoch
    assert {"step", "epoch", "forget_loss", "retain_loss", "lambda", "slack", "lr", "tokens_per_s"} <= set(log[0])
    lam = 1.0
    for record in log:
        if record["step"] > 2:  # one epoch of warm start: lambda frozen at lambda_init
            lam = max(0.0, lam + 2.0 * (record["retain_loss"] - 0.5))
        assert record["lambda"] == pytest.approx(lam, rel=1e-5)
        assert record["slack"] == pytest.approx(record["retain_loss"] - 0.5, rel=1e-5)
    assert result.final_lambda == pytest.approx(lam, rel=1e-5)
    assert [r["dual_warmup"] for r in log] == [True, True, False, False, False, False]


def test_epsilon_relative_to_the_initial_retain_loss():
    model = tiny_model()
    config = UnlearnConfig(epochs=1, batch_size=4, epsilon_alpha=0.5, progress=False)
    result = unlearn(model, qa_samples(4), qa_samples(4, seed=1), config)
    assert result.initial_retain_loss > 0
    assert result.epsilon == pytest.approx(1.5 * result.initial_retain_loss)


def test_config_and_model_errors():
    with pytest.raises(ValueError, match="forget_mask"):
        UnlearnConfig(forget_mask="both")
    with pytest.raises(ValueError, match="batch_size"):
        UnlearnConfig(batch_size=0)
    with pytest.raises(ValueError, match="need forget and retain samples"):
        unlearn(tiny_model(), [], qa_samples(2))
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        lm_head(tiny_model(final_logit_softcapping=30.0))


def test_lora_model_trains_adapters_and_leaves_the_frozen_head_alone():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    head_before = lm_head(model).weight.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    hook = forbid_head_calls(model)
    unlearn(model, qa_samples(4), qa_samples(4, seed=1), UnlearnConfig(epochs=2, lr=1e-2, batch_size=2,
                                                                       progress=False))
    hook.remove()
    assert lm_head(model).weight.grad is None
    assert torch.equal(lm_head(model).weight, head_before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(TypeError, match="not torch.nn.Linear"):
        lm_head(peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["lm_head"])))


@pytest.mark.parametrize("overrides", [{"mixed_precision": "bf16"},
                                       {"dual_update": "micro_batch", "grad_accum_steps": 2}])
def test_loop_runs_under_bf16_autocast_and_the_reference_dual_update(overrides):
    config = UnlearnConfig(epochs=2, batch_size=2, dual_warmup_epochs=0, epsilon=0.0, progress=False, **overrides)
    result = unlearn(tiny_model(), qa_samples(4), qa_samples(4, seed=1), config)
    assert math.isfinite(result.final_lambda) and result.final_lambda > config.lambda_init


def test_empty_forget_set_and_answerless_samples_are_refused():
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(tiny_model(), [], qa_samples(2))
    truncated = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX] * 4} for _ in range(2)]
    config = UnlearnConfig(epochs=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"forget samples \[0, 1\] have no answer token.*truncated"):
        unlearn(tiny_model(), truncated, qa_samples(2), config)
    with pytest.raises(ValueError, match=r"retain samples \[1\] have no answer token"):  # one is enough
        unlearn(tiny_model(), qa_samples(2), [qa_samples(1)[0], truncated[0]], config)


def test_unreachable_epsilon_grows_lambda_keeps_the_run_finite_and_says_the_constraint_failed(tmp_path):
    model = tiny_model()
    config = UnlearnConfig(epochs=4, lr=1e-2, batch_size=2, lambda_init=1.0, dual_lr=2.0, epsilon=1e-3,
                           dual_warmup_epochs=0, log_path=str(tmp_path / "log.jsonl"), progress=False)
    result = unlearn(model, qa_samples(4), qa_samples(4, seed=1), config)
    log = read_log(tmp_path / "log.jsonl")
    lambdas = [record["lambda"] for record in log]
    assert lambdas == sorted(lambdas) and lambdas[-1] > 10 * config.lambda_init
    assert all(record["slack"] > 1.0 and math.isfinite(record["forget_loss"]) for record in log)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.last_step_within_epsilon is False and result.final_retain_loss > result.epsilon
    met = unlearn(tiny_model(), qa_samples(4), qa_samples(4, seed=1), UnlearnConfig(epochs=1, epsilon=100.0,
                                                                                    progress=False))
    assert met.last_step_within_epsilon is True
