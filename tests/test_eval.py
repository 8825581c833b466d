"""TOFU metrics of ceu.eval: hand-computed values on a few samples, and the reproduction of TOFU's own published
evaluation logs (tests/fixtures/tofu_legacy: TOFU's files, trimmed to the fields read here; see its README)."""
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ceu.eval import TOFU_LOG_SETS as TOFU_LOG_SETS_NAMES
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


# --- Logs that cannot be scored, or not compared, are refused with the counts ----------------------------------------

def two_set_log(forget_count=3, retain_count=2, **forget_changes):
    forget = log_set("forget", [1.0] * forget_count, [1.0] * forget_count, [[1.5]] * forget_count,
                     [1.0] * forget_count)
    retain = log_set("retain", [0.5] * retain_count, [1.0] * retain_count, [[2.0]] * retain_count,
                     [1.0] * retain_count)
    return {"forget10": forget | forget_changes, "retain": retain}


@pytest.mark.parametrize("log, message", [
    ({}, "has no eval set"),
    ([], "has no eval set"),
    ({"retain": [1.0]}, "eval set 'retain' is list, not an object of fields"),
    (two_set_log(role="forgotten"), "eval set 'forget10' has role 'forgotten', not one of"),
    ({"forget10": {"role": "forget", "avg_gt_loss": [1.0]}}, "eval set 'forget10' has no per-sample list "
                                                            "'avg_paraphrased_loss' \\(fields: role, avg_gt_loss\\)"),
    (two_set_log(0, 2), "eval set 'forget10' has no sample \\(avg_gt_loss 0, avg_paraphrased_loss 0, "
                        "average_perturb_loss 0, rougeL_recall 0\\)"),
    (two_set_log(rougeL_recall=[1.0, 1.0]), "eval set 'forget10' has fields of different lengths \\(avg_gt_loss 3, "
                                            "avg_paraphrased_loss 3, average_perturb_loss 3, rougeL_recall 2\\)"),
    (two_set_log(avg_gt_loss=[1.0, "1.0", 1.0]), "eval set 'forget10' sample 1: avg_gt_loss must be a number, got 1.0"),
    (two_set_log(avg_gt_loss=[1.0, None, 1.0]), "sample 1: avg_gt_loss must be a number, got None"),
    (two_set_log(average_perturb_loss=[[1.0], [], [1.0]]),
     "sample 1: average_perturb_loss must be a non-empty list of numbers, got \\[\\]"),
    (two_set_log(average_perturb_loss=[[1.0], 2.0, [1.0]]),
     "sample 1: average_perturb_loss must be a non-empty list of numbers, got 2.0"),
    (two_set_log(average_perturb_loss=[[1.0], [[2.0]], [1.0]]),
     "sample 1: average_perturb_loss must be a non-empty list of numbers, got \\[\\[2.0\\]\\]"),
    (two_set_log(question=["a", "b"]), "eval set 'forget10' has fields of different lengths .*question 2\\)"),
    (two_set_log(question=[]), "eval set 'forget10' has fields of different lengths .*question 0\\)"),
    (two_set_log(question=5), "eval set 'forget10' has a 'question' field that is not a list of strings"),
    ({"forget10": two_set_log()["forget10"]},
     "has only forget sets \\(forget10\\): model utility needs a retain or held"),
])
def test_summarize_refuses_a_log_it_cannot_score(log, message):
    """Before: an empty log or set gave a NaN utility, fields of different lengths a silently misaligned score."""
    with pytest.raises(ValueError, match=f"^the evaluation log.*{message}"):
        summarize(log)
    with pytest.raises(ValueError, match=f"^the retain-only model's log.*{message}"):
        summarize(two_set_log(), log)


def test_forget_quality_refuses_forget_sets_of_different_sizes_with_the_counts():
    with pytest.raises(ValueError, match="the model's log has 3 forget samples \\(set 'forget10'\\) and the "
                                         "retain-only model's 4 \\(set 'forget05'\\)"):
        forget_quality(two_set_log(3), {"forget05": two_set_log(4)["forget10"]})
    with pytest.raises(ValueError, match="has 3 forget samples"):
        summarize(two_set_log(3), two_set_log(4))


def test_forget_quality_refuses_different_questions_where_both_logs_have_them():
    log, other = two_set_log(question=["a", "b", "c"]), two_set_log(question=["a", "x", "c"])
    with pytest.raises(ValueError, match="forget sample 1 is 'b' in the model's log .* and 'x' in the retain-only"):
        forget_quality(log, other)
    assert forget_quality(log, two_set_log(question=["a", "b", "c"])) == 1.0
    assert forget_quality(log, two_set_log()) == 1.0  # a log without questions (TOFU's) is compared by count


