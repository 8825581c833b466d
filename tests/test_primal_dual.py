"""The dual update of ceu.primal_dual against hand-computed values, and the inputs it refuses."""
import math

import pytest
import torch
import torch.distributed as dist

from ceu.primal_dual import UPDATE_MODES, PrimalDual, relative_epsilon


def t(value):
    return torch.tensor(value)


def run_window(pd, retain_losses):
    for loss in retain_losses:
        pd.observe(t(loss))
    pd.step()
    return pd.lam.item()


def test_one_update_per_optimizer_step_from_the_window_mean():
    pd = PrimalDual(lambda_init=10.0, dual_lr=2.0, epsilon=0.5)
    # mean(0.9, 0.7) = 0.8; 10 + 2 * (0.8 - 0.5) = 10.6
    assert run_window(pd, [0.9, 0.7]) == pytest.approx(10.6)
    assert pd.last_retain_loss.item() == pytest.approx(0.8)
    # 10.6 + 2 * (0.3 - 0.5) = 10.2
    assert run_window(pd, [0.3]) == pytest.approx(10.2)
    assert pd.steps == 2


def test_projection_onto_nonnegative_lambda():
    pd = PrimalDual(lambda_init=1.0, dual_lr=10.0, epsilon=0.5)
    assert run_window(pd, [0.2]) == 0.0  # 1 + 10 * (0.2 - 0.5) = -2 -> 0
    assert run_window(pd, [0.6]) == pytest.approx(1.0)  # 0 + 10 * 0.1


def test_warm_start_freezes_lambda_for_warmup_steps():
    pd = PrimalDual(lambda_init=3.0, dual_lr=1.0, epsilon=0.0, warmup_steps=2)
    assert [run_window(pd, [1.0]) for _ in range(4)] == pytest.approx([3.0, 3.0, 4.0, 5.0])


def test_step_without_observations_only_counts():
    pd = PrimalDual(lambda_init=3.0, dual_lr=1.0, epsilon=0.0)
    pd.step()
    assert pd.lam.item() == 3.0 and pd.steps == 1 and pd.last_retain_loss is None


def test_micro_batch_mode_reproduces_the_reference_per_micro_batch_update():
    # Reference: after each micro-batch, lambda = max(0, lambda + eta * (L_rtn - eps)) from the local loss.
    pd = PrimalDual(lambda_init=10.0, dual_lr=2.0, epsilon=0.5, update_every="micro_batch",
                    reduce_mean=lambda value: pytest.fail("the reference never all-reduces"))
    pd.observe(t(0.9))
    assert pd.lam.item() == pytest.approx(10.8)
    pd.observe(t(0.7))
    assert pd.lam.item() == pytest.approx(11.2)
    pd.step()
    assert pd.lam.item() == pytest.approx(11.2)


def test_micro_batch_mode_respects_warm_start():
    pd = PrimalDual(lambda_init=1.0, dual_lr=1.0, epsilon=0.0, warmup_steps=1, update_every="micro_batch")
    pd.observe(t(2.0))
    pd.step()
    assert pd.lam.item() == 1.0
    pd.observe(t(2.0))
    assert pd.lam.item() == 3.0


def test_reduce_mean_hook_sees_the_window_mean():
    seen = []

    def other_rank_at_1_2(value):  # a fake two-rank group whose other rank saw a window mean of 1.2
        seen.append(value.item())
        return (value + 1.2) / 2

    pd = PrimalDual(lambda_init=10.0, dual_lr=2.0, epsilon=0.5, reduce_mean=other_rank_at_1_2)
    assert run_window(pd, [0.9, 0.7]) == pytest.approx(11.0)  # mean(0.8, 1.2) = 1.0 -> 10 + 2 * 0.5
    assert seen == [pytest.approx(0.8)]


