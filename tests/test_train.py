"""ceu.train: the PDU step on tiny Hugging Face models of several architectures, the reference quirks, the loop's dual
update per optimizer step, and PEFT LoRA."""
import json
import math

import pytest
import torch

from ceu.data import IGNORE_INDEX, pad_batch
from ceu.train import (UnlearnConfig, final_hidden_states, lm_head, lr_factor, micro_batch_plan, pdu_losses, unlearn)

transformers = pytest.importorskip("transformers")

VOCAB = 48
TINY = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32)


def tiny_model(kind="llama", **overrides):
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **overrides))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **overrides))
    if kind == "gemma":
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(**TINY, head_dim=8, **overrides))
    if kind == "phi":  # an LM head with a bias
        return transformers.PhiForCausalLM(transformers.PhiConfig(**TINY, **overrides))
    if kind == "gpt2":  # a head tied to the input embeddings
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                                                    n_positions=32, bos_token_id=1, eos_token_id=2,
                                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    raise ValueError(kind)


def qa_samples(count, seed=0, prompt=4, answer=3):
    """Random token sequences whose first ``prompt`` tokens are the (masked) prompt; lengths vary by one."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        ids = torch.randint(3, VOCAB, (prompt + answer + index % 2,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def forbid_head_calls(model):
    def fail(*_):
        raise AssertionError("the training step called the LM head module")

    return lm_head(model).register_forward_pre_hook(fail)


def reference_losses(model, forget, retain, shifted=True):
    """open-unlearning's PDU formulas on materialised logits from the model's ordinary forward."""
    logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits.double()
    labels = forget["labels"]
    if shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    per_token = (logits.max(-1).values - logits.mean(-1)) ** 2
    forget_loss = (per_token * mask).sum() / mask.sum()
    retain_loss = model(**retain).loss
    return forget_loss, retain_loss


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "phi", "gpt2"])
def test_pdu_losses_match_materialised_logits_without_calling_the_head(kind):
    model = tiny_model(kind)
    forget, retain = pad_batch(qa_samples(3), 0), pad_batch(qa_samples(3, seed=1), 0)
    expected_forget, expected_retain = reference_losses(model, forget, retain)
    hook = forbid_head_calls(model)
    forget_loss, retain_loss = pdu_losses(model, forget, retain, UnlearnConfig(impl="torch"))
    (forget_loss + retain_loss).backward()
    hook.remove()
    assert forget_loss.item() == pytest.approx(expected_forget.item(), rel=1e-4)
    assert retain_loss.item() == pytest.approx(expected_retain.item(), rel=1e-5)
    head = lm_head(model)
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert isinstance(lm_head(model), torch.nn.Linear)  # restored after the step


def test_final_hidden_states_are_what_the_head_sees():
    model = tiny_model()
    batch = pad_batch(qa_samples(2), 0)
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(lm_head(model)(hidden), logits)


def test_unshifted_mask_option_reproduces_the_reference_off_by_one():
    model = tiny_model()
    forget, retain = pad_batch(qa_samples(3), 0), pad_batch(qa_samples(3, seed=1), 0)
    expected, _ = reference_losses(model, forget, retain, shifted=False)
    forget_loss, _ = pdu_losses(model, forget, retain, UnlearnConfig(forget_mask="unshifted"))
    assert forget_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    shifted_loss, _ = pdu_losses(model, forget, retain, UnlearnConfig())
    assert shifted_loss.item() != pytest.approx(forget_loss.item(), rel=1e-3)


def test_batch_without_answer_tokens_gives_zero_or_the_references_nan():
    model = tiny_model()
    forget = pad_batch([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}], 0)
    retain = pad_batch(qa_samples(2), 0)
    forget_loss, _ = pdu_losses(model, forget, retain, UnlearnConfig())
    assert forget_loss.item() == 0.0
    forget_loss, _ = pdu_losses(model, forget, retain, UnlearnConfig(empty_batch="nan"))
    assert math.isnan(forget_loss.item())


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


def test_micro_batch_plan_is_seeded_and_covers_each_epoch():
    config = UnlearnConfig(epochs=2, batch_size=3, seed=7)
    plan = micro_batch_plan(7, 4, config)
    assert plan == micro_batch_plan(7, 4, config)
    assert len(plan) == 6
    for epoch in (plan[:3], plan[3:]):
        assert sorted(i for forget, _ in epoch for i in forget) == list(range(7))
    assert all(len(forget) == len(retain) for forget, retain in plan)
    assert plan != micro_batch_plan(7, 4, UnlearnConfig(epochs=2, batch_size=3, seed=8))


def test_lr_factor_warms_up_from_zero():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6)] == pytest.approx([0.0, 0.5, 1.0, 0.5])
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


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
    assert result.constraint_met is False and result.final_retain_loss > result.epsilon
    met = unlearn(tiny_model(), qa_samples(4), qa_samples(4, seed=1), UnlearnConfig(epochs=1, epsilon=100.0,
                                                                                    progress=False))
    assert met.constraint_met is True
