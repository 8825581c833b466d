"""PDU and the baselines it is compared with, all on the fused LM-head losses (no ``[tokens, V]`` logits anywhere).

Every method's forget and retain terms come from the final hidden states and the head's weight:

- ``pdu``: the LMF forget loss under the retain constraint, λ by dual ascent (:func:`ceu.heads.pdu_losses`).
- ``gradascent``: ascend the forget NLL, ``−NLL_f`` (open-unlearning ``configs/trainer/GradAscent.yaml``: no
  retain term).
- ``graddiff``: ``−γ·NLL_f + α·NLL_r``, γ = α = 1 (``configs/trainer/GradDiff.yaml``).
- ``npo`` (Zhang et al. 2024, arXiv 2404.05868): per forget sample
  ``−(2/β)·log σ(−β·(log p_θ(y|x) − log p_ref(y|x)))``, with ``log p`` the answer's summed log-probability and
  ``p_ref`` the frozen starting model's, measured once before training; mean over samples, plus ``α·NLL_r``;
  β = 0.1, α = γ = 1 (``configs/trainer/NPO.yaml``, ``src/trainer/utils.py: compute_dpo_loss``).
- ``simnpo`` (Fan et al. 2024, arXiv 2410.07163): reference-free and length-normalised,
  ``−(2/β)·log σ(β·(NLL(y|x)/|y| − δ))`` per sample (``= −(2/β)·log σ(−(β/|y|)·log p − βδ)``), mean over samples,
  plus ``α·NLL_r``; β = 4.5, δ = 0, γ = 0.125, α = 1 (``configs/trainer/SimNPO.yaml``, whose δ is the paper's γ and
  whose γ is the forget weight, ``npo_coeff`` in the authors' code; ``src/trainer/unlearn/simnpo.py``).

``NLL`` is the token-mean cross-entropy over answer tokens (``−NLL_f`` is gradient ascent); the per-sample NLLs are
sums of :func:`ceu.linear_cross_entropy` with ``reduction="none"``. Every method that trains on both batches computes
its two losses from one model forward over the forget and retain batches together (:func:`ceu.heads.pair_head_inputs`:
one training semantics for all, half the launches, one FSDP all-gather per layer); gradient ascent, whose retain loss
is only reported, runs the retain batch's forward under ``no_grad`` instead. The non-PDU methods minimise the fixed
objective ``γ·L_f + α·L_r``: their :class:`~ceu.primal_dual.PrimalDual` holds λ = α with a dual step of 0, so both
loops run every method through the same Lagrangian and log α as λ.

Reference-implementation options (open-unlearning's PDU, ``src/trainer/unlearn/pdu.py``):

- ``retain_loss="kl"`` (its ``retain_loss_type: KL``): ``KL(p₀ ‖ p_θ)`` per retain answer token against a frozen copy
  of the starting model, fused per token chunk (:func:`linear_kl_divergence`: the two heads' logits of one chunk
  exist at a time, never ``[tokens, V]``). The reference averages over every position of the padded batch (prompt and
  padding too, ``kl_div(..., reduction="batchmean")`` on ``[B·T, V]``); here the answer tokens the NLL counts.
- ``dual_update_per_epoch`` (its ``dual_update_upon: epoch``): λ held within an epoch and updated at each epoch's end
  from the retain loss over the whole retain set (the constrained quantity itself; the reference averages the batch
  losses of one pass of its dataloader's retain halves), the first time at the end of epoch ``dual_warmup_epochs``.
- ``forget_positions="all"``: the authors' first forget loss (open-unlearning before its "masked loss PDU" change,
  #147): LMF averaged over every position of the padded forget batch, prompt and padding included.
"""
import contextlib
import copy

import torch
import torch.nn.functional as F

from ceu.config import METHODS, UnlearnConfig
from ceu.data import IGNORE_INDEX, pad_batch
from ceu.heads import (answer_nll, answer_token_losses, causal_lm, dataset_loss, final_hidden_states,
                       forget_answer_mask, head_parameters, is_dtensor, pair_head_inputs, pdu_forget_loss, token_losses)
from ceu.lmf import linear_lmf_loss
from ceu.primal_dual import PrimalDual

# Each method's defaults (open-unlearning's configs/trainer/<Method>.yaml; see the module docstring).
DEFAULTS = {"pdu": dict(forget_weight=1.0),
            "gradascent": dict(forget_weight=1.0, retain_weight=0.0),
            "graddiff": dict(forget_weight=1.0, retain_weight=1.0),
            "npo": dict(forget_weight=1.0, retain_weight=1.0, beta=0.1),
            "simnpo": dict(forget_weight=0.125, retain_weight=1.0, beta=4.5)}