# --- Ragged perturbed answers: every one is scored, TOFU's definitions per sample ------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 8.0), st.floats(0.0, 8.0),
                          st.lists(st.floats(0.0, 8.0), min_size=1, max_size=5)), min_size=1, max_size=6))
def test_ragged_perturbed_answers_are_each_scored(samples):
    """Per sample, however many perturbed answers it has: the truth-ratio statistic from their mean loss, the held
    sets' probability share from the sum of their probabilities (TOFU's definitions, which assume 3 or 5 per sample
    of a set and a rectangular array); reordering a sample's perturbed answers changes nothing."""
    gt, paraphrased, perturbed = (list(column) for column in zip(*samples))
    for role in ("forget", "retain", "held"):
        got = set_metrics(log_set(role, gt, paraphrased, perturbed, [0.5] * len(gt)))
        shuffled = set_metrics(log_set(role, gt, paraphrased, [p[::-1] for p in perturbed], [0.5] * len(gt)))
        assert got == pytest.approx(shuffled, rel=1e-12)
    ratio = [math.exp(sum(p) / len(p) - q) for p, q in zip(perturbed, paraphrased)]
    assert truth_ratio_stat(log_set("forget", gt, paraphrased, perturbed, [0.5] * len(gt))) == pytest.approx(ratio)
    share = [math.exp(-g) / (math.exp(-g) + sum(math.exp(-x) for x in p)) for g, p in zip(gt, perturbed)]
    held = set_metrics(log_set("held", gt, paraphrased, perturbed, [0.5] * len(gt)))
    assert held["prob"] == pytest.approx(sum(share) / len(share), rel=1e-12)


# --- evaluate_model on a tiny model; its logs read back by load_tofu_log -------------------------------------------

@pytest.fixture(scope="module")
def tiny_eval():
    """An untrained tiny Llama over the embedded world's word-level tokenizer, and eval sets whose records have 1, 3
    and 2 perturbed answers."""
    from ceu.synthetic import TEMPLATE, TinyLlama, build_tokenizer, make_world

    world = make_world(n_authors=4)
    tokenizer = build_tokenizer(world)
    model = TinyLlama(hidden_size=16, intermediate_size=32, num_attention_heads=2).build(tokenizer)
    forget = [dict(r, perturbed_answer=r["perturbed_answer"][:count])
              for r, count in zip(world["forget10"][:3], (1, 3, 2))]
    held = [dict(r, perturbed_answer=r["perturbed_answer"][:count])
            for r, count in zip(world["real_authors"][:3], (2, 1, 3))]
    eval_sets = {"forget10": ("forget", forget), "retain": ("retain", world["retain90"][:2]),
                 "real_authors": ("held", held)}
    return model, tokenizer, TEMPLATE, eval_sets


@pytest.fixture(scope="module")
def tiny_log(tiny_eval):
    from ceu.eval import evaluate_model

    model, tokenizer, template, eval_sets = tiny_eval
    return evaluate_model(model, tokenizer, eval_sets, template, batch_size=2, max_new_tokens=3, impl="torch")


def test_evaluate_model_scores_every_perturbed_answer_of_ragged_records(tiny_eval, tiny_log):
    """Before: the first record's count was used for all (extra answers dropped, fewer gave a bare IndexError). Each
    perturbed answer's loss is the one the same model gives that (question, answer) alone."""
    from ceu.eval import average_answer_losses

    model, tokenizer, template, eval_sets = tiny_eval
    log = tiny_log
    for name, (_, records) in eval_sets.items():
        assert [len(losses) for losses in log[name]["average_perturb_loss"]] == [len(r["perturbed_answer"])
                                                                                 for r in records]
        for record, losses in zip(records, log[name]["average_perturb_loss"]):
            alone = average_answer_losses(model, tokenizer, [record["question"]] * len(losses),
                                          record["perturbed_answer"], template, batch_size=1, impl="torch")
            assert losses == pytest.approx(alone, rel=1e-5)
        assert log[name]["question"] == [r["question"] for r in records]
    summary = summarize(log, log)
    assert summary["forget_quality"] == 1.0 and 0 <= summary["model_utility"] < 1  # untrained: ROUGE-L 0, utility 0


