"""TOFU metrics of ceu.eval: hand-computed values on a few samples, and the reproduction of TOFU's own published
evaluation logs (tests/fixtures/tofu_legacy: TOFU's files, trimmed to the fields read here; see its README)."""
import json
import math
from pathlib import Path

import pytest

from ceu.eval import (format_table, forget_quality, headline, load_tofu_log, model_utility, plot_training_log,
                      rouge_l_recall, set_metrics, summarize, truth_ratio_stat)

TOFU_LOGS = Path(__file__).resolve().parent / "fixtures" / "tofu_legacy"


def log_set(role, gt, paraphrased, perturbed, rouge):
    return {"role": role, "avg_gt_loss": gt, "avg_paraphrased_loss": paraphrased, "average_perturb_loss": perturbed,
            "rougeL_recall": rouge}


TWO_SAMPLES = dict(gt=[math.log(2), math.log(4)], paraphrased=[1.0, 2.0], perturbed=[[2.0, 2.0], [1.0, 2.0]],
                   rouge=[1.0, 0.5])


def test_truth_ratio_stat():
    # exp(mean(perturbed) - paraphrased) = exp(2 - 1), exp(1.5 - 2)
    assert truth_ratio_stat(log_set("forget", **TWO_SAMPLES)) == pytest.approx([math.e, math.exp(-0.5)])


def test_forget_set_metrics():
    metrics = set_metrics(log_set("forget", **TWO_SAMPLES))
    assert metrics["prob"] == pytest.approx((0.5 + 0.25) / 2)
    assert metrics["rougeL"] == pytest.approx(0.75)
    assert metrics["truth_ratio"] == pytest.approx((1 / math.e + math.exp(-0.5)) / 2)  # mean min(r, 1/r)


def test_retain_set_truth_ratio_is_one_minus_inverse_clipped():
    metrics = set_metrics(log_set("retain", **TWO_SAMPLES))
    assert metrics["prob"] == pytest.approx(0.375)
    assert metrics["truth_ratio"] == pytest.approx((1 - 1 / math.e + 0.0) / 2)  # max(0, 1 - 1/r)


def test_held_set_probability_is_the_true_answers_share():
    metrics = set_metrics(log_set("held", **TWO_SAMPLES))
    first = 0.5 / (0.5 + 2 * math.exp(-2))
    second = 0.25 / (0.25 + math.exp(-1) + math.exp(-2))
    assert metrics["prob"] == pytest.approx((first + second) / 2)


def test_model_utility_is_the_harmonic_mean_of_non_forget_metrics():
    per_set = {"f": {"prob": 0.001, "rougeL": 0.001, "truth_ratio": 0.001},
               "r": {"prob": 0.5, "rougeL": 1.0, "truth_ratio": 0.25}, "h": {"prob": 1.0, "rougeL": 0.5,
                                                                           "truth_ratio": 1.0}}
    expected = 6 / (2 + 1 + 4 + 1 + 2 + 1)
    assert model_utility(per_set, {"f": "forget", "r": "retain", "h": "held"}) == pytest.approx(expected)


def test_forget_quality_is_the_ks_p_value():
    # truth-ratio statistics 1, 2, 3 against 4, 5, 6: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    def forget_log(values):
        return {"forget": log_set("forget", [0.0] * 3, [0.0] * 3, [[math.log(v)] for v in values], [1.0] * 3)}

    assert forget_quality(forget_log([1, 2, 3]), forget_log([4, 5, 6])) == pytest.approx(0.1)
    assert forget_quality(forget_log([1, 2, 3]), forget_log([1, 2, 3])) == pytest.approx(1.0)


def test_forget_quality_needs_one_forget_set():
    log = {"r": log_set("retain", **TWO_SAMPLES)}
    with pytest.raises(ValueError, match="exactly one forget set"):
        forget_quality(log, log)


def test_rouge_l_recall():
    """Recall against the reference (precision would give 1 for the first), with TOFU's Porter stemming: "he
    writes books" against "he wrote a book" shares "he" and, stemmed only, "book" (2 of 4 reference tokens, else 1)."""
    scores = rouge_l_recall(["the cat sat", "nothing alike", "he writes books"],
                            ["the cat sat on the mat", "the cat", "he wrote a book"])
    assert scores == pytest.approx([0.5, 0.0, 0.5])


def test_headline_and_table():
    summary = {"sets": {"forget10": {"prob": 0.9, "rougeL": 0.8, "truth_ratio": 0.5}}, "model_utility": 0.6,
               "forget_quality": 1e-9}
    block = headline(summary, "forget10", retain_loss=0.1)
    assert block == {"forget_answer_prob": 0.9, "forget_rougeL": 0.8, "forget_truth_ratio": 0.5,
                     "model_utility": 0.6, "forget_quality": 1e-9, "retain_loss": 0.1}
    table = format_table({"learned": block, "unlearned": {**block, "forget_answer_prob": 0.01}})
    assert "learned" in table and "1.000e-09" in table and "0.0100" in table