KL_CHUNK_BYTES = 2 ** 26  # logits of one token chunk, per head, in the statistics' dtype


def hyperparameters(config: UnlearnConfig) -> dict:
    """The method's effective ``forget_weight`` (γ), ``retain_weight`` (α), ``beta``, ``delta``: the config's values
    where set, else the method's defaults. Refuses combinations that mean nothing."""
    defaults = DEFAULTS[config.method]
    settings = {name: getattr(config, name) if getattr(config, name) is not None else defaults.get(name)
                for name in ("forget_weight", "retain_weight", "beta")}
    settings["delta"] = config.delta
    if config.method != "pdu":
        for name, default in (("forget_mask", "shifted"), ("empty_batch", "zero"), ("dual_update", "optimizer_step"),
                              ("dual_update_per_epoch", False), ("forget_positions", "answer")):
            if getattr(config, name) != default:
                raise ValueError(f"{name}={getattr(config, name)!r} is an option of PDU's reference implementation; "
                                 f"method={config.method!r} needs {name}={default!r}")
    elif config.retain_weight is not None or config.beta is not None:
        raise ValueError("retain_weight and beta are for graddiff/npo/simnpo: PDU's retain weight is lambda "
                         "(lambda_init, dual_lr)")
    if config.method == "gradascent" and settings["retain_weight"]:
        raise ValueError("gradascent has no retain term (retain_weight must be None or 0): use graddiff")
    if settings["beta"] is not None and not settings["beta"] > 0:
        raise ValueError(f"beta must be > 0, got {settings['beta']}")
    if settings["retain_weight"] is not None and not settings["retain_weight"] >= 0:
        raise ValueError(f"retain_weight must be >= 0, got {settings['retain_weight']}")
    if config.forget_positions == "all" and (config.forget_mask != "shifted" or config.empty_batch != "zero"):
        raise ValueError("forget_positions='all' counts every position: forget_mask and empty_batch do not apply "
                         "(leave them 'shifted' and 'zero')")
    if config.retain_loss == "kl" and config.empty_batch != "zero":
        raise ValueError("retain_loss='kl' takes empty_batch='zero'")
    return settings


# --- Fused KL divergence between two heads ------------------------------------------------------------------------

def _logits(hidden, weight, bias, dtype):
    logits = hidden @ weight.T
    return (logits if bias is None else logits + bias).to(dtype)


class _LinearKL(torch.autograd.Function):
    """Per-token ``KL(softmax(z₀) ‖ softmax(z))``, ``z = W h + b``, ``z₀ = W₀ h₀ + b₀``, chunked over tokens; the
    gradient ``dz = g·(softmax(z) − softmax(z₀))`` is recomputed per chunk in the backward. Only the model's side
    (``h``, ``W``, ``b``) gets gradients: the starting model is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, chunk):
        stat = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        kl = torch.empty(hidden.shape[0], dtype=stat, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_p = _logits(hidden[rows], weight, bias, stat).log_softmax(-1)
            log_q = _logits(ref_hidden[rows], ref_weight, ref_bias, stat).log_softmax(-1)
            kl[rows] = (log_q.exp() * (log_q - log_p)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        ctx.chunk, ctx.stat = chunk, stat
        return kl

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors
        stat = ctx.stat
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=stat, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=stat, device=bias.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            p = _logits(hidden[rows], weight, bias, stat).softmax(-1)
            p -= _logits(ref_hidden[rows], ref_weight, ref_bias, stat).softmax(-1)
            p *= grad[rows, None].to(stat)
            grad_hidden[rows] = (p @ weight.to(stat)).to(hidden.dtype)
            grad_weight += p.T @ hidden[rows].to(stat)
            if grad_bias is not None:
                grad_bias += p.sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype), None if bias is None else grad_bias.to(bias.dtype),
                None, None, None, None)


def linear_kl_divergence(hidden, weight, bias, ref_hidden, ref_weight, ref_bias=None) -> torch.Tensor:
    """Per-token ``KL(p₀ ‖ p)`` ``[N]`` (float32; float64 for float64 inputs) between the softmax of a frozen head
    ``(ref_hidden [N, H₀], ref_weight [V, H₀], ref_bias)`` and of a trained one
    ``(hidden [N, H], weight [V, H], bias)``:
    open-unlearning's KL retain loss, computed a chunk of tokens at a time so no ``[N, V]`` logits are kept."""
    if hidden.shape[0] != ref_hidden.shape[0] or weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} / ref_hidden {tuple(ref_hidden.shape)} need the same tokens "
                         f"and weight {tuple(weight.shape)} / ref_weight {tuple(ref_weight.shape)} the same "
                         "vocabulary")
    chunk = max(1, KL_CHUNK_BYTES // (8 * weight.shape[0]))
    return _LinearKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
                           None if ref_bias is None else ref_bias.detach(), chunk)


