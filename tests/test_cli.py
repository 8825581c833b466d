"""The ``ceu`` command: help, a tiny end-to-end run on a saved Hugging Face model, and scoring TOFU's logs."""
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import FakeTokenizer, accelerate_launch, launch, torchrun

from ceu.cli import build_parser, main

TOFU_LOGS = Path(__file__).resolve().parent / "fixtures" / "tofu_legacy"  # TOFU's own logs, trimmed (see README)
pytestmark = pytest.mark.usefixtures("own_cache")  # tests/conftest.py: each test's ceu cache in its own folder


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("ceu unlearn", "embedded default", "ceu eval", "epsilon", "ceu finetune", "ceu export-synthetic",
                   "--no-eval-cache"):
        assert phrase in text
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    assert "--epsilon-alpha" in capsys.readouterr().out


def test_unlearn_options_are_generated_from_the_config(tmp_path):
    """Every UnlearnConfig field with an option group (and impl) is an option with the dataclass's choices; unset
    options leave the dataclass default; set ones reach the config."""
    from ceu.cli import _config, build_parser
    from ceu.config import CHOICES, UnlearnConfig, config_fields

    parser = build_parser()
    unlearn = next(action for action in parser._actions if action.dest == "command").choices["unlearn"]
    options = {action.dest: action for action in unlearn._actions}
    for field in config_fields():
        if field.metadata["group"] or field.name == "impl":
            assert field.name in options, field.name
            assert options[field.name].choices in (None, CHOICES.get(field.name)), field.name
    args = parser.parse_args(["unlearn", "--model", "m", "--lr-warmup-ratio", "0.5", "--deterministic",
                              "--lr-schedule", "cosine", "--grad-accum-steps", "3", "--dual-update", "micro_batch"])
    config = _config(args, tmp_path)
    assert (config.lr_warmup_ratio, config.deterministic, config.lr_schedule, config.grad_accum_steps,
            config.dual_update) == (0.5, True, "cosine", 3, "micro_batch")
    assert config.epochs == UnlearnConfig().epochs and config.log_path == str(tmp_path / "log.jsonl")
    with pytest.raises(SystemExit):
        parser.parse_args(["unlearn", "--lr-schedule", "step"])


def test_fsdp_flag_is_refused_with_the_trainer_loop(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--trainer", "hf", "--parallel", "fsdp"])
    assert exit_info.value.code == 2 and "accelerate's config sets up FSDP" in capsys.readouterr().err


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records))


