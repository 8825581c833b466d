"""The ``ceu`` command: help, a tiny end-to-end run on a saved Hugging Face model, and scoring TOFU's logs."""
import json
from pathlib import Path

import pytest

from ceu.cli import main

TOFU_LOGS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tofu_legacy"


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("ceu unlearn", "embedded default", "ceu eval", "epsilon"):
        assert phrase in text
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    assert "--epsilon-alpha" in capsys.readouterr().out


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records))


def test_tiny_unlearn_run_on_a_saved_model_and_tofu_format_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    from ceu.synthetic import TinyLlama, build_tokenizer, make_world

    world = make_world(n_authors=10)
    tokenizer = build_tokenizer(world)
    model_dir, data = tmp_path / "model", tmp_path / "data"
    TinyLlama(hidden_size=16, intermediate_size=32, num_attention_heads=2).build(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.mkdir()
    forget, retain = world["forget10"][:4], world["retain90"][:4]
    for name, records in {"forget10": forget, "retain90": retain, "forget10_perturbed": forget,
                          "retain_perturbed": retain, "real_authors_perturbed": world["real_authors"][:2],
                          "world_facts_perturbed": world["world_facts"][:2]}.items():
        write_jsonl(data / f"{name}.json", records)
    out = tmp_path / "out"
    assert main(["unlearn", "--model", str(model_dir), "--retain-model", str(model_dir), "--data", str(data),
                 "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--epsilon", "10", "--output-dir",
                 str(out), "--no-save-model"]) == 0
    results = json.loads((out / "results.json").read_text())
    for block in ("learned", "unlearned", "retain_model"):
        assert {"forget_answer_prob", "forget_rougeL", "forget_quality", "model_utility", "retain_loss"} \
            <= set(results[block])
    assert results["epsilon"] == 10 and results["steps"] == 2 and "final_lambda" in results
    assert (out / "training.png").is_file() and len((out / "log.jsonl").read_text().splitlines()) == 2
    assert "forget_answer_prob" in capsys.readouterr().out


@pytest.mark.skipif(not TOFU_LOGS.is_dir(), reason="TOFU logs not found")
def test_eval_scores_tofu_logs(capsys):
    assert main(["eval", "--tofu-log", str(TOFU_LOGS / "phi_full_eval_log_aggregated.json"),
                 "--retain-log", str(TOFU_LOGS / "phi_retain90_eval_log_aggregated.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_utility"] == pytest.approx(0.522074, abs=1e-6)
    assert summary["forget_quality"] == pytest.approx(2.194274e-16, rel=1e-5)