# --- The objective of a run ---------------------------------------------------------------------------------------

def _reduce(total: torch.Tensor, count, scale) -> torch.Tensor:
    """A mean of an already summed loss (the KL's tokens, NPO's samples): local (``scale`` None; 0 when nothing
    counts) or ``scale · total`` (a global mean over ranks), as :func:`ceu.heads.token_mean`."""
    return total / torch.as_tensor(count, device=total.device).clamp_min(1) if scale is None else total * scale


class Objective:
    """One run's method: its forget and retain losses per micro-batch, and its dual variable.

    Built on the starting model before training: NPO measures its reference log-probabilities of the forget answers
    then (keyed by the sample's tokens, so any data order or sharding finds them), and the KL retain loss keeps a
    frozen copy of the model. Neither exists on resume, which is refused for them.
    """

    def __init__(self, model, forget_data: list[dict], config: UnlearnConfig, batch_size: int = 32):
        self.config, self.settings = config, hyperparameters(config)
        self.reference_nll: dict[tuple, float] = {}
        self.reference_model = None
        if (config.method == "npo" or config.retain_loss == "kl") and config.resume_from:
            raise ValueError(f"resume_from: {'NPO' if config.method == 'npo' else 'the KL retain loss'} needs the "
                             "starting model, which a resumed run no longer has")
        if config.method == "npo":
            if not forget_data:
                raise ValueError("method='npo' needs the forget samples, to measure the starting model's reference "
                                 "log-probabilities before training")
            self.reference_nll = sequence_nlls(model, forget_data, batch_size, config.impl)
        if config.retain_loss == "kl":
            if is_dtensor(next(causal_lm(model).parameters())):
                raise NotImplementedError("retain_loss='kl' keeps a frozen copy of the model: not under FSDP")
            self.reference_model = copy.deepcopy(causal_lm(model)).eval().requires_grad_(False)

    def primal_dual(self, epsilon: float, warmup_steps: int) -> PrimalDual:
        """PDU's dual variable; for the other methods λ = α, fixed (dual step 0, no warm-up)."""
        config = self.config
        if config.method != "pdu":
            return PrimalDual(self.settings["retain_weight"], 0.0, epsilon,
                              forget_weight=self.settings["forget_weight"])
        # Per epoch, the loop observes only the whole-set retain loss, just before the epoch's last dual step, whose
        # counter then stands one short of the epoch's end: hold one step less.
        warmup = max(warmup_steps - 1, 0) if config.dual_update_per_epoch else warmup_steps
        return PrimalDual(config.lambda_init, config.dual_lr, epsilon, warmup_steps=warmup,
                          forget_weight=self.settings["forget_weight"], update_every=config.dual_update)

    def losses(self, model, forget: dict, retain: dict, token_scales=None,
               sample_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_f, L_r)`` of one micro-batch pair. ``token_scales=(forget, retain)`` and ``sample_scale`` turn the
        local token- and sample-means into ``scale · sum`` (global means over data-parallel ranks, as in
        :func:`ceu.heads.pdu_losses`); None: local means.

        Every method that trains on both batches takes their hidden states from one model forward over both
        (:func:`ceu.heads.pair_head_inputs`); gradient ascent, which only reports its retain loss, runs the retain
        batch's forward and loss under ``no_grad``."""
        trains_retain = self.config.method != "gradascent"
        forget_scale, retain_scale = (None, None) if token_scales is None else token_scales
        forget_hidden, retain_hidden, weight, bias = pair_head_inputs(model, forget, retain, trains_retain)
        with contextlib.nullcontext() if trains_retain else torch.no_grad():  # gradascent: reported against ε
            retain_loss = self.retain_loss(retain_hidden, weight, bias, retain, retain_scale)
        return self.forget_loss(forget_hidden, weight, bias, forget, forget_scale, sample_scale), retain_loss

    def forget_loss(self, hidden, weight, bias, forget: dict, scale=None, sample_scale=None) -> torch.Tensor:
        """The method's forget loss from the forget batch's final hidden states ``[B, T, H]``."""
        config, method = self.config, self.config.method
        if method == "pdu" and config.forget_positions == "all":  # every position of the padded batch, a local mean
            return linear_lmf_loss(hidden, weight, bias, impl=config.impl)
        if method == "pdu":
            return pdu_forget_loss(hidden, weight, bias, forget["labels"], config, scale)
        if method in ("gradascent", "graddiff"):  # −NLL_f, its token mean
            return -answer_nll(hidden, weight, bias, forget["labels"], config, scale)
        losses, mask = token_losses(hidden, weight, bias, forget["labels"], config.impl)
        nll, lengths = losses.sum(1), mask.sum(1)  # float32 (float64 for float64 inputs)
        beta = self.settings["beta"]
        if method == "npo":
            # −β·(log p_θ − log p_ref)
            margin = beta * (nll - self.forget_reference(forget).to(nll.device, nll.dtype))
        else:
            margin = beta * (nll / lengths.clamp_min(1) - self.settings["delta"])
        per_sample = -(2.0 / beta) * F.logsigmoid(margin)
        return _reduce(per_sample.sum(), len(per_sample), sample_scale)

    def retain_loss(self, hidden, weight, bias, retain: dict, scale=None) -> torch.Tensor:
        """Token-mean NLL (or KL to the starting model) over the retain answer tokens, from the retain batch's final
        hidden states ``[B, T, H]``; the starting model's forward, for the KL, runs here under ``no_grad``."""
        if self.config.retain_loss == "nll":
            return answer_nll(hidden, weight, bias, retain["labels"], self.config, scale)
        hidden = hidden[:, :-1]
        with torch.no_grad():
            ref_hidden = final_hidden_states(self.reference_model, retain["input_ids"],
                                             retain["attention_mask"])[:, :-1].to(hidden.dtype)
            ref_weight, ref_bias = head_parameters(self.reference_model, hidden.dtype)
        mask = retain["labels"][:, 1:] != IGNORE_INDEX
        kl = linear_kl_divergence(hidden[mask], weight, bias, ref_hidden[mask], ref_weight, ref_bias)
        return _reduce(kl.sum(), mask.sum(), scale)

    @torch.no_grad()
    def retain_set_loss(self, model, retain_data: list[dict], pad_token_id: int = 0, batch_size: int = 32) -> float:
        """The retain loss over the whole retain set (token-mean), in eval mode: the per-epoch dual update's input."""
        training = model.training
        model.eval()
        try:
            if self.config.retain_loss == "nll":
                return dataset_loss(model, retain_data, pad_token_id, batch_size, self.config.impl)
            device = next(model.parameters()).device
            total = count = 0.0
            for start in range(0, len(retain_data), batch_size):
                batch = {k: v.to(device) for k, v in pad_batch(retain_data[start:start + batch_size],
                                                                pad_token_id).items()}
                hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
                weight, bias = head_parameters(model, hidden.dtype)
                total += self.retain_loss(hidden, weight, bias, batch, scale=1.0).item()
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            return total / max(count, 1)
        finally:
            model.train(training)

    def forget_reference(self, forget: dict) -> torch.Tensor:
        """The starting model's summed answer NLL of each sample of a padded forget batch (NPO's ``−log p_ref``)."""
        return torch.tensor([self.reference_nll[_key(ids, mask)]
                             for ids, mask in zip(forget["input_ids"].tolist(), forget["attention_mask"].tolist())],
                            dtype=torch.float64)