def save_tiny_model(folder, seed: int = 0, scale: float = 1.0):
    """A tiny Llama with the word-level tokenizer of `make_world(10)`, saved to ``folder`` (its weights times
    ``scale``)."""
    pytest.importorskip("transformers")
    from ceu.synthetic import TinyLlama, build_tokenizer, make_world

    tokenizer = build_tokenizer(make_world(n_authors=10))
    model = TinyLlama(hidden_size=16, intermediate_size=32, num_attention_heads=2).build(tokenizer, seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def tiny_job(tmp_path, eval_sets: bool = True) -> list[str]:
    """A tiny saved Llama (:func:`save_tiny_model`, also the retain model) and 4 forget / 4 retain samples of
    `make_world(10)` in TOFU's folder layout: the arguments of `ceu unlearn` on them (without the perturbed splits, no
    TOFU evaluation: faster)."""
    from ceu.synthetic import make_world

    world = make_world(n_authors=10)
    model_dir, data = tmp_path / "model", tmp_path / "data"
    save_tiny_model(model_dir)
    data.mkdir()
    forget, retain = world["forget10"][:4], world["retain90"][:4]
    for name, records in {"forget10": forget, "retain90": retain, "forget10_perturbed": forget,
                          "retain_perturbed": retain, "real_authors_perturbed": world["real_authors"][:2],
                          "world_facts_perturbed": world["world_facts"][:2]}.items():
        if eval_sets or "perturbed" not in name:
            write_jsonl(data / f"{name}.json", records)
    return ["unlearn", "--model", str(model_dir), "--retain-model", str(model_dir), "--data", str(data), "--lr", "1e-3"]


def test_tiny_unlearn_run_on_a_saved_model_and_tofu_format_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*tiny_job(tmp_path), "--epochs", "1", "--batch-size", "2", "--epsilon", "10", "--output-dir",
                 str(out), "--no-save-model"]) == 0
    results = json.loads((out / "results.json").read_text())
    for block in ("learned", "unlearned", "retain_model"):
        assert {"forget_answer_prob", "forget_rougeL", "forget_quality", "model_utility", "retain_loss"} \
            <= set(results[block])
    assert results["epsilon"] == 10 and results["steps"] == 2 and "final_lambda" in results
    assert (out / "training.png").is_file() and len((out / "log.jsonl").read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "forget_answer_prob" in printed
    # 4 forget samples in batches of 2 for 1 epoch, inside the default 5-epoch dual warm-up: said before training
    assert "plan: 2 optimizer steps" in printed and "WARNING: the whole run is inside the dual warm-up" in printed
    assert printed.index("WARNING") < printed.index("unlearning forget10")


def test_a_bad_record_is_named_by_its_file(tmp_path):
    argv = tiny_job(tmp_path, eval_sets=False)
    forget_file = tmp_path / "data" / "forget10.json"
    records = [json.loads(line) for line in forget_file.read_text().splitlines()]
    records[2]["answer"] = 5
    write_jsonl(forget_file, records)
    with pytest.raises(ValueError, match=f"{forget_file} record 2: 'answer' must be a string"):
        main([*argv, "--epochs", "1", "--output-dir", str(tmp_path / "out"), "--no-save-model"])


def test_eval_scores_tofu_logs(capsys):
    assert main(["eval", "--tofu-log", str(TOFU_LOGS / "phi_full_eval_log_aggregated.json"),
                 "--retain-log", str(TOFU_LOGS / "phi_retain90_eval_log_aggregated.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_utility"] == pytest.approx(0.522074, abs=1e-6)
    assert summary["forget_quality"] == pytest.approx(2.194274e-16, rel=1e-5)


def test_resume_from_a_checkpoint_on_the_command_line(tmp_path, capsys):
    job = [*tiny_job(tmp_path), "--epochs", "2", "--batch-size", "2", "--epsilon", "0", "--lambda-init", "1",
           "--dual-warmup-epochs", "0", "--no-save-model", "--deterministic"]
    checkpoints = tmp_path / "checkpoints"
    assert main([*job, "--output-dir", str(tmp_path / "full"), "--checkpoint-dir", str(checkpoints),
                 "--checkpoint-every", "1"]) == 0
    assert main([*job, "--output-dir", str(tmp_path / "resumed"), "--resume-from",
                 str(checkpoints / "step-000002.pt")]) == 0
    full, resumed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("full", "resumed"))
    assert full["steps"] == resumed["steps"] == 4 and len(list(checkpoints.glob("step-*.pt"))) == 4
    assert resumed["final_lambda"] == full["final_lambda"] != 1.0
    assert resumed["unlearned"]["retain_loss"] == full["unlearned"]["retain_loss"]
    # changed settings are refused before any model loads, each named: the checkpoint holds lr 1e-3, epsilon 0
    with pytest.raises(SystemExit) as exit_info:
        main([*job, "--lr", "2e-3", "--epsilon", "0.1", "--output-dir", str(tmp_path / "resumed"), "--resume-from",
              str(checkpoints / "step-000002.pt")])
    assert exit_info.value.code == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "lr 0.001 (checkpoint) != 0.002 (now)" in error and "epsilon 0.0 (checkpoint) != 0.1 (now)" in error


def launched_job(tmp_path, eval_sets: bool = True, *loop_options: str) -> list[str]:
    """:func:`tiny_job` with the settings of the launched runs: 2 epochs, lambda moving from the first step."""
    return [*tiny_job(tmp_path, eval_sets), *loop_options, "--epochs", "2", "--epsilon", "0", "--lambda-init", "1",
            "--dual-warmup-epochs", "0"]


def launch_ceu(launcher: list[str], job: list[str], out_dir: Path, *extra: str) -> str:
    """`ceu` on ``job`` under ``launcher`` (two ranks, one sample each per micro-batch), into ``out_dir``: its
    output."""
    return launch([*launcher, "-m", "ceu", *job, "--batch-size", "1", "--threads", "1", "--output-dir", str(out_dir),
                   *extra], out_dir.parent)


def assert_matches_one_process(printed: str, job: list[str], tmp_path, launched: str = "two") -> dict:
    """The run launched into ``tmp_path``/``launched`` (its output ``printed``) against one process running ``job``
    with the global batch of 2 (``tmp_path``/one): rank 0 alone reported; the same steps, λ trajectory, retain loss
    after unlearning and saved model (gathered from FSDP shards or ZeRO-3 partitions, or a replica), which moved away
    from the learned one. Returns the launched run's results."""
    assert "on 2 ranks" in printed and printed.count("results, log, plot and model in") == 1
    assert main([*job, "--batch-size", "2", "--output-dir", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / name / "results.json").read_text()) for name in (launched, "one"))
    assert two["steps"] == one["steps"] == 4
    assert two["final_lambda"] == pytest.approx(one["final_lambda"], rel=1e-5) and one["final_lambda"] > 50
    assert two["unlearned"]["retain_loss"] == pytest.approx(one["unlearned"]["retain_loss"], rel=1e-5)
    two_log, one_log = ([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                        for name in (launched, "one"))
    assert [line["step"] for line in two_log] == [1, 2, 3, 4]  # one writer
    assert [line["lambda"] for line in two_log] == pytest.approx([line["lambda"] for line in one_log], rel=1e-5)
    from transformers import AutoModelForCausalLM

    learned, two_ranks, one_process = (AutoModelForCausalLM.from_pretrained(path).state_dict()
                                       for path in (tmp_path / "model", tmp_path / launched / "model",
                                                    tmp_path / "one" / "model"))
    assert max((one_process[name] - learned[name]).abs().max() for name in learned) > 1e-3
    assert two_ranks.keys() == one_process.keys()
    for name, value in one_process.items():
        torch.testing.assert_close(two_ranks[name], value, rtol=1e-4, atol=5e-5)
    return two


LAUNCHES = {  # the README's multi-GPU commands on two CPU processes: launcher, loop options
    "torchrun-ddp": (torchrun, ["--parallel", "ddp"]),
    "torchrun-fsdp": (torchrun, ["--parallel", "fsdp"]),
    "accelerate-trainer": (accelerate_launch, ["--trainer", "hf"]),
}


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_two_launched_processes_match_one_process_with_the_global_batch(tmp_path, name):
    """Each rank takes its share of every global micro-batch (torchrun: ceu's plan; accelerate: Trainer's sampler),
    the losses are the global micro-batch's token-means although the ranks' answer-token counts differ, and λ steps
    from the all-reduced retain loss: the saved model (gathered from the FSDP shards, or a replica) and the λ
    trajectory equal those of one process with the same loop taking both ranks' samples at once. (The same under a
    DeepSpeed ZeRO-3 launch: tests/test_zero3.py.)"""
    launcher, loop_options = LAUNCHES[name]
    if launcher is accelerate_launch:
        pytest.importorskip("accelerate")
    job = launched_job(tmp_path, True, *loop_options)
    assert_matches_one_process(launch_ceu(launcher(), job, tmp_path / "two"), job, tmp_path)


# Issue 12: what `ceu unlearn` refuses before it loads or evaluates anything, each naming the option (or file).
@pytest.fixture
def nothing_may_load(monkeypatch):
    """A refusal must come before the minutes of loading, training and evaluating: building the job fails the test."""
    monkeypatch.setattr("ceu.cli.Job.__init__", lambda *args: pytest.fail("the job started before the refusal"))


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "x"], "--data: need --model"),
    (["--forget-split", "forget01", "--retain-split", "retain99"], "--forget-split, --retain-split: need --model"),
    (["--retain-model", "m", "--tokenizer", "t"], "--tokenizer, --retain-model: need --model"),
    (["--text"], "--text: need --model"), (["--chat-template"], "--chat-template: need --model"),
    (["--model", "./no/such/model"], "--model: no such model file or folder: ./no/such/model"),
    (["--model", "~/no-such-model"], "--model ~/no-such-model: no such file or folder"),
    (["--model", "tests/no-such-model"], "--model tests/no-such-model: no such file or folder"),
    (["--model", "tests", "--retain-model", "/no/retain"], "--model: tests has neither a config.json"),
    (["--epsilon", "0.3", "--epsilon-alpha", "0.1"], "--epsilon and --epsilon-alpha both set the bound"),
    (["--lr", "nan"], "argument --lr: lr must be finite, got nan"),
    (["--epochs", "inf"], "argument --epochs: epochs must be finite"),
    (["--epochs", "0"], "argument --epochs: epochs must be > 0"),
    (["--lr=-1e-5"], "argument --lr: lr must be >= 0"),
    (["--epsilon=-0.1"], "argument --epsilon: epsilon must be >= 0"),
    (["--lambda-init=-inf"], "argument --lambda-init: lambda_init must be finite"),
    (["--lr-warmup-ratio", "1.5"], r"argument --lr-warmup-ratio: lr_warmup_ratio must be in [0, 1]"),
    (["--dual-warmup-epochs", "nan"], "argument --dual-warmup-epochs: dual_warmup_epochs must be finite"),
    (["--forget-weight=-1"], "argument --forget-weight: forget_weight must be >= 0"),
    (["--batch-size", "0"], "argument --batch-size: batch_size must be >= 1"),
    (["--checkpoint-every", "2"], "argument --checkpoint-every: checkpoint_every needs a checkpoint_dir"),
    (["--max-length", "0"], "argument --max-length: must be an integer >= 1, got 0"),
    (["--max-length=-5"], "argument --max-length: must be an integer >= 1"),
    (["--max-length", "1"], "argument --max-length: max_length must be an int >= 2"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["--lora-rank", "0"], "argument --lora-rank: must be an integer >= 1"),
    (["--overwrite", "--resume-from", "x.pt"], "--overwrite starts afresh and --resume-from continues a run"),
    (["--resume-from", "{tmp}/none.pt"], "checkpoint {tmp}/none.pt: no such checkpoint file"),
    (["--resume-from", "{tmp}/empty.pt"], "checkpoint {tmp}/empty.pt is empty"),
    (["--resume-from", "{tmp}/log.txt"], "checkpoint {tmp}/log.txt is not a checkpoint"),
    (["--resume-from", "{tmp}"], "is a folder; ceu's loop resumes from a checkpoint file"),
    (["--trainer", "hf", "--resume-from", "{tmp}/none"], "no such Trainer checkpoint folder"),
    (["--output-dir", "{tmp}/log.txt"], "--output-dir {tmp}/log.txt is a file, not a folder"),
    (["--output-dir", "{tmp}/log.txt/sub"], "--output-dir {tmp}/log.txt/sub is not writable"),
    (["--output-dir", "{tmp}"], "--output-dir {tmp} is not empty (earlier, empty.pt, log.txt): pass --overwrite"),
    (["--checkpoint-dir", "{tmp}/earlier", "--checkpoint-every", "1", "--output-dir", "{tmp}/new"],
     "--checkpoint-dir {tmp}/earlier holds an earlier run's checkpoints (step-000002.pt, ...)"),
])
def test_invalid_arguments_are_refused_before_anything_loads(tmp_path, capsys, nothing_may_load, argv, message):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "log.txt").write_text("not a checkpoint")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for step in (1, 2):
        (earlier / f"step-00000{step}.pt").write_bytes(b"checkpoint")
    argv = [argument.format(tmp=tmp_path) for argument in argv]
    error = refused(["unlearn", *argv], capsys)
    assert message.format(tmp=tmp_path) in error, error


