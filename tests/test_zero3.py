"""DeepSpeed ZeRO-3 through ``accelerate launch`` (open-unlearning's default launch), two CPU processes over gloo:
``PrimalDualTrainer`` (``--trainer hf``) and a ``ceu.patch_causal_lm``-patched ``transformers.Trainer`` train as one
plain process does on the same global batches, as do ``unlearn_with_trainer`` (the model it hands back) and the
``ceu.pdu_objective`` Trainer subclass of examples/, and the whole ``ceu unlearn --trainer hf`` command. ZeRO-3
partitions the LM head outside its module's forward; the fused losses read it through
:func:`ceu.zero3.gathered_lm_head`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, tiny_model

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed", reason="deepspeed is not installed: the ZeRO-3 launch cannot run")
import zero3_script as script  # noqa: E402 (after the skips)
from test_accelerate_launch import free_port  # noqa: E402
from test_cli import tiny_job  # noqa: E402

from ceu.cli import main  # noqa: E402

SCRIPT = Path(script.__file__).resolve()
ROOT = SCRIPT.parent.parent
DEEPSPEED_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    # every parameter partitioned, however small (the default keeps tensors under 1e5 elements whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,  # Trainer's SGD
}


def accelerate_config(tmp_path: Path, zero3_init: bool = False) -> Path:
    (tmp_path / "deepspeed.json").write_text(json.dumps(DEEPSPEED_CONFIG))
    path = tmp_path / "accelerate.yaml"
    path.write_text("\n".join([
        "compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED", "deepspeed_config:",
        f"  deepspeed_config_file: {tmp_path / 'deepspeed.json'}", f"  zero3_init_flag: {str(zero3_init).lower()}",
        "num_machines: 1", "num_processes: 2", "use_cpu: true", "machine_rank: 0",
        "rdzv_backend: static", "same_network: true", ""]))
    return path


def test_zero3_launch_trains_as_one_plain_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(tmp_path)),
               "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = torch.load(tmp_path / "zero3.pt")
    assert (result["world_size"], result["engine"], result["head_numel"]) == (2, "DeepSpeedEngine", [0, 0])

    # one plain process, the whole data set per step: what the two ZeRO-3 ranks must reproduce
    pdu = script.pdu_trainer(script.arguments(tmp_path / "plain_pdu", script.SAMPLES,
                                              num_train_epochs=script.STEPS), tiny_model("gpt2"))
    pdu.train()
    assert result["pdu_lambda"] == pytest.approx(pdu.primal_dual.lam.item(), rel=1e-5)
    assert result["pdu_lambda"] != script.PDU["lambda_init"]
    assert_close("pdu retain losses", torch.tensor(result["pdu_retain_losses"]),
                 torch.tensor(script.losses(pdu, "retain_loss")), torch.float32)
    weights = torch.cat([p.detach().flatten() for p in pdu.model.parameters()])
    assert not torch.equal(weights, torch.cat([p.detach().flatten() for p in tiny_model("gpt2").parameters()]))
    assert_close("pdu weights", result["pdu_weights"], weights, torch.float32)

    phi = tiny_model("phi")
    sft = script.sft_trainer(script.arguments(tmp_path / "plain_sft", script.SAMPLES, max_steps=script.STEPS), phi)
    sft.train()
    assert_close("sft losses", torch.tensor(result["sft_losses"]), torch.tensor(script.losses(sft, "loss")),
                 torch.float32)
    assert_close("sft weights", result["sft_weights"], torch.cat([p.detach().flatten() for p in phi.parameters()]),
                 torch.float32)

    # unlearn_with_trainer (ceu unlearn --trainer hf) hands the model back whole, for evaluation and saving
    assert result["unlearn_plain"]
    model, retain_loss = script.unlearn_run(tmp_path / "plain_unlearn", script.SAMPLES)
    assert_close("unlearned weights", result["unlearn_weights"],
                 torch.cat([p.detach().flatten() for p in model.parameters()]), torch.float32)
    assert result["unlearn_retain_loss"] == pytest.approx(retain_loss, rel=1e-5)

    # ceu.pdu_objective in a Trainer subclass (examples/pdu_hf_trainer.py)
    example_lambda, example_model = script.example_run(tmp_path / "plain_example", script.SAMPLES)
    assert result["example_lambda"] == pytest.approx(example_lambda, rel=1e-5)
    assert example_lambda != script.PDU["lambda_init"]
    assert_close("example weights", result["example_weights"],
                 torch.cat([p.detach().flatten() for p in example_model.parameters()]), torch.float32)


def test_ceu_unlearn_trainer_hf_under_zero3_matches_one_process_and_resumes(tmp_path, monkeypatch):
    """The whole command under a ZeRO-3 launch, with ``zero3_init_flag`` on as usual configs have it: rank 0 alone
    prints the report and writes the results, the log and the model, saved whole from the partitions, and they equal
    one plain ``--trainer hf`` process's with the global batch. Its Trainer checkpoint (DeepSpeed's partitioned
    states and λ) resumes, under the same launch, to the same model bitwise."""
    monkeypatch.setenv("CEU_CACHE", str(tmp_path / "cache"))  # the launched ranks inherit it
    config = accelerate_config(tmp_path, zero3_init=True)
    job = [*tiny_job(tmp_path, eval_sets=False), "--trainer", "hf", "--epochs", "2", "--epsilon", "0",
           "--lambda-init", "1", "--dual-warmup-epochs", "0"]
    checkpoints = tmp_path / "checkpoints"

    def launch(name: str, *extra: str) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--main_process_port", str(free_port()), "-m", "ceu", *job, "--batch-size", "1", "--threads", "1",
                   "--output-dir", str(tmp_path / name), *extra]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        return done.stdout

    printed = launch("two", "--checkpoint-every", "2", "--checkpoint-dir", str(checkpoints))
    assert "on 2 ranks (Trainer)" in printed
    assert printed.count("evaluation skipped") == printed.count("results, log, plot and model in") == 1
    assert main([*job, "--batch-size", "2", "--output-dir", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("two", "one"))
    assert two["steps"] == one["steps"] == 4
    assert two["final_lambda"] == pytest.approx(one["final_lambda"], rel=1e-5) and one["final_lambda"] > 50
    assert two["unlearned"]["retain_loss"] == pytest.approx(one["unlearned"]["retain_loss"], rel=1e-5)
    two_log, one_log = ([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                        for name in ("two", "one"))
    assert [line["step"] for line in two_log] == [1, 2, 3, 4]  # one writer
    assert [line["lambda"] for line in two_log] == pytest.approx([line["lambda"] for line in one_log], rel=1e-5)
    from transformers import AutoModelForCausalLM

    learned, two_ranks, one_process = (AutoModelForCausalLM.from_pretrained(path).state_dict()
                                       for path in (tmp_path / "model", tmp_path / "two" / "model",
                                                    tmp_path / "one" / "model"))
    assert max((one_process[name] - learned[name]).abs().max() for name in learned) > 1e-3
    assert two_ranks.keys() == one_process.keys()
    for name, value in one_process.items():
        torch.testing.assert_close(two_ranks[name], value, rtol=1e-4, atol=5e-5)

    first = checkpoints / "checkpoint-2"
    assert (first / "primal_dual.pt").is_file() and (first / "global_step2").is_dir()  # λ, DeepSpeed's states
    launch("resumed", "--resume-from", str(first))
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(resumed[name], value) for name, value in two_ranks.items())
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["final_lambda"] == two["final_lambda"]
