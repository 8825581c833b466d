"""ceu.patch_causal_lm: the fused cross-entropy as a Hugging Face causal LM's own loss, for each family the tests build,
against the unpatched model (loss and every parameter's gradient); and under transformers.Trainer and TRL's
SFTTrainer, the same run as unpatched."""
import pytest
import torch

import ceu
from ceu.data import IGNORE_INDEX, pad_batch
from ceu.heads import lm_head
from helpers import TINY, TINY_VOCAB, assert_close, forbid_head_calls, qa_samples, tiny_model

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama", "qwen2", "gemma", "phi", "gpt2", "mistral"]


def model_of(kind):
    if kind == "mistral":
        torch.manual_seed(0)
        return transformers.MistralForCausalLM(transformers.MistralConfig(**TINY))
    return tiny_model(kind)


def batch_of(count=3, seed=0):
    return pad_batch(qa_samples(count, seed=seed), 0)  # prompts masked, right padding masked


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    outputs = model(**batch, **kwargs)
    outputs.loss.backward()
    return outputs, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(loss, grads, expected_loss, expected_grads):
    assert_close("loss", loss.detach(), expected_loss.detach(), torch.float32)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(f"grad {name}", grad, expected_grads[name], torch.float32)


@pytest.mark.parametrize("kind", FAMILIES)
def test_patched_loss_and_every_gradient_match_the_unpatched_model_without_logits(kind):
    model, batch = model_of(kind), batch_of()
    expected, expected_grads = loss_and_grads(model, batch)
    assert expected.logits.shape[-1] == TINY_VOCAB
    with ceu.patch_causal_lm(model, impl="torch"):
        hook = forbid_head_calls(model)
        outputs, grads = loss_and_grads(model, batch)
        hook.remove()
    assert outputs.logits is None and "logits" not in outputs.keys()
    assert not any(torch.is_tensor(v) and v.shape[-1:] == (TINY_VOCAB,) for v in outputs.values())
    assert_same(outputs.loss, grads, expected.loss, expected_grads)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_num_items_in_batch_gives_the_sum_over_that_count(kind):
    model, batch = model_of(kind), batch_of()
    count = torch.tensor(7)  # a window's count, not this micro-batch's
    expected, expected_grads = loss_and_grads(model, batch, num_items_in_batch=count)
    mean = model(**batch).loss
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    with ceu.patch_causal_lm(model, impl="torch"):
        outputs, grads = loss_and_grads(model, batch, num_items_in_batch=count)
        as_int = model(**batch, num_items_in_batch=7).loss
    assert_same(outputs.loss, grads, expected.loss, expected_grads)
    assert_close("sum / count", outputs.loss.detach(), mean.detach() * tokens / 7, torch.float32)
    assert as_int.item() == outputs.loss.item()


def test_shift_labels_ignore_index_and_positional_labels_follow_transformers():
    model, batch = model_of("llama"), batch_of()
    shift_labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous()
    shift_labels[:, -2:] = IGNORE_INDEX
    relabelled = {**batch, "labels": batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, -1)}
    calls = [(batch, dict(shift_labels=shift_labels)), (relabelled, dict(ignore_index=-1))]
    expected = [model(**inputs, **kwargs).loss for inputs, kwargs in calls]
    positional = model(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"]).loss
    with ceu.patch_causal_lm(model, impl="torch"):
        for (inputs, kwargs), want in zip(calls, expected):
            outputs = model(**inputs, **kwargs)
            assert outputs.logits is None
            assert_close("loss", outputs.loss.detach(), want.detach(), torch.float32)
        outputs = model(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"])
        assert outputs.logits is None
        assert_close("positional labels", outputs.loss.detach(), positional.detach(), torch.float32)


def test_without_labels_the_model_is_its_own_and_logits_to_keep_is_respected():
    model, batch = model_of("qwen2"), batch_of()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    full, last = model(**inputs).logits, model(**inputs, logits_to_keep=1).logits
    with ceu.patch_causal_lm(model):
        assert torch.equal(model(**inputs).logits, full)
        assert torch.equal(model(**inputs, logits_to_keep=1).logits, last)
        # with labels, every position is kept (as transformers requires), and fewer is refused by name
        assert model(**batch, logits_to_keep=0).logits is None
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(**batch, logits_to_keep=2)
        with pytest.raises(ValueError, match="return_dict=False"):
            model(**batch, return_dict=False)
    assert last.shape[1] == 1


def test_unpatch_restores_the_model_exactly_and_a_failed_forward_restores_the_head():
    model, batch = model_of("gpt2"), batch_of()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(**batch)
    head = lm_head(model)
    patch = ceu.patch_causal_lm(model)
    with pytest.raises(ValueError, match="already patched"):
        ceu.patch_causal_lm(model)
    with pytest.raises(IndexError):  # a token id past the vocabulary: the forward raises inside the patched call
        model(input_ids=batch["input_ids"] + TINY_VOCAB, labels=batch["labels"])
    assert lm_head(model) is head
    assert model(**batch).logits is None
    ceu.unpatch_causal_lm(model)
    assert not model._forward_hooks and not model._forward_pre_hooks and lm_head(model) is head
    outputs = model(**batch)
    assert torch.equal(outputs.logits, expected.logits) and torch.equal(outputs.loss, expected.loss)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not patched"):
        ceu.unpatch_causal_lm(model)
    patch.remove()  # removing twice is harmless
    with ceu.patch_causal_lm(model):
        assert model(**batch).logits is None
    assert torch.equal(model(**batch).logits, expected.logits)


def test_transformed_logits_and_other_losses_are_refused():
    torch.manual_seed(0)
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TINY, head_dim=8))
    assert gemma2.config.final_logit_softcapping
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        ceu.patch_causal_lm(gemma2)
    gemma2.config.final_logit_softcapping = None  # without soft-capping the head is plain: patched, same loss
    batch = batch_of()
    expected = gemma2(**batch).loss
    with ceu.patch_causal_lm(gemma2, impl="torch"):
        assert_close("gemma2 loss", gemma2(**batch).loss.detach(), expected.detach(), torch.float32)
    model = model_of("llama")
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="its own loss"):
        ceu.patch_causal_lm(model)