def test_every_option_says_its_default_in_help(capsys):
    """Every option that takes a value says its default (flags are off unless given); config options also say the
    embedded default's own value where it has one."""
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.nargs != 0:
                assert "default" in action.help, f"ceu {name} {action.option_strings[0]}: {action.help}"
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10.0; embedded default: 30.0)" in text and "--overwrite" in text
    assert "(default: locuslab/TOFU)" in text


def test_a_fresh_run_refuses_an_earlier_runs_folder_and_overwrite_replaces_it(tmp_path, capsys):
    """Running twice into one --output-dir: refused without --overwrite (the earlier results and log untouched);
    with it, the earlier run's files are deleted first, so nothing of it is left to pass for the new run's (here its
    saved model and the retain model's eval log, which the second run does not write)."""
    out = tmp_path / "out"
    job = [*tiny_job(tmp_path, eval_sets=False), "--batch-size", "4", "--epsilon", "10", "--output-dir", str(out)]
    assert main([*job, "--epochs", "1"]) == 0
    (out / "eval_log_retain_model.json").write_text("{}")  # as a run with TOFU's eval sets would have left it
    earlier = {name: (out / name).read_bytes() for name in ("results.json", "log.jsonl")}
    assert (out / "model" / "config.json").is_file()
    again = [*job, "--epochs", "2", "--no-save-model"]
    error = " ".join(refused(again, capsys).split())
    assert f"--output-dir {out} is not empty (eval_log_retain_model.json, log.jsonl, model, results.json, " \
           "training.png): pass --overwrite" in error
    assert {name: (out / name).read_bytes() for name in earlier} == earlier
    assert main([*again, "--overwrite"]) == 0
    assert "--overwrite: deleting the earlier run's" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "results.json", "training.png"]
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_eval_refuses_a_retain_log_without_a_tofu_log(tmp_path, capsys, nothing_may_load):
    error = refused(["eval", "--retain-log", str(tmp_path / "retain.json"), "--output-dir", str(tmp_path)], capsys)
    assert "--retain-log scores a --tofu-log: give both" in error, error