def _key(input_ids: list[int], attention_mask: list[int]) -> tuple:
    return tuple(token for token, keep in zip(input_ids, attention_mask) if keep)


@torch.no_grad()
def sequence_nlls(model, samples: list[dict], batch_size: int = 32, impl: str = "auto") -> dict[tuple, float]:
    """Each sample's summed answer-token NLL (``−log p(y|x)``), fused cross-entropy with ``reduction="none"``, in eval
    mode and without autocast, keyed by the sample's tokens."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    nlls = {}
    try:
        for start in range(0, len(samples), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(samples[start:start + batch_size], 0).items()}
            losses, _ = answer_token_losses(model, batch, impl)
            for ids, mask, nll in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                      losses.double().sum(1).tolist()):
                nlls[_key(ids, mask)] = nll
    finally:
        model.train(training)
    return nlls


def global_scales(forget: dict, retain: dict, config: UnlearnConfig):
    """``(token_scales, sample_scale)`` for a micro-batch whose global counts are not known in advance (Trainer's
    sampler): ``world size / global count`` of forget answer tokens, retain answer tokens and forget samples, from one
    all-reduce (:func:`ceu.heads.global_token_scales` plus the sample count NPO/SimNPO average over)."""
    import torch.distributed as dist

    counts = torch.stack([forget_answer_mask(forget["labels"], config).sum(),
                          (retain["labels"][:, 1:] != IGNORE_INDEX).sum(),
                          torch.tensor(forget["labels"].shape[0], device=forget["labels"].device)]).float()
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    scales = world_size / counts.clamp_min(1.0)
    return scales[:2], scales[2]


__all__ = ["METHODS", "DEFAULTS", "Objective", "hyperparameters", "linear_kl_divergence", "sequence_nlls",
           "global_scales"]
