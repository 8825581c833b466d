"""DeepSpeed ZeRO-3 through ``accelerate launch`` (open-unlearning's default launch), two CPU processes over gloo:
``PrimalDualTrainer`` (``--trainer hf``) and a ``ceu.patch_causal_lm``-patched ``transformers.Trainer`` train as one
plain process does on the same global batches, as do ``unlearn_with_trainer`` (the model it hands back) and the
``ceu.pdu_objective`` Trainer subclass of examples/, and the whole ``ceu unlearn --trainer hf`` command. ZeRO-3
partitions the LM head outside its module's forward; the fused losses read it through
:func:`ceu.zero3.gathered_lm_head`."""
import json
from pathlib import Path

import pytest
import torch
from helpers import accelerate_config, accelerate_launch, assert_close, launch, tiny_model

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed", reason="deepspeed is not installed: the ZeRO-3 launch cannot run")
import zero3_script as script  # noqa: E402 (after the skips)
from test_cli import assert_matches_one_process, launch_ceu, launched_job  # noqa: E402

SCRIPT = Path(script.__file__).resolve()
DEEPSPEED_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    # every parameter partitioned, however small (the default keeps tensors under 1e5 elements whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,  # Trainer's SGD
}


def zero3_config(tmp_path: Path, zero3_init: bool = False) -> Path:
    """An accelerate launch config for DeepSpeed ZeRO-3 (:data:`DEEPSPEED_CONFIG`) on two CPU processes."""
    (tmp_path / "deepspeed.json").write_text(json.dumps(DEEPSPEED_CONFIG))
    return accelerate_config(tmp_path, "DEEPSPEED", deepspeed_config={
        "deepspeed_config_file": str(tmp_path / "deepspeed.json"), "zero3_init_flag": zero3_init})


def test_zero3_launch_trains_as_one_plain_process(tmp_path):
    launch([*accelerate_launch(zero3_config(tmp_path)), str(SCRIPT), str(tmp_path)], tmp_path, timeout=400)
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


def test_ceu_unlearn_trainer_hf_under_zero3_matches_one_process_and_resumes(tmp_path, own_cache):
    """The whole command under a ZeRO-3 launch, with ``zero3_init_flag`` on as usual configs have it: rank 0 alone
    prints the report and writes the results, the log and the model, saved whole from the partitions, and they equal
    one plain ``--trainer hf`` process's with the global batch (test_cli's comparison of the launched runs). Its
    Trainer checkpoint (DeepSpeed's partitioned states and λ) resumes, under the same launch, to the same model
    bitwise. The launched ranks inherit ``own_cache``'s CEU_CACHE."""
    config = zero3_config(tmp_path, zero3_init=True)
    job = launched_job(tmp_path, False, "--trainer", "hf")
    checkpoints = tmp_path / "checkpoints"
    printed = launch_ceu(accelerate_launch(config), job, tmp_path / "two", "--checkpoint-every", "2",
                         "--checkpoint-dir", str(checkpoints))
    assert "on 2 ranks (Trainer)" in printed and printed.count("evaluation skipped") == 1
    two = assert_matches_one_process(printed, job, tmp_path)

    from transformers import AutoModelForCausalLM

    first = checkpoints / "checkpoint-2"
    assert (first / "primal_dual.pt").is_file() and (first / "global_step2").is_dir()  # λ, DeepSpeed's states
    launch_ceu(accelerate_launch(config), job, tmp_path / "resumed", "--resume-from", str(first))
    two_ranks, resumed = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
                          for name in ("two", "resumed"))
    assert all(torch.equal(resumed[name], value) for name, value in two_ranks.items())
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["final_lambda"] == two["final_lambda"]