def test_a_peft_model_patched_after_wrapping_fuses_and_trains_the_adapters_alike():
    peft = pytest.importorskip("peft")
    batch = batch_of()

    def lora():
        return peft.get_peft_model(model_of("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    model = lora()
    expected, expected_grads = loss_and_grads(model, batch)
    model = lora()
    with ceu.patch_causal_lm(model, impl="torch"):
        outputs, grads = loss_and_grads(model, batch)
    assert outputs.logits is None and grads and all("lora_" in name for name in grads)
    assert_same(outputs.loss, grads, expected.loss, expected_grads)


# ---- under third-party trainers: the same run with and without the patch ---------------------------------------------

class PadCollator:
    def __call__(self, items):
        return pad_batch([{"input_ids": item["input_ids"], "labels": item["labels"]} for item in items], 0)


def trainer_run(tmp_path, patched):
    """Two optimizer steps of transformers.Trainer (accumulation 2, so it passes num_items_in_batch) on a tiny Llama."""
    model = model_of("llama")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                                          lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                          logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=qa_samples(8), data_collator=PadCollator())
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the model's loss
    if patched:
        with ceu.patch_causal_lm(model, impl="torch"):
            hook = forbid_head_calls(model)
            trainer.train()
            hook.remove()
    else:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_transformers_trainer_with_gradient_accumulation_runs_the_same_with_the_patch(tmp_path):
    expected_losses, expected_weights = trainer_run(tmp_path / "plain", patched=False)
    losses, weights = trainer_run(tmp_path / "patched", patched=True)
    assert len(losses) == len(expected_losses) == 2
    assert_close("logged losses", torch.tensor(losses), torch.tensor(expected_losses), torch.float32)
    initial = dict(model_of("llama").named_parameters())
    assert any(not torch.equal(weights[name], initial[name]) for name in weights)
    for name, weight in weights.items():
        assert_close(name, weight, expected_weights[name], torch.float32)


def word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2",
                                                unk_token="t1")


def sft_run(tmp_path, patched):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = model_of("llama")
    data = Dataset.from_list([{"input_ids": sample["input_ids"]} for sample in qa_samples(8)])
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                         save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
    patch = ceu.patch_causal_lm(model, impl="torch") if patched else None
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
    trainer.train()
    if patch is not None:
        patch.remove()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trl_sft_trainer_runs_the_same_with_the_patch(tmp_path):
    # TRL's SFTTrainer has its own fused head (model(..., fused_lm_head=True)); the patch leaves those calls to it
    expected_losses, expected_weights = sft_run(tmp_path / "plain", patched=False)
    losses, weights = sft_run(tmp_path / "patched", patched=True)
    assert len(losses) == 2 and losses == expected_losses
    for name, weight in weights.items():
        assert torch.equal(weight, expected_weights[name]), name


def test_gradient_checkpointing_and_autocast_keep_the_patched_loss():
    model, batch = model_of("llama"), batch_of()
    expected, expected_grads = loss_and_grads(model, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with ceu.patch_causal_lm(model, impl="torch"):
        outputs, grads = loss_and_grads(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the head in bf16 under autocast, the fused loss not
            autocast_loss = model(**batch).loss
    assert_same(outputs.loss, grads, expected.loss, expected_grads)
    assert autocast_loss.dtype == torch.float32
    assert_close("autocast loss", autocast_loss.detach(), expected.loss.detach(), torch.bfloat16)