def test_default_reduce_averages_over_a_fake_process_group(monkeypatch):
    calls = []

    def fake_all_reduce(tensor, op, group):
        calls.append((op, group))
        tensor += 1.2  # the other rank's window mean

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    group = object()
    pd = PrimalDual(lambda_init=10.0, dual_lr=2.0, epsilon=0.5, group=group)
    assert run_window(pd, [0.9, 0.7]) == pytest.approx(11.0)
    assert calls == [(dist.ReduceOp.SUM, group)]


def test_lagrangian_value_and_gradients():
    pd = PrimalDual(lambda_init=10.0, dual_lr=1.0, epsilon=0.5, forget_weight=2.0)
    forget, retain = t(3.0).requires_grad_(), t(0.9).requires_grad_()
    loss = pd.lagrangian(forget, retain)
    assert loss.item() == pytest.approx(2 * 3.0 + 10 * (0.9 - 0.5))
    loss.backward()
    assert forget.grad.item() == pytest.approx(2.0) and retain.grad.item() == pytest.approx(10.0)
    assert not pd.lam.requires_grad


def test_state_dict_round_trip():
    pd = PrimalDual(lambda_init=10.0, dual_lr=2.0, epsilon=0.5)
    run_window(pd, [0.9])
    restored = PrimalDual(lambda_init=0.0, dual_lr=2.0, epsilon=0.0)
    restored.load_state_dict(pd.state_dict())
    assert restored.lam.item() == pytest.approx(pd.lam.item())
    assert (restored.epsilon, restored.steps) == (0.5, 1)
    assert run_window(restored, [0.5]) == run_window(pd, [0.5])


def test_relative_epsilon():
    assert relative_epsilon(2.0, 0.1) == pytest.approx(2.2)
    for alpha in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
            relative_epsilon(2.0, alpha)
    for loss in (math.nan, math.inf):  # a diverged model before unlearning: no bound can be relative to it
        with pytest.raises(ValueError, match=f"retain loss before unlearning is {loss}"):
            relative_epsilon(loss, 0.1)


@pytest.mark.parametrize("kwargs, name", [({"lambda_init": -1.0}, "lambda_init"), ({"dual_lr": -1.0}, "dual_lr"),
                                          ({"warmup_steps": -1}, "warmup_steps"),
                                          ({"update_every": "epoch"}, "update_every")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PrimalDual(**kwargs)


@pytest.mark.parametrize("name", ["lambda_init", "dual_lr", "epsilon", "forget_weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1e-9, "1.0", None, True])
def test_non_finite_negative_or_non_numbers_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number >= 0, got"):
        PrimalDual(**{name: value})


@pytest.mark.parametrize("value", [math.nan, 2.5, -1, "3", True])
def test_warmup_steps_must_be_a_whole_number_of_steps(value):
    """Not ``cannot convert float NaN to integer``, and 2.5 is not silently 2."""
    with pytest.raises(ValueError, match="^warmup_steps must be an integer >= 0"):
        PrimalDual(warmup_steps=value)


@pytest.mark.parametrize("update_every", UPDATE_MODES)
@pytest.mark.parametrize("loss", [torch.tensor([0.9]), torch.tensor([0.9, 0.1]), torch.zeros(2, 2), 0.9])
def test_observe_refuses_a_loss_that_is_not_a_0d_tensor(update_every, loss):
    """A per-sample loss would broadcast λ into a vector (the dual step, and every later Lagrangian, silently wrong)."""
    pd = PrimalDual(lambda_init=1.0, dual_lr=1.0, epsilon=0.0, update_every=update_every)
    with pytest.raises(ValueError, match="retain_loss must be a 0-d tensor"):
        pd.observe(loss)
    pd.step()
    assert pd.lam.shape == () and pd.lam.item() == 1.0
    with pytest.raises(ValueError, match="forget_loss must be a 0-d tensor"):
        pd.lagrangian(torch.ones(3), t(0.5))
    with pytest.raises(ValueError, match="retain_loss must be a 0-d tensor"):
        pd.lagrangian(t(0.5), torch.ones(1))