def test_ceu_eval_logs_and_tofu_logs_both_load(tiny_log, tmp_path):
    """The eval_log_<model>.json that `ceu unlearn` writes (json.dumps of evaluate_model's log) loads and scores as
    the log itself; TOFU's aggregated logs load as before (their reproduction is tested above)."""
    log = tiny_log
    path = tmp_path / "eval_log_unlearned.json"
    path.write_text(json.dumps(log))
    assert load_tofu_log(path) == log
    assert summarize(load_tofu_log(path), load_tofu_log(path)) == summarize(log, log)
    tofu = tofu_log("phi", "full")
    assert {name: s["role"] for name, s in tofu.items()} == {"forget": "forget", "retain": "retain",
                                                            "real_authors": "held", "world_facts": "held"}
    with pytest.raises(ValueError, match="has 3 forget samples .* and the retain-only model's 300"):
        summarize(log, tofu)  # a different forget set: refused by its size


@pytest.mark.parametrize("change, message", [
    ({"forget10": ("forgotten", [])}, "eval set 'forget10': role must be one of"),
    ({"forget10": ("forget", [])}, "eval set 'forget10' is empty"),
    ({"retain": ("retain", [{"question": "q", "answer": 3, "perturbed_answer": ["x"]}])},
     "eval set 'retain' record 0: 'answer' must be a string, got a number 3"),
    ({"retain": ("retain", [{"question": "q", "answer": "a", "perturbed_answer": ["x"]}, {"question": "q",
                                                                                       "answer": "a"}])},
     "eval set 'retain' record 1: 'perturbed_answer' must be a non-empty list of strings .*got None"),
    ({"retain": ("retain", [{"question": "q", "answer": "a", "perturbed_answer": []}])},
     "record 0: 'perturbed_answer' must be a non-empty list of strings"),
    ({"retain": ("retain", [{"question": "q", "answer": "a", "perturbed_answer": "x"}])},
     "record 0: 'perturbed_answer' must be a non-empty list of strings"),
    ({"retain": ("retain", [{"question": "q", "answer": "a", "perturbed_answer": [["x"]]}])},
     "record 0: 'perturbed_answer' must be a non-empty list of strings"),
    ({"retain": ("retain", [{"question": "q", "answer": "a", "paraphrased_answer": 1, "perturbed_answer": ["x"]}])},
     "record 0: 'paraphrased_answer' must be a string or absent, got 1"),
])
def test_evaluate_model_refuses_bad_records_before_running_the_model(change, message):
    """The checks come first: the model here is a placeholder that fails if anything is asked of it."""
    from ceu.eval import evaluate_model

    eval_sets = {"forget10": ("forget", [{"question": "q", "answer": "a", "perturbed_answer": ["x"]}])} | change
    with pytest.raises(ValueError, match=message):
        evaluate_model(object(), object(), eval_sets)
    with pytest.raises(ValueError, match="eval_sets is empty"):
        evaluate_model(object(), object(), {})


def tofu_block(count=2, **changes):
    fields = {"avg_gt_loss": 1.0, "avg_paraphrased_loss": 1.0, "average_perturb_loss": [1.0, 2.0],
              "rougeL_recall": 0.5}
    block = {field: {str(i): value for i, value in enumerate([value] * count)} for field, value in fields.items()}
    return block | changes


@pytest.mark.parametrize("content, message", [
    ("{", "not a JSON evaluation log \\(Expecting"),
    ("[1, 2]", "is neither TOFU's aggregated evaluation log .* nor ceu's .*found: list"),
    (json.dumps({"blocks": {}, "eval_logs": {}}), "is neither .*found: blocks, eval_logs"),
    (json.dumps({"eval_log.json": {}}), "has no 'eval_log_forget.json' block"),
    (json.dumps(dict.fromkeys(TOFU_LOG_SETS_NAMES, tofu_block()) | {"eval_log.json": tofu_block(
        rougeL_recall={"0": 1.0})}), "block 'eval_log.json' has 1 samples in 'rougeL_recall' and 2 in 'avg_gt_loss'"),
    (json.dumps(dict.fromkeys(TOFU_LOG_SETS_NAMES, tofu_block()) | {"eval_log.json": tofu_block(
        avg_gt_loss={"a": 1.0, "b": 1.0}, avg_paraphrased_loss={"a": 1.0, "b": 1.0},
        average_perturb_loss={"a": [1.0], "b": [1.0]}, rougeL_recall={"a": 1.0, "b": 1.0})}),
     "field 'avg_gt_loss' has sample keys that are not indices: a, b"),
    (json.dumps(dict.fromkeys(TOFU_LOG_SETS_NAMES, tofu_block(0))), "eval set 'forget' has no sample"),
    (json.dumps({"forget10": {"role": "forget"}}), "eval set 'forget10' has no per-sample list 'avg_gt_loss'"),
])
def test_load_tofu_log_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "log.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}:? .*{message}"):
        load_tofu_log(path)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(0, 5) | st.text(max_size=2),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                                       max_size=2), max_leaves=5)
