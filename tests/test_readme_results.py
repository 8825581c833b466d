"""The README's figures come from files in the repository, through tools.readme_results: the demo table and headline
from the kept run (tests/fixtures/demo_results.json), the TOFU figures from ceu.eval on TOFU's logs."""
import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.readme_results import (DEMO_RESULTS, README, block, main, render_demo, render_tofu,  # noqa: E402
                                  replace_block, tofu_figures)

RECORD = json.loads(DEMO_RESULTS.read_text())


def test_readme_demo_block_is_what_the_kept_run_renders():
    assert block(README.read_text(), "demo-results") == render_demo(RECORD)


def test_readme_tofu_block_is_what_ceu_computes_on_tofus_logs():
    assert block(README.read_text(), "tofu-reproduction") == render_tofu(tofu_figures())


def test_check_passes_on_the_committed_readme():
    assert main(["--check"]) == 0


def test_kept_run_is_a_demo_results_file():
    """The fields `ceu unlearn` writes and the renderer reads, and the figures quoted in the README's text."""
    results = RECORD["results"]
    assert results["model"] == "embedded tiny Llama" and results["forget_split"] == "forget10"
    for name in ("learned", "unlearned", "retain_model"):
        assert {"forget_answer_prob", "forget_rougeL", "model_utility", "forget_quality", "retain_loss"} \
            <= set(results[name])
    assert {"command", "machine", "software", "date", "git_sha"} <= set(RECORD["provenance"])
    text = README.read_text()
    drop = results["checks"]["forget_answer_prob_drop"]
    assert f"falls {drop:.0f}×" in block(text, "demo-results")
    assert f"instead of {drop:.0f}×" in text  # the cross-machine comparison quotes this run


def test_render_demo_formats_and_headline():
    record = copy.deepcopy(RECORD)
    results = record["results"]
    results["unlearned"].update(forget_answer_prob=0.012345, forget_quality=0.5, retain_loss=0.031)
    results["checks"].update(retain_loss_within_epsilon=False, forget_answer_prob_drop=80.9, model_utility_ratio=0.5)
    results.update(final_lambda=12.34, steps=7, wall_time_s=9.6)
    record["provenance"].update(git_sha="0123456789abcdef", tree=" with uncommitted changes to ceu")
    del record["provenance"]["note"]
    text = render_demo(record)
    assert "| forget answer probability | 0.9989 | 0.0123 | 0.0264 |" in text
    assert "| forget quality | 8.3e-12 | 0.5 | 1.0 |" in text
    assert "| retain loss (ε = 0.02) | 0.0011 | 0.0310 | 0.0013 |" in text
    assert "git 0123456789 with uncommitted changes to ceu; 10 s:" in " ".join(text.split())
    assert ("The answer probability falls 81×, the retain loss ends above ε (final λ 12.3 after 7 steps) and model "
            "utility keeps 0.50 of the learned model's.") in " ".join(text.split())


def test_render_demo_without_a_gold_model():
    record = copy.deepcopy(RECORD)
    del record["results"]["retain_model"]
    for name in ("learned", "unlearned"):
        del record["results"][name]["forget_quality"]
    text = render_demo(record)
    assert "| | learned | unlearned |\n|---|---:|---:|" in text and "forget quality" not in text


def test_replace_block_keeps_the_rest_and_needs_its_markers():
    text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n"
    new = replace_block(text, "x", "new")
    assert new.startswith("a\n<!-- x:begin (") and new.endswith("-->\nnew\n<!-- x:end -->\nb\n")
    assert block(new, "x") == "new" and replace_block(new, "x", "new") == new
    with pytest.raises(ValueError, match="exactly one"):
        replace_block("no markers", "x", "new")
