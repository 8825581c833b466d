"""The dual side of primal-dual unlearning (PDU): ``min_θ L_fgt(θ)  s.t.  L_rtn(θ) ≤ ε``.

The primal step minimises the Lagrangian ``γ·L_fgt + λ·(L_rtn − ε)`` over θ (any optimizer); the dual step is projected
gradient ascent ``λ ← max(0, λ + η_λ·(L_rtn − ε))``, with λ frozen at λ₀ for a warm start of ``warmup_steps``
optimizer steps. λ lives on the device as a 0-d tensor, so neither step syncs with the host.

By default the dual step runs once per optimizer step, from the retain loss averaged over the gradient-accumulation
window and across data-parallel ranks. ``update_every="micro_batch"`` reproduces the reference implementation
(open-unlearning's PDU): one update per micro-batch from the local rank's loss, so λ moves several times per
optimizer step under accumulation and drifts apart across ranks.
"""
import math
import numbers
from collections.abc import Callable

import torch

from ceu.config import CHOICES
from ceu.distributed import distributed_mean

UPDATE_MODES = CHOICES["dual_update"]
__all__ = ["PrimalDual", "relative_epsilon", "distributed_mean", "UPDATE_MODES"]


class PrimalDual:
    """The dual variable λ of the retain constraint, and the Lagrangian the primal step minimises.

    Use, per micro-batch: ``loss = pd.lagrangian(forget_loss, retain_loss); pd.observe(retain_loss)``; after each
    optimizer step: ``pd.step()``.

    Args:
        lambda_init: λ₀, also λ's value throughout the warm start.
        dual_lr: η_λ, the dual step size.
        epsilon: the bound ε on the retain loss (absolute; see :func:`relative_epsilon` for ``(1+α)·L_rtn(θ₀)``).
        warmup_steps: optimizer steps during which λ stays at λ₀.
        forget_weight: γ, the weight of the forget loss in the Lagrangian.
        update_every: ``"optimizer_step"`` (default) or ``"micro_batch"`` (the reference's behaviour, see above).
        reduce_mean: averages the window's retain loss across ranks; default :func:`distributed_mean` over ``group``.
        group: the process group of the default ``reduce_mean``.
    """

    def __init__(self, lambda_init: float = 100.0, dual_lr: float = 5.0, epsilon: float = 0.3, warmup_steps: int = 0,
                 forget_weight: float = 1.0, update_every: str = "optimizer_step",
                 reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None, group=None):
        for name, value in (("lambda_init", lambda_init), ("dual_lr", dual_lr), ("epsilon", epsilon),
                            ("forget_weight", forget_weight)):
            _check_number(name, value)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (optimizer steps), got {warmup_steps!r}")
        if update_every not in UPDATE_MODES:
            raise ValueError(f"update_every must be one of {UPDATE_MODES}, got {update_every!r}")
        self.dual_lr, self.epsilon, self.warmup_steps = float(dual_lr), float(epsilon), int(warmup_steps)
        self.forget_weight, self.update_every = float(forget_weight), update_every
        self.reduce_mean = reduce_mean or (lambda value: distributed_mean(value, group))
        self.lam = torch.tensor(float(lambda_init))
        self.steps = 0
        self.last_retain_loss: torch.Tensor | None = None
        self._window_sum: torch.Tensor | None = None
        self._window_count = 0

    @property
    def warming_up(self) -> bool:
        return self.steps < self.warmup_steps

    @property
    def held_last_step(self) -> bool:
        """Whether the last :meth:`step` kept λ at λ₀ (it fell in the warm start): what a log line of that step shows."""
        return self.steps <= self.warmup_steps

    def lagrangian(self, forget_loss: torch.Tensor, retain_loss: torch.Tensor) -> torch.Tensor:
        """``γ·L_fgt + λ·(L_rtn − ε)``, with λ a constant for autograd."""
        _check_scalar("forget_loss", forget_loss)
        _check_scalar("retain_loss", retain_loss)
        self.lam = self.lam.to(retain_loss.device)
        return self.forget_weight * forget_loss + self.lam * (retain_loss - self.epsilon)

    def observe(self, retain_loss: torch.Tensor) -> None:
        """Record one micro-batch's retain loss (under ``"micro_batch"``: update λ from it at once)."""
        _check_scalar("retain_loss", retain_loss)  # a [B] loss would silently make λ a vector
        retain_loss = retain_loss.detach().float()
        if self.update_every == "micro_batch":
            self.last_retain_loss = retain_loss
            if not self.warming_up:
                self._ascend(retain_loss)
            return
        self._window_sum = retain_loss if self._window_sum is None else self._window_sum + retain_loss
        self._window_count += 1

    def step(self) -> None:
        """Call once per optimizer step: the dual update from the window's mean retain loss, after the warm start."""
        if self._window_count:
            window_mean = self.reduce_mean(self._window_sum / self._window_count)
            self.last_retain_loss = window_mean
            if not self.warming_up:
                self._ascend(window_mean)
        self._window_sum, self._window_count = None, 0
        self.steps += 1

    def _ascend(self, retain_loss: torch.Tensor) -> None:
        self.lam = (self.lam.to(retain_loss.device) + self.dual_lr * (retain_loss - self.epsilon)).clamp_min(0.0)

    def state_dict(self) -> dict:
        return {"lambda": self.lam.detach().cpu().clone(), "epsilon": self.epsilon, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.lam = state["lambda"].detach().clone().to(self.lam.device)
        self.epsilon, self.steps = float(state["epsilon"]), int(state["steps"])

    def __repr__(self) -> str:
        return (f"PrimalDual(lambda={float(self.lam):.4g}, epsilon={self.epsilon:.4g}, dual_lr={self.dual_lr}, "
                f"steps={self.steps}, warmup_steps={self.warmup_steps}, update_every={self.update_every!r})")


def relative_epsilon(initial_retain_loss: float, alpha: float) -> float:
    """``ε = (1 + α)·L_rtn(θ₀)``: the bound relative to the retain loss of the model before unlearning."""
    _check_number("alpha", alpha)
    if not math.isfinite(initial_retain_loss):
        raise ValueError(f"the retain loss before unlearning is {initial_retain_loss}: epsilon_alpha cannot set a "
                         "bound relative to it (set an absolute epsilon, or check the model and retain data)")
    return (1.0 + alpha) * float(initial_retain_loss)


def _check_number(name: str, value) -> None:
    """A finite real number >= 0 (λ, η_λ, ε, γ and α have no meaning below 0: ε bounds a cross-entropy)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_scalar(name: str, loss) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{name} must be a 0-d tensor (the micro-batch's mean loss), got {shape}")
