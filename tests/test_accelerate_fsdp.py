"""accelerate's FSDP plugin on CPU: accelerate applies it only on GPUs and other accelerators. On CPU processes
(``use_cpu``) ``AcceleratorState`` sets up ``MULTI_CPU`` and keeps no plugin (accelerate/state.py: the FSDP branch
lists only the accelerator distributed types), so an FSDP launch silently trains DDP replicas. These tests show that
on the real launch, and that ceu refuses such a launch, naming the reason, rather than train unsharded: the CLI before
it loads anything, ``PrimalDualTrainer`` when its accelerator comes up. ceu's own FSDP2 loop (``--parallel fsdp``
under torchrun) does shard on CPUs: tests/test_distributed.py. Last, ``ceu unlearn`` without ``--trainer hf`` refuses
a launch's DeepSpeed or FSDP config, which its loop would ignore."""
import json
from pathlib import Path

import pytest
import torch
from helpers import accelerate_config, accelerate_launch, launch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="accelerate is not installed: the launcher under test is missing")
import accelerate_fsdp_script as script  # noqa: E402 (after the skips: it imports transformers)
from test_cli import nothing_may_load, refused  # noqa: E402, F401 (a fixture)

from ceu.cli import main  # noqa: E402

SCRIPT = Path(script.__file__).resolve()
FSDP2_CONFIG = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_reshard_after_forward": True,
                "fsdp_state_dict_type": "FULL_STATE_DICT"}
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, accelerate applies its FSDP plugin")


@CPU_ONLY
def test_an_fsdp2_launch_on_cpu_runs_ddp_and_primal_dual_trainer_refuses_it(tmp_path):
    config = accelerate_config(tmp_path, "FSDP", fsdp_config=FSDP2_CONFIG, mixed_precision="no")
    launch([*accelerate_launch(config), str(SCRIPT), str(tmp_path)], tmp_path, timeout=240)
    result = json.loads((tmp_path / "fsdp.json").read_text())
    # the trap: the request reached the process, yet a plain Trainer trained DDP replicas, without a word
    assert result["requested"] == "true"
    assert (result["distributed_type"], result["trainer_fsdp_enabled"], result["wrapped"]) == \
        ("MULTI_CPU", False, "DistributedDataParallel")
    error = result["error"] or ""
    assert "accelerate was asked for FSDP" in error and "distributed type MULTI_CPU" in error
    assert "--parallel fsdp" in error


@CPU_ONLY
def test_the_cli_refuses_an_fsdp_launch_on_cpu_before_loading(tmp_path, monkeypatch, capsys, nothing_may_load):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    error = " ".join(refused(["--trainer", "hf", "--output-dir", str(tmp_path / "out")], capsys).split())
    assert "accelerate was asked for FSDP" in error and "runs DDP (accelerate's MULTI_CPU) instead" in error


def test_the_cli_lets_an_fsdp_launch_through_where_there_is_a_gpu(tmp_path, monkeypatch):
    """On GPUs accelerate applies its FSDP plugin, so the launch's config is for --trainer hf to use (the GPU faked: the
    check reads only whether there is one)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("ceu.cli.run_unlearn", lambda args, config: 0)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the embedded default's 1 thread
    assert main(["unlearn", "--trainer", "hf", "--output-dir", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("variable, plugin",
                         [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_ceus_loop_refuses_a_launch_config_only_the_trainer_reads(tmp_path, monkeypatch, capsys, nothing_may_load,
                                                                  variable, plugin):
    """ceu's own loop runs DDP under any launch: a DeepSpeed or FSDP config would be ignored."""
    monkeypatch.setenv(variable, "true")
    error = " ".join(refused(["--output-dir", str(tmp_path / "out")], capsys).split())
    assert f"the accelerate launch's {plugin} config is read by --trainer hf only" in error
    monkeypatch.delenv(variable)
    monkeypatch.setattr("ceu.cli.run_unlearn", lambda args, config: 0)  # without the launch's config it starts
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the embedded default's 1 thread
    assert main(["unlearn", "--output-dir", str(tmp_path / "out")]) == 0
