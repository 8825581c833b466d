"""The ahead-of-time compile check (``ceu_kernels.compile_check``) must be able to fail: launches over a target's
shared memory, launchers whose autotune configs all exceed it, and 16-bit dots off wgmma on sm_90 are reported.
``make test`` runs the check itself on the real targets (``--subset``); these tests run it on pretend targets."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parent.parent


def compile_check(*args):
    """Run the check in a fresh process: it compiles real kernels, which the interpreter set up here replaces."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "ceu_kernels.compile_check", "--subset", "--workers", "1", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_explicit_launch_over_the_shared_memory_limit_fails():
    done = compile_check("--paths", "lmf_gradients", "--targets", "sm90", "--shared-memory", "512")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "_weighted_hidden_sum_kernel" in done.stdout
    assert "FAIL: shared memory 1024 B > 512 B" in done.stdout
    assert "| _grad_hidden_kernel |" in done.stdout  # kernels that fit are still listed, as ok


def test_autotuned_launch_without_a_fitting_config_fails():
    done = compile_check("--paths", "ce_gradients", "--targets", "sm80", "--shared-memory", "40000")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no autotune config fits 40000 bytes of shared memory" in done.stdout
    assert "FAIL: shared memory 90112 B > 40000 B" in done.stdout  # float64 launches with explicit blocks


def test_sixteen_bit_dot_off_wgmma_on_hopper_is_a_failure():
    from ceu_kernels.compile_check import failures

    row = dict(target="sm90", kernel="_lmf_forward_kernel", precision="bf16", shared=1, limit=2, dot="mma.sync",
               error=None)
    assert failures(row) == ["16-bit dot lowered to mma.sync, not wgmma"]
    assert failures({**row, "dot": "wgmma"}) == []
    assert failures({**row, "target": "sm80"}) == []
    assert failures({**row, "precision": "fp32-ieee", "dot": "fma"}) == []
