"""What TOFU and MUSE users report beside forget quality: a loss-based membership-inference AUC and verbatim
memorisation.

- :func:`mia_auc`: the LOSS attack (Yeom et al. 2018) as open-unlearning scores it (``src/evals/metrics/mia``): each
  sample's score is its mean answer-token NLL, and the AUC is that of telling forget samples from holdout samples
  (never trained on) by it, with open-unlearning's orientation: 1 when the forget samples are far more likely than the
  holdout ones (remembered), 0.5 when indistinguishable (the retain-only model's ideal), below 0.5 when the forget
  samples have become *less* likely than unseen ones (over-unlearning, itself a membership signal). Exact: the
  Mann-Whitney U statistic with ties counted one half.
- :func:`verbatim_rouge`: MUSE's VerbMem: the model continues the first ``prefix_tokens`` tokens of a forget text
  greedily, and the continuation is scored by ROUGE-L F1 against the text's true next ``max_new_tokens`` tokens
  (open-unlearning's ``forget_verbmem_ROUGE``: ``rougeL_f1``).
"""
import numpy as np

from ceu.data import QATemplate
from ceu.eval import average_answer_losses, greedy_answers

RAW_TEXT = QATemplate(prompt="{question}")  # a text prefix is the whole prompt


def mia_auc(forget_scores, holdout_scores) -> float:
    """``P(holdout score > forget score) + ½·P(tie)`` over all (forget, holdout) pairs: the exact AUC of a loss-based
    attack that calls low-loss samples members (Mann-Whitney U from mid-ranks, so ties count one half)."""
    forget, holdout = np.asarray(forget_scores, dtype=np.float64), np.asarray(holdout_scores, dtype=np.float64)
    if forget.ndim != 1 or holdout.ndim != 1 or not forget.size or not holdout.size:
        raise ValueError(f"need non-empty 1-d forget and holdout scores, got shapes {forget.shape} and "
                         f"{holdout.shape}")
    if not (np.isfinite(forget).all() and np.isfinite(holdout).all()):
        raise ValueError("forget and holdout scores must be finite")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([forget, holdout]))  # mid-ranks: tied values share the mean of their ranks
    u_holdout = ranks[forget.size:].sum() - holdout.size * (holdout.size + 1) / 2
    return float(u_holdout / (forget.size * holdout.size))


def loss_mia_auc(model, tokenizer, forget_records, holdout_records, template: QATemplate,
                 impl: str = "auto") -> float:
    """:func:`mia_auc` of the mean answer-token NLL (fused cross-entropy, :func:`ceu.eval.average_answer_losses`) of
    TOFU-format forget and holdout records."""
    def scores(records):
        return average_answer_losses(model, tokenizer, [r["question"] for r in records],
                                     [r["answer"] for r in records], template, impl=impl)

    return mia_auc(scores(forget_records), scores(holdout_records))


def split_text(tokenizer, text: str, prefix_tokens: int, max_new_tokens: int) -> tuple[str, str]:
    """``(prefix, continuation)``: the text's first ``prefix_tokens`` tokens and the ``max_new_tokens`` after them,
    decoded. Refuses a text with no token after the prefix."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= prefix_tokens:
        raise ValueError(f"text of {len(ids)} tokens has nothing after a {prefix_tokens}-token prefix: {text[:60]!r}")
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True).strip()  # noqa: E731
    return decode(ids[:prefix_tokens]), decode(ids[prefix_tokens:prefix_tokens + max_new_tokens])


def rouge_l_f1(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(reference, prediction)["rougeL"].fmeasure
            for prediction, reference in zip(predictions, references)]


def verbatim_rouge(model, tokenizer, texts: list[str], prefix_tokens: int = 32, max_new_tokens: int = 128,
                   batch_size: int = 32) -> list[float]:
    """Per text, ROUGE-L F1 of the model's greedy continuation of its first ``prefix_tokens`` tokens against the true
    next ``max_new_tokens`` tokens (MUSE's verbatim memorisation; 1.0 for a text reproduced word for word)."""
    prefixes, continuations = zip(*(split_text(tokenizer, text, prefix_tokens, max_new_tokens) for text in texts))
    generated = greedy_answers(model, tokenizer, list(prefixes), RAW_TEXT, max_new_tokens, batch_size)
    return rouge_l_f1(generated, list(continuations))
