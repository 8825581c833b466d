"""ceu.ops: the autograd functions between the public losses and the backends."""
import pytest
import torch

import ceu

H, V = 8, 20


def test_the_backward_runs_on_the_forwards_backend(monkeypatch):
    """The backend is chosen once, in the public function: the ops only look the name up, and the backward uses the
    name the forward kept, even if the rules that chose it have changed in between."""
    from ceu import backends
    from ceu_kernels import contract

    looked_up = []
    real_load = contract.load
    monkeypatch.setattr("ceu.ops.load", lambda name: looked_up.append(name) or real_load(name))
    chosen = []
    real_choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda *args: chosen.append(args[0]) or real_choose(*args))
    hidden, weight = torch.randn(4, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    # reduction="none": the cross-entropy backward that recomputes (the scalar reductions form it in the forward)
    per_token = ceu.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=int), reduction="none")
    loss = ceu.linear_lmf_loss(hidden, weight) + per_token.sum()
    monkeypatch.setattr(backends, "choose", lambda *args: pytest.fail("the backward chose a backend again"))
    loss.backward()
    assert chosen == ["auto", "auto"] and looked_up == ["torch"] * 4
