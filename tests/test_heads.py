"""ceu.heads: the PDU step's losses on tiny Hugging Face models of several architectures against materialised logits,
without calling the LM head module; the final hidden states; the reference quirks (unshifted mask, empty batch)."""
import math

import pytest
import torch

from ceu.config import UnlearnConfig
from ceu.data import IGNORE_INDEX, pad_batch
from ceu import heads
from ceu.heads import final_hidden_states, lm_head, pdu_losses
from helpers import assert_close, forbid_head_calls, qa_samples, tiny_model

pytest.importorskip("transformers")


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
    assert_close("forget loss", forget_loss.detach(), expected_forget, torch.float32)
    assert_close("retain loss", retain_loss.detach(), expected_retain.detach(), torch.float32)
    head = lm_head(model)
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert isinstance(lm_head(model), torch.nn.Linear)  # restored after the step


def test_the_fused_losses_run_on_the_answer_rows_alone_with_the_references_gradients(monkeypatch):
    """Prompt and padding rows never reach the fused losses (answer_rows), and every parameter's gradient is still
    the materialised-logits reference's (zero through the dropped rows)."""
    model = tiny_model("llama")
    forget, retain = pad_batch(qa_samples(3), 0), pad_batch(qa_samples(3, seed=2), 0)
    rows_seen = {}
    for name in ("linear_lmf_loss", "linear_cross_entropy"):
        def spy(hidden, *args, loss=getattr(heads, name), name=name, **kwargs):
            rows_seen[name] = tuple(hidden.shape)
            return loss(hidden, *args, **kwargs)
        monkeypatch.setattr(heads, name, spy)
    forget_loss, retain_loss = pdu_losses(model, forget, retain, UnlearnConfig(impl="torch"))
    (forget_loss + retain_loss).backward()
    fused = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    expected_forget, expected_retain = reference_losses(model, forget, retain)
    (expected_forget.float() + expected_retain).backward()
    hidden_size = model.config.hidden_size
    assert rows_seen == {"linear_lmf_loss": (int((forget["labels"][:, 1:] != IGNORE_INDEX).sum()), hidden_size),
                         "linear_cross_entropy": (int((retain["labels"][:, 1:] != IGNORE_INDEX).sum()), hidden_size)}
    assert rows_seen["linear_lmf_loss"][0] < forget["labels"][:, 1:].numel()  # the prompts were dropped
    for name, parameter in model.named_parameters():
        assert_close(name, fused[name], parameter.grad, torch.float32)


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
    assert_close("forget loss", forget_loss, expected, torch.float32)
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


def _step_gradients(model, checkpointing: bool):
    """The gradients of one PDU Lagrangian on ``model`` and how often its first layer's MLP ran."""
    from ceu.heads import enable_gradient_checkpointing

    if checkpointing:
        enable_gradient_checkpointing(model)
    calls = []
    mlp = next(module for name, module in model.named_modules() if name.endswith("layers.0.mlp"))
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop before the MLP returns
    model.train()
    forget, retain = pad_batch(qa_samples(3), 0), pad_batch(qa_samples(3, seed=1), 0)
    forget_loss, retain_loss = pdu_losses(model, forget, retain, UnlearnConfig(impl="torch"))
    (forget_loss + 3.0 * retain_loss).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("wrapper", ["none", "peft"])
def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(wrapper):
    def build():
        model = tiny_model()
        if wrapper == "peft":
            peft = pytest.importorskip("peft")
            model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
        return model

    expected, forwards = _step_gradients(build(), checkpointing=False)
    got, forwards_checkpointed = _step_gradients(build(), checkpointing=True)
    assert forwards_checkpointed == 2 * forwards  # every layer ran again in the backward
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert_close(name, got[name], grad, torch.float32)


def test_unlearn_turns_gradient_checkpointing_on_and_trains_the_same_model():
    from ceu.train import unlearn

    samples = qa_samples(4)
    models = {}
    for checkpointing in (False, True):
        model = tiny_model()
        unlearn(model, samples, qa_samples(4, seed=1),
                UnlearnConfig(epochs=1, batch_size=2, lr=1e-3, progress=False, gradient_checkpointing=checkpointing))
        assert model.is_activation_checkpointing == checkpointing
        models[checkpointing] = model
    for (name, trained), checkpointed in zip(models[False].named_parameters(), models[True].parameters()):
        assert_close(name, checkpointed.detach(), trained.detach(), torch.float32)


def test_one_forward_over_both_batches_gives_each_its_own_hidden_states():
    from ceu.heads import pair_hidden_states

    model = tiny_model()
    forget, retain = pad_batch(qa_samples(2, answer=6), 0), pad_batch(qa_samples(3, seed=1), 0)
    assert forget["input_ids"].shape[1] > retain["input_ids"].shape[1]  # the retain batch is padded to the forget's
    forwards = []
    model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    forget_hidden, retain_hidden = pair_hidden_states(model, forget, retain)
    assert len(forwards) == 1
    for batch, hidden in ((forget, forget_hidden), (retain, retain_hidden)):
        alone = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        assert hidden.shape == alone.shape
        mask = batch["attention_mask"].bool()
        assert_close("hidden states", hidden[mask], alone[mask], torch.float32)