LOG_SETS = st.fixed_dictionaries(
    {"role": st.sampled_from(["forget", "retain", "held", "other"])},
    optional={field: st.lists(st.floats(0, 5) | st.lists(st.floats(0, 5), max_size=2) | JSON_VALUES, max_size=3)
              for field in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall",
                            "question")})


@settings(max_examples=100, deadline=None)
@given(log=st.dictionaries(st.sampled_from(["forget10", "retain", "held"]), LOG_SETS | JSON_VALUES, max_size=3)
       | JSON_VALUES, other=st.dictionaries(st.sampled_from(["forget10", "retain"]), LOG_SETS, max_size=2))
def test_any_log_is_scored_finite_or_refused_with_a_value_error(log, other):
    """Property: whatever the logs hold, summarize refuses them with a ValueError (never a TypeError, KeyError or
    IndexError from a malformed log), or scores them with a finite utility and a p-value (never a NaN from an empty
    set; the losses drawn are finite)."""
    try:
        summary = summarize(log, other)
    except ValueError:
        return
    assert math.isfinite(summary["model_utility"]) and 0 <= summary["forget_quality"] <= 1


# ceu.eval_cache.lookup: the evaluation cache's key, hashed once per run, where the model was loaded.
def _lookup(model, device=None):
    from helpers import FakeTokenizer

    from ceu.data import QATemplate
    from ceu.eval_cache import lookup

    return lookup(model, FakeTokenizer(), QATemplate(), None, [{"input_ids": [1, 2]}], "torch", device)


def test_lookup_hashes_the_model_where_it_is_for_the_device_it_will_run_on(own_cache, monkeypatch):
    """The key names the device the model will be measured on, yet the model is hashed where it was loaded: not
    moved, and no weight copied (a CPU tensor's ``.cpu()`` is itself); a miss, then the entry written under the key."""
    import torch

    from ceu import eval_cache
    from ceu.data import QATemplate
    from helpers import FakeTokenizer, tiny_model

    model = tiny_model("gpt2")
    where = {name: (tensor.device, tensor.data_ptr()) for name, tensor in model.state_dict().items()}
    copies = []
    tensor_cpu = torch.Tensor.cpu
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: (lambda out: copies.append(out is not self) or out)(
            tensor_cpu(self, *a, **k)))
        key, entry = _lookup(model, device="cuda")
    assert copies and not any(copies)
    assert {name: (tensor.device, tensor.data_ptr()) for name, tensor in model.state_dict().items()} == where
    assert entry is None and eval_cache.entry_path(key) == own_cache / "evals" / f"{key}.json"
    arguments = (model, FakeTokenizer(), QATemplate(), None, [{"input_ids": [1, 2]}], "torch")
    assert key == eval_cache.cache_key(*arguments, device=torch.device("cuda"))
    assert key != eval_cache.cache_key(*arguments) == _lookup(model)[0]  # where the model is: the CPU
    eval_cache.write(key, {"forget10": {}}, 1.5)
    assert _lookup(model, device="cuda") == (key, ({"forget10": {}}, 1.5))


class _Config:
    def to_dict(self):
        return {"hidden_size": 4}


def _lookup_on_rank(rank, init_file, results):
    import torch
    import torch.distributed as dist

    from ceu import eval_cache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        hashed = []
        key_of = eval_cache.cache_key
        eval_cache.cache_key = lambda *args, **kwargs: hashed.append(1) or key_of(*args, **kwargs)
        model = torch.nn.Linear(4, 4)  # what the key reads of a model, without loading a transformers model
        model.config = _Config()
        first = _lookup(model)
        if rank == 0:
            eval_cache.write(first[0], None, 2.5)
        dist.barrier()
        results[rank] = (first, _lookup(model), len(hashed))
    finally:
        dist.destroy_process_group()


def test_under_torch_distributed_rank_0_alone_hashes_and_reads_and_every_rank_gets_its_answer(tmp_path, own_cache):
    """Two gloo ranks: rank 0 hashes the model (once per lookup) and reads the cache, rank 1 hashes nothing and
    receives the same key and entry, so both take the same branch: measure on a miss, the entry on a hit."""
    import uuid

    import torch.multiprocessing as mp

    pytest.importorskip("transformers")  # own_cache: the spawned ranks inherit $CEU_CACHE
    results = mp.Manager().dict()
    mp.spawn(_lookup_on_rank, args=(str(tmp_path / f"init-{uuid.uuid4().hex}"), results), nprocs=2)
    (first, second, hashed), (first_1, second_1, hashed_1) = results[0], results[1]
    assert (hashed, hashed_1) == (2, 0)
    assert first == first_1 and first[1] is None
    assert second == second_1 == (first[0], (None, 2.5))
