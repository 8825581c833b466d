"""benchmarks/unlearning.py: the holdout authors, the aggregation over seeds, the goal line, the table and the
README block (generated from the kept run, benchmarks/unlearning_results.json)."""
import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.unlearning import (BLOCK, RECORD, aggregate, holdout_records, main, meets_goal,  # noqa: E402
                                   parse_overrides, render_readme_block, render_table)


@pytest.fixture(scope="module")
def world_and_tokenizer():
    from ceu.synthetic import build_tokenizer, make_world

    world = make_world()
    return world, build_tokenizer(world)


def test_holdout_authors_are_new_and_in_the_vocabulary(world_and_tokenizer):
    world, tokenizer = world_and_tokenizer
    records = holdout_records(world, 4)
    assert len(records) == 32 and records == holdout_records(world, 4)
    seen_questions = {record["question"] for record in world["full"]}
    seen_answers = {record["answer"] for record in world["full"]}
    assert not seen_questions & {record["question"] for record in records}
    assert not seen_answers & {record["answer"] for record in records}
    for record in records:
        for text in (record["question"], record["answer"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
    assert len(world["forget10"]) == len(records)  # as many as forget10's 4 authors


def run(method, seed, forget_quality, utility_ratio, retain_loss, epsilon=0.02, split="forget10"):
    return {"method": method, "seed": seed, "split": split, "forget_quality": forget_quality,
            "utility_ratio": utility_ratio, "model_utility": 0.6 * utility_ratio, "forget_answer_prob": 0.01,
            "forget_rougeL": 0.2, "retain_loss": retain_loss, "mia_auc": 0.5, "wall_time_s": 10.0,
            "epsilon": epsilon, "within_epsilon": retain_loss <= epsilon}


RUNS = [run("pdu", 0, 0.1, 0.97, 0.01), run("pdu", 1, 0.3, 0.99, 0.015), run("pdu", 2, 0.2, 0.98, 0.012),
        run("npo", 0, 0.5, 0.90, 0.03), run("npo", 1, 0.7, 0.80, 0.01), run("npo", 2, 0.6, 0.85, 0.02)]
REFERENCE = {"forget10": {"learned": {"forget_quality": 1e-11, "utility_ratio": 1.0, "model_utility": 0.6,
                                      "forget_answer_prob": 0.99, "forget_rougeL": 1.0, "retain_loss": 0.001,
                                      "mia_auc": 1.0},
                          "retain-only (gold)": {"forget_quality": 1.0, "utility_ratio": 0.99, "model_utility": 0.59,
                                                 "forget_answer_prob": 0.02, "forget_rougeL": 0.4,
                                                 "retain_loss": 0.001, "mia_auc": 0.5}}}


def test_aggregate_means_sample_std_and_epsilon_count():
    summary = aggregate(RUNS)["forget10"]
    mean, std, n = summary["pdu"]["forget_quality"]
    assert (mean, n) == (pytest.approx(0.2), 3) and std == pytest.approx(0.1)  # sample std of 0.1, 0.3, 0.2
    assert summary["pdu"]["within_epsilon"] == 3 and summary["npo"]["within_epsilon"] == 2
    assert meets_goal(summary["pdu"]) and not meets_goal(summary["npo"])  # npo: utility and ε both miss


def test_table_says_who_meets_the_goal():
    table = render_table({"runs": RUNS, "reference": REFERENCE})
    assert "| pdu | 0.2 ± 0.1 | 0.980 ± 0.010 |" in table
    assert "| npo | 0.6 ± 0.1 | 0.850 ± 0.050 |" in table
    assert table.rstrip().endswith("met by pdu.")
    assert "| *retain-only (gold)* | 1 | 0.990 |" in table
    runs = copy.deepcopy(RUNS)
    runs[1]["retain_loss"], runs[1]["within_epsilon"] = 0.05, False  # one seed of PDU above ε
    assert render_table({"runs": runs, "reference": REFERENCE}).rstrip().endswith("met by no method.")
    assert "2/3" in render_table({"runs": runs, "reference": REFERENCE})


def test_overrides_parse_and_refuse_unknown_fields():
    assert parse_overrides(["epsilon=0.05", "dual_lr=5"]) == {"epsilon": 0.05, "dual_lr": 5.0}
    with pytest.raises(ValueError, match="UnlearnConfig field"):
        parse_overrides(["epsilonn=0.05"])


def test_command_is_reachable_from_the_benchmarks_entry_point(capsys):
    from benchmarks.__main__ import main as benchmarks_main

    with pytest.raises(SystemExit) as exit_:
        benchmarks_main(["unlearning", "--help"])
    assert exit_.value.code == 0 and "--splits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--splits", "forget02"])


@pytest.mark.skipif(not RECORD.is_file(), reason="no unlearning comparison kept yet")
def test_readme_block_is_what_the_kept_run_renders():
    from tools.readme_results import README, block

    record = json.loads(RECORD.read_text())
    assert block(README.read_text(), BLOCK) == render_readme_block(record)
