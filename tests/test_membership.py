"""ceu.membership: the loss-based MIA AUC on planted scores (1.0, 0.5 with ties, 0.0, and exact against a count of
all pairs), and verbatim-memorisation ROUGE on a text a tiny Llama has memorised (1.0) and on one it has not."""
import random

import numpy as np
import pytest
import torch

from ceu.data import pad_batch
from ceu.membership import loss_mia_auc, mia_auc, split_text, verbatim_rouge


def test_mia_auc_planted_cases():
    assert mia_auc([0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]) == 1.0   # forget samples all more likely: remembered
    assert mia_auc([0.4, 0.5, 0.6, 0.7], [0.1, 0.2, 0.3]) == 0.0   # all less likely than unseen ones
    assert mia_auc([1.0, 1.0, 2.0], [1.0, 1.0, 2.0]) == 0.5        # the same scores, with ties: indistinguishable
    assert mia_auc([1.0], [1.0]) == 0.5                             # one tie is half a win
    assert mia_auc([1.0, 3.0], [2.0]) == 0.5


def test_mia_auc_is_the_pair_count_with_ties_as_halves():
    rng = random.Random(0)
    forget = [rng.randint(0, 6) for _ in range(37)]   # integers: many ties
    holdout = [rng.randint(2, 9) for _ in range(23)]
    pairs = [(h > f) + 0.5 * (h == f) for f in forget for h in holdout]
    assert mia_auc(forget, holdout) == pytest.approx(sum(pairs) / len(pairs), abs=1e-15)


def test_mia_auc_refuses_empty_and_non_finite():
    with pytest.raises(ValueError, match="non-empty"):
        mia_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        mia_auc([float("nan")], [1.0])


def word_tokenizer(texts):
    from ceu.synthetic import build_tokenizer

    return build_tokenizer({"texts": [{"question": text, "answer": "", "paraphrased_answer": "",
                                       "perturbed_answer": []} for text in texts]})


def memorise(texts, tokenizer, steps=150):
    """A tiny Llama trained on the texts, then EOS (every token counts), until it reproduces them."""
    import transformers

    from ceu.heads import answer_token_losses

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    samples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        samples.append({"input_ids": ids, "labels": ids})
    batch = pad_batch(samples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        losses, mask = answer_token_losses(model, batch, "torch")
        (losses.sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


MEMORISED = "the silent harbor keeps a lantern for every ship that sails past the northern bridge at night"
UNSEEN = "a golden river runs under the frozen tower while the crimson garden waits for the spring voyage"


def test_verbatim_rouge_is_one_on_a_memorised_text_and_lower_on_an_unseen_one():
    tokenizer = word_tokenizer([MEMORISED, UNSEEN])
    model = memorise([MEMORISED], tokenizer)
    memorised, unseen = verbatim_rouge(model, tokenizer, [MEMORISED, UNSEEN], prefix_tokens=4, max_new_tokens=20)
    assert memorised == 1.0
    assert unseen < 0.5
    assert split_text(tokenizer, MEMORISED, 4, 3) == ("the silent harbor keeps", "a lantern for")
    with pytest.raises(ValueError, match="nothing after a 40-token prefix"):
        split_text(tokenizer, MEMORISED, 40, 3)


def test_loss_mia_auc_separates_trained_from_unseen_records():
    from ceu.data import QATemplate

    template = QATemplate(prompt="{question}")
    forget = [{"question": MEMORISED.split()[0], "answer": " ".join(MEMORISED.split()[1:])}]
    holdout = [{"question": UNSEEN.split()[0], "answer": " ".join(UNSEEN.split()[1:])}]
    tokenizer = word_tokenizer([MEMORISED, UNSEEN])
    model = memorise([MEMORISED], tokenizer, steps=60)
    assert loss_mia_auc(model, tokenizer, forget, holdout, template) == 1.0
    assert loss_mia_auc(model, tokenizer, holdout, forget, template) == 0.0
    assert np.isclose(loss_mia_auc(model, tokenizer, forget, forget, template), 0.5)