def test_eval_refuses_to_replace_an_earlier_eval_json(tmp_path, capsys, nothing_may_load):
    (tmp_path / "eval.json").write_text('{"blocks": {}}')
    error = refused(["eval", "--output-dir", str(tmp_path)], capsys)
    assert f"--output-dir {tmp_path} already holds an eval.json: pass --overwrite" in " ".join(error.split())
    assert (tmp_path / "eval.json").read_text() == '{"blocks": {}}'


# Issue 17 §3: the evaluation cache, the plan warning, `ceu finetune` and `ceu export-synthetic`.
def test_learned_and_retain_evaluations_are_cached_by_weights_and_data(tmp_path, capsys, monkeypatch, own_cache):
    """A second run reuses the learned and retain-only models' evaluations (the unlearned model is always measured);
    new weights under the same path, changed eval data or --no-eval-cache measure again."""
    import ceu.eval

    calls = []
    evaluate = ceu.eval.evaluate_model
    monkeypatch.setattr("ceu.eval.evaluate_model", lambda *args, **kwargs: calls.append(1) or evaluate(*args,
                                                                                                       **kwargs))
    argv = tiny_job(tmp_path)
    save_tiny_model(tmp_path / "retain", seed=1)
    argv[argv.index("--retain-model") + 1] = str(tmp_path / "retain")

    def run(name, *extra) -> tuple[int, str, dict]:
        calls.clear()
        assert main([*argv, "--epochs", "1", "--batch-size", "2", "--epsilon", "10", "--no-save-model",
                     "--output-dir", str(tmp_path / name), *extra]) == 0
        return len(calls), capsys.readouterr().out, json.loads((tmp_path / name / "results.json").read_text())

    evaluations, printed, first = run("first")
    assert evaluations == 3 and "using its cached evaluation" not in printed
    assert len(list((own_cache / "evals").glob("*.json"))) == 2  # learned and retain-only, not the unlearned model
    evaluations, printed, again = run("again")
    assert evaluations == 1 and printed.count("using its cached evaluation") == 2
    assert again["learned"] == first["learned"] and again["retain_model"] == first["retain_model"]
    assert run("uncached", "--no-eval-cache")[0] == 3
    save_tiny_model(tmp_path / "model", seed=0, scale=0.5)  # other weights, same folder and file names
    evaluations, printed, retrained = run("retrained")
    assert evaluations == 2 and printed.count("using its cached evaluation") == 1
    assert retrained["learned"]["retain_loss"] != first["learned"]["retain_loss"]
    perturbed = tmp_path / "data" / "retain_perturbed.json"
    records = [json.loads(line) for line in perturbed.read_text().splitlines()]
    records[0]["perturbed_answer"] = records[1]["perturbed_answer"]
    write_jsonl(perturbed, records)
    assert run("new-data")[0] == 3