def test_plot_training_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "forget_loss": 1 / s, "retain_loss": 0.1, "epsilon": 0.2,
                                         "lambda": 10.0 - s}) for s in (1, 2, 3)))
    plot_training_log(log, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


# --- TOFU's published logs ----------------------------------------------------------------------------------------

def tofu_log(model, split):
    return load_tofu_log(TOFU_LOGS / f"{model}_{split}_eval_log_aggregated.json")


@pytest.mark.parametrize("model", ["llama2-7b", "phi"])
def test_per_sample_statistics_match_the_values_tofu_stored(model):
    """TOFU stored its own per-sample truth ratio (p_perturbed / p_paraphrased, the inverse of our statistic) and the
    summed answer loss with its token count: both agree with what we derive from the per-sample losses."""
    raw = json.loads((TOFU_LOGS / f"{model}_full_eval_log_aggregated.json").read_text())
    log = tofu_log(model, "full")
    for file_name, name in [("eval_log_forget.json", "forget"), ("eval_log.json", "retain")]:
        stored = raw[file_name]
        keys = sorted(stored["truth_ratio"], key=int)
        assert 1 / truth_ratio_stat(log[name]) == pytest.approx([stored["truth_ratio"][k] for k in keys], rel=1e-5)
        per_token = [stored["gt_loss"][k] / stored["num_token_gt"][k] for k in keys]
        assert log[name]["avg_gt_loss"] == pytest.approx(per_token, rel=1e-5)


@pytest.mark.parametrize("model, full_utility, retain_utility, full_forget_quality", [
    ("llama2-7b", 0.622677, 0.613745, 1.834066e-21),
    ("phi", 0.522074, 0.531991, 2.194274e-16),
])
def test_reproduces_tofu_model_utility_and_forget_quality(model, full_utility, retain_utility, full_forget_quality):
    """TOFU's aggregate definitions on its own logs: the fine-tuned ("full") and retain90 models' utility, and the
    forget quality on forget10 of the full model against retain90 (far below 0.05: the full model has not forgotten)
    and of retain90 against itself (1). The Llama-2 utility is the ~0.62-0.63 that TOFU and open-unlearning report for
    the fine-tuned Llama-2-7b-chat."""
    full, retain = tofu_log(model, "full"), tofu_log(model, "retain90")
    full_summary, retain_summary = summarize(full, retain), summarize(retain, retain)
    assert full_summary["model_utility"] == pytest.approx(full_utility, abs=1e-6)
    assert retain_summary["model_utility"] == pytest.approx(retain_utility, abs=1e-6)
    assert full_summary["forget_quality"] == pytest.approx(full_forget_quality, rel=1e-5)
    assert retain_summary["forget_quality"] == 1.0


def planted_log(ratios, paraphrased, spread, retain_ratios):
    """A log whose forget set has the truth-ratio statistics ``ratios``: per sample a paraphrased loss and two
    perturbed losses ``paraphrased + log(r) -/+ spread`` (their mean gives r, either one alone does not); the answer
    losses are all 1 and the retain set holds other statistics, so a forget quality computed from the wrong set or
    field shows."""
    def block(role, values):
        return log_set(role, [1.0] * len(values), list(paraphrased),
                       [[q + math.log(r) - d, q + math.log(r) + d] for r, q, d in zip(values, paraphrased, spread)],
                       [1.0] * len(values))

    return {"forget10": block("forget", ratios), "retain": block("retain", retain_ratios)}


def test_forget_quality_on_planted_truth_ratios_against_a_hand_computed_p_value():
    """The model's forget-set statistics r = 0.2, 0.5, 3, 6, 10 against the retain-only model's 1.5, 2.5, 4, 8, 12:
    merged in order a a b b a b a b a b, the empirical CDFs differ by at most D = 2/5. Under the null all C(10, 5) = 252
    orderings are equally likely and D < 2/5 only for the 2^5 = 32 that never let one sample lead by 2, so the exact
    two-sided p-value is 220/252 = 55/63. Wrong inputs give other values: r folded to min(r, 1/r) (the forget-set truth
    ratio, not the KS input) or the retain set (the same in both logs) or the answer losses give 1, the first perturbed
    loss alone 0.357, the last alone 1, the perturbed losses without the paraphrased one 0.357; D itself is 0.4."""
    model = planted_log([0.2, 0.5, 3.0, 6.0, 10.0], paraphrased=[2.0, 3.0, 0.1, 0.5, 1.0],
                        spread=[0.0, 3.0, 3.0, 3.0, 3.0], retain_ratios=[1.0, 2.0, 3.0, 4.0, 5.0])
    retain_model = planted_log([1.5, 2.5, 4.0, 8.0, 12.0], paraphrased=[0.1, 1.0, 3.0, 2.0, 3.0],
                               spread=[0.0, 3.0, 0.0, 3.0, 3.0], retain_ratios=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert truth_ratio_stat(model["forget10"]) == pytest.approx([0.2, 0.5, 3.0, 6.0, 10.0])
    assert forget_quality(model, retain_model) == pytest.approx(55 / 63, rel=1e-12)
    assert forget_quality(retain_model, model) == pytest.approx(55 / 63, rel=1e-12)  # the test is symmetric
    assert summarize(model, retain_model)["forget_quality"] == pytest.approx(55 / 63, rel=1e-12)
    assert forget_quality(retain_model, retain_model) == 1.0


def test_load_tofu_log_names_a_missing_block(tmp_path):
    path = tmp_path / "log.json"
    path.write_text(json.dumps({"eval_log.json": {}}))
    with pytest.raises(ValueError, match="eval_log_forget.json"):
        load_tofu_log(path)