def test_the_cache_key_reads_a_tied_weight_once_and_still_sees_it_change():
    """GPT-2's head shares the embedding's tensor: its bytes enter the key once (the second name points to the
    first), and a change to the shared tensor still changes the key."""
    from ceu.data import QATemplate
    from ceu.eval_cache import cache_key
    from helpers import tiny_model

    model = tiny_model("gpt2")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    reads = []
    tensor_cpu = torch.Tensor.cpu
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: reads.append(self.data_ptr()) or tensor_cpu(self))
        key = cache_key(model, FakeTokenizer(), QATemplate(), None, [], "torch")
    assert len(reads) == len(set(reads)) == len({t.data_ptr() for t in model.state_dict().values()})
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert cache_key(model, FakeTokenizer(), QATemplate(), None, [], "torch") != key


def test_the_plan_warns_when_lambda_barely_moves():
    from ceu.cli import MIN_DUAL_STEPS, plan_lines
    from ceu.config import UnlearnConfig

    tofu = UnlearnConfig()  # the PDU authors' TOFU settings: 10 epochs, batch 4, lambda held for 5 epochs
    assert plan_lines(40, tofu) == ["plan: 100 optimizer steps (10 epochs of 10: 40 forget samples, batch 4, 1 "
                                    "micro-batch(es) per step), lambda held at lambda_0 = 100 for the first 50"]
    plan, warning = plan_lines(4, tofu)
    assert plan.startswith("plan: 10 optimizer steps") and plan.endswith("for the first 5")
    assert warning.startswith(f"WARNING: only 5 optimizer steps after the dual warm-up (fewer than {MIN_DUAL_STEPS})")
    assert "--epochs 25 gives 20+" in warning and "--batch-size" in warning
    assert len(plan_lines(4, UnlearnConfig(epochs=25))) == 1  # the suggestion is enough
    assert len(plan_lines(4, UnlearnConfig(epochs=24))) == 2
    held = plan_lines(8, UnlearnConfig(epochs=3, batch_size=4, grad_accum_steps=2), world_size=2)
    assert held[0].startswith("plan: 3 optimizer steps (3 epochs of 1: 8 forget samples, batch 4 x 2 ranks")
    assert "the whole run is inside the dual warm-up, so lambda never moves" in held[1]


def test_export_synthetic_then_finetune_on_it(tmp_path, capsys):
    """`ceu export-synthetic` writes a --data folder; `ceu finetune` trains a saved model on splits of it and saves
    model and tokenizer as a folder `ceu unlearn --model` loads; a second run needs --overwrite."""
    from ceu.data import load_records, records_name, tokenize_qa
    from ceu.heads import dataset_loss
    from ceu.models import load_model, load_tokenizer
    from ceu.synthetic import EVAL_SPLITS, TOFU_FIELDS, make_world

    data = tmp_path / "data"
    assert main(["export-synthetic", "--output-dir", str(data), "--authors", "10", "--seed", "0"]) == 0
    world = make_world(10, 0)
    for split in ("full", "forget10", "retain90", "forget10_perturbed", "world_facts_perturbed"):
        assert len(load_records(str(data), split)) > 0
    assert list(load_records(str(data), "forget10")) == [{k: r[k] for k in TOFU_FIELDS} for r in world["forget10"]]
    assert f"wrote {len(world) + len(EVAL_SPLITS)} splits" in capsys.readouterr().out
    assert "not empty" in refused(["export-synthetic", "--output-dir", str(data)], capsys)
    assert main(["export-synthetic", "--output-dir", str(data), "--authors", "12", "--overwrite"]) == 0
    assert len(load_records(str(data), "full")) == 12 * 8
    for authors in ("1", "129"):
        assert "argument --authors: the synthetic world has 2 to 128 authors" in refused(
            ["export-synthetic", "--output-dir", str(tmp_path / "x"), "--authors", authors], capsys)

    model_dir, out = tmp_path / "model", tmp_path / "tuned"
    assert main(["export-synthetic", "--output-dir", str(data), "--authors", "10", "--overwrite"]) == 0
    save_tiny_model(model_dir, seed=0)
    job = ["finetune", "--model", str(model_dir), "--data", str(data), "--split", "forget10", "--split", "retain90",
           "--epochs", "2", "--lr", "1e-2", "--batch-size", "16", "--output-dir", str(out)]
    assert main(job) == 0
    record = json.loads((out / "finetune.json").read_text())
    assert record["samples"] == 80 and record["splits"] == ["forget10", "retain90"] and record["epochs"] == 2
    tokenizer = load_tokenizer(out)
    samples = tokenize_qa(load_records(str(data), "forget10"), tokenizer, where=records_name(str(data), "forget10"))
    before, after = (dataset_loss(load_model(path), samples, tokenizer.pad_token_id) for path in (model_dir, out))
    assert after < before - 0.5, (before, after)
    assert f"model and tokenizer saved in {out}/" in capsys.readouterr().out
    error = " ".join(refused(job, capsys).split())
    assert f"--output-dir {out} is not empty" in error and "pass --overwrite to replace the model saved there" in error
    assert main([*job, "--epochs", "1", "--overwrite"]) == 0
    assert json.loads((out / "finetune.json").read_text())["epochs"] == 1
    assert "holds no config.json" in refused([*job[:-1], str(data), "--overwrite"], capsys)
    # the training options are checked as UnlearnConfig's fields of the same name (ceu.config.RANGES)
    assert "argument --lr: lr must be >= 0, got -1.0" in refused([*job, "--lr=-1"], capsys)
    assert "argument --epochs: epochs must be > 0, got 0" in refused([*job, "--epochs", "0"], capsys)
    assert "argument --batch-size: batch_size must be an integer, got '2.5'" in refused([*job, "--batch-size", "2.5"],
                                                                                        capsys)


def test_finetune_refuses_a_launcher(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank would train its own copy and write the same folder: refused before loading."""
    save_tiny_model(tmp_path / "model", seed=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "ceu finetune runs in one process, not under a launcher (2 processes here)" in refused(
        ["finetune", "--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_the_real_demo_fine_tunes_through_ceu_finetune(tmp_path, monkeypatch):
    """tools/real_demo.py's fine-tuning is `ceu finetune` (one loop, one way of saving): its options reach the
    command (the training itself stubbed, a tiny saved model standing in for SmolLM2's GGUF file)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from tools import real_demo

    from ceu import cli

    save_tiny_model(tmp_path / "model", seed=0)
    monkeypatch.setattr("ceu.models.smollm2_gguf", lambda: tmp_path / "model")
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # --threads 1 must not slow later tests
    seen = []
    monkeypatch.setattr(cli, "run_finetune", lambda args: seen.append(args) or 0)
    real_demo.fine_tune(tmp_path / "learned", "full", tmp_path / "data", threads=1)
    (args,) = seen
    assert args.split == ["full", *real_demo.HELD] and args.model == str(tmp_path / "model")
    assert args.system_prompt == "" and (args.epochs, args.lr, args.batch_size) == (4, 3e-4, 8)


def test_the_real_demo_reuses_a_fine_tuned_folder_only_with_its_settings_and_data(tmp_path, monkeypatch, capsys):
    """A folder holding a model is reused when its finetune.json records the settings the demo would fine-tune with,
    the digest of the records it trains on among them; otherwise it is fine-tuned again (--overwrite), the reason on
    stderr: no or an unreadable finetune.json, another setting (named, with both values), other data (whatever the
    files' times). `ceu finetune` itself is stubbed."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from tools import real_demo

    from ceu import cli
    from ceu.synthetic import export_world, make_world

    monkeypatch.setattr("ceu.models.smollm2_gguf", lambda: tmp_path / "smollm2.gguf")
    runs = []
    monkeypatch.setattr(cli, "main", lambda argv: runs.append(argv) or 0)
    data, folder = tmp_path / "data", tmp_path / "learned"
    def demo_world(seed: int) -> dict:
        world = make_world(real_demo.N_AUTHORS, seed)
        return {**world, **{split: world[split][:count] for split, count in real_demo.HELD.items()}}

    export_world(data, demo_world(real_demo.SEED))

    def fine_tune() -> tuple[int, str]:
        """Fine-tunes run (0 or 1) and the reason given on stderr (datasets' progress bars left out)."""
        runs.clear()
        real_demo.fine_tune(folder, "full", data, threads=1, say=print)
        return len(runs), "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                                  if line.startswith("fine-tuning"))

    assert fine_tune() == (1, "") and "--overwrite" not in runs[0]  # nothing saved yet
    argv = real_demo.finetune_argv(folder, "full", data, threads=1)
    assert runs[0] == argv
    args = build_parser().parse_args(argv)
    settings = cli.finetune_settings(args, cli.finetune_records(args))  # what ceu finetune records of them
    digest = settings.pop("data_sha256")
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert settings == {"model": str(tmp_path / "smollm2.gguf"), "data": str(data),
                        "splits": ["full", *real_demo.HELD], "template": {"chat": True, "system_prompt": ""},
                        "max_length": 512, "epochs": 4, "lr": 3e-4, "batch_size": 8, "seed": 0}
    settings["data_sha256"] = digest
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    runs_again, why = fine_tune()
    assert runs_again == 1 and runs[0] == [*argv, "--overwrite"] and "holds no finetune.json" in why
    record = folder / "finetune.json"
    record.write_text(json.dumps({**settings, "final_loss": 0.1, "wall_time_s": 60.0}))  # as ceu finetune saves it
    assert fine_tune() == (0, "")
    with monkeypatch.context() as patch:
        patch.setattr(real_demo, "FIT", ["--epochs", "5", "--lr", "3e-4", "--batch-size", "8"])
        runs_again, why = fine_tune()
    assert runs_again == 1 and "records other settings: epochs 4 (this run: 5)" in why
    record.write_text(json.dumps({**settings, "data": "elsewhere", "max_length": None}))
    runs_again, why = fine_tune()
    assert runs_again == 1 and "data 'elsewhere' (this run: " in why and "max_length None (this run: 512)" in why
    record.write_text(json.dumps({key: value for key, value in settings.items() if key != "seed"}))
    assert "seed not recorded (this run: 0)" in fine_tune()[1]
    record.write_text("{cut sh")
    assert "its finetune.json is unreadable" in fine_tune()[1]
    record.write_text(json.dumps(settings))
    export_world(data, demo_world(real_demo.SEED))  # the same records written again: still reused
    assert fine_tune() == (0, "")
    saved = record.stat().st_mtime_ns
    for path in export_world(data, demo_world(real_demo.SEED + 1)):  # other facts, as many, from an older copy
        os.utime(path, ns=(saved - 3600 * 10**9,) * 2)
    runs_again, why = fine_tune()
    assert runs_again == 1 and f"data_sha256 {digest!r} (this run: " in why
