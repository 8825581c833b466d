"""A Hugging Face causal LM seen by the fused losses: the model inside its wrappers, its LM head, the final hidden
states from its own forward with the head bypassed, and the losses computed on the head's weight (no ``[tokens, V]``
logits): PDU's forget and retain losses, and the answer-token cross-entropy that evaluation and fine-tuning use."""
import warnings

import torch
import torch.distributed as dist

from ceu.config import UnlearnConfig
from ceu.cross_entropy import linear_cross_entropy
from ceu.data import IGNORE_INDEX, pad_batch
from ceu.lmf import linear_lmf_loss


def causal_lm(model):
    """The ``*ForCausalLM`` inside DDP, ``torch.compile`` and PEFT wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer layer's activations in the backward instead of keeping them, on the causal LM
    inside the wrappers; non-reentrant, so it works under DDP, with frozen inputs and PEFT adapters."""
    lm = causal_lm(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(lm).__name__} does not support it")
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def lm_head(model) -> torch.nn.Linear:
    """The LM head, checked to be a plain linear layer whose output is the logits."""
    lm = causal_lm(model)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(lm.config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(lm).__name__} transforms its logits ({name}={getattr(lm.config, name)}):"
                                      " the fused losses need logits = hidden @ W.T + b")
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the LM head is a {type(head).__name__}, not torch.nn.Linear (an adapter on the head?): "
                        "the fused losses need its plain weight")
    return head


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states ``[B, T, H]`` from the model's own forward with the LM head bypassed.

    The head is swapped for an identity for the duration of the call, so the top-level forward still runs (DDP's
    gradient sync, PEFT and accelerate wrappers keep working) while no logits are computed.
    """
    lm = causal_lm(model)
    head = lm_head(model)
    lm.set_output_embeddings(torch.nn.Identity())
    try:
        with warnings.catch_warnings():  # FSDP2 warns of in-place ops on a returned view; the losses make none
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        lm.set_output_embeddings(head)
    return outputs.logits


def pair_hidden_states(model, forget: dict, retain: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of a forget and a retain batch from one forward over both, right-padded to a common
    length, each returned in its own shape. Right padding changes nothing before it (causal attention, padding
    masked, position ids counted from the left). One forward instead of two: as fast on SmolLM2-135M on a CPU
    (measured: a tie, with the retain batch padded by an eighth), half the kernel launches of small micro-batches, one
    FSDP all-gather per layer, not two.

    What pairing changes: only rounding (the GEMMs see another batch shape), and, for a model in train mode with
    dropout, which dropout masks are drawn (one draw over both batches instead of one per batch: the same
    distribution, another random stream). A layer that mixes the samples of a batch (an MoE router with an expert
    capacity) would see both batches at once."""
    forget_rows, forget_length = forget["input_ids"].shape
    retain_length = retain["input_ids"].shape[1]
    length = max(forget_length, retain_length)

    def stacked(key):
        return torch.cat([torch.nn.functional.pad(forget[key], (0, length - forget_length)),
                          torch.nn.functional.pad(retain[key], (0, length - retain_length))])

    hidden = final_hidden_states(model, stacked("input_ids"), stacked("attention_mask"))
    return hidden[:forget_rows, :forget_length], hidden[forget_rows:, :retain_length]


def pair_head_inputs(model, forget: dict, retain: dict, train_retain: bool = True):
    """``(forget_hidden [B_f, T_f, H], retain_hidden [B_r, T_r, H], weight, bias)``: what every method's fused
    losses are computed from, obtained here for all of them so they share one training semantics.

    ``train_retain`` (every method that trains on both batches): one forward over both (:func:`pair_hidden_states`).
    False (gradient ascent, whose retain loss is only reported against ε): the retain batch's own forward under
    ``no_grad``, then the forget batch's, so no graph is built for the retain batch; the caller computes the retain
    loss under ``no_grad`` too. The head's parameters are read after the forwards (under FSDP2 they are gathered
    then; :func:`head_parameters`)."""
    if train_retain:
        forget_hidden, retain_hidden = pair_hidden_states(model, forget, retain)
    else:
        with torch.no_grad():
            retain_hidden = final_hidden_states(model, retain["input_ids"], retain["attention_mask"])
        forget_hidden = final_hidden_states(model, forget["input_ids"], forget["attention_mask"])
    weight, bias = head_parameters(model, forget_hidden.dtype)
    return forget_hidden, retain_hidden, weight, bias


def is_dtensor(tensor: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def head_parameters(model, dtype: torch.dtype):
    """LM-head weight and bias in ``dtype`` (the hidden states' dtype under autocast).

    Under FSDP2 the head must be sharded with the root module (``fully_shard(model)``), which keeps its parameters
    gathered from the forward until the backward; a head with its own ``fully_shard`` is never gathered here, since
    the forward bypasses it.
    """
    head = lm_head(model)
    if is_dtensor(head.weight):
        raise RuntimeError("the LM-head weight is still sharded (a DTensor) after the model's forward: shard the head "
                           "with the root module, fully_shard(model), not with its own fully_shard(model.lm_head)")
    weight = head.weight.to(dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    return weight, bias


def answer_token_losses(model, batch: dict, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per answer token ``[B, T-1]`` (0 elsewhere) and the answer-token mask, from the
    batch's own forward (evaluation, fine-tuning, NPO's reference; training pairs its batches:
    :func:`pair_head_inputs`)."""
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    weight, bias = head_parameters(model, hidden.dtype)
    return token_losses(hidden, weight, bias, batch["labels"], impl)


def token_losses(hidden, weight, bias, labels: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy ``[B, T-1]`` (0 off the answer) and the answer mask, from a batch's final
    hidden states ``[B, T, H]`` and its ``labels`` ``[B, T]``: position t predicts token t+1."""
    targets = labels[:, 1:]
    losses = linear_cross_entropy(hidden[:, :-1], weight, targets, bias, reduction="none", impl=impl)
    return losses, targets != IGNORE_INDEX


def answer_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows ``[count, H]`` of ``hidden [B, T, H]`` that a token-mean loss counts (``mask [B, T]``), so that the
    fused losses run their GEMMs on those tokens alone, not on prompts and padding (a quarter of the rows in the PDU
    benchmark's batches, about half in TOFU's); the backward puts their gradient back in place, zero elsewhere. On a
    GPU the count costs one host sync."""
    return hidden[mask]


def token_mean(loss, count: torch.Tensor, scale=None, empty_batch: str = "zero") -> torch.Tensor:
    """A fused loss ``loss(reduction)`` averaged over its ``count`` tokens, the one rule of every method's token
    means: ``scale`` None: the local mean (0 without tokens); else ``scale · sum`` (with ``scale = world size / global
    count``, the global mean over data-parallel ranks); ``empty_batch="nan"``, whatever the scale: the reference's
    local ``sum / count``, 0/0 without tokens."""
    if empty_batch == "nan":
        return loss("sum") / count
    return loss("mean") if scale is None else loss("sum") * scale


def answer_nll(hidden, weight, bias, labels: torch.Tensor, config: UnlearnConfig, scale=None) -> torch.Tensor:
    """Next-token cross-entropy, a token mean over a batch's answer tokens, from its final hidden states: the retain
    loss, and (negated) GradAscent's and GradDiff's forget loss."""
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    rows, row_targets = answer_rows(hidden[:, :-1], answer), targets[answer]
    return token_mean(lambda reduction: linear_cross_entropy(rows, weight, row_targets, bias, reduction=reduction,
                                                             impl=config.impl),
                      answer.sum(), scale, config.empty_batch)


def pdu_forget_loss(hidden, weight, bias, labels: torch.Tensor, config: UnlearnConfig, scale=None) -> torch.Tensor:
    """PDU's LMF forget loss, a token mean over the forget positions :func:`forget_answer_mask` counts, from the forget
    batch's final hidden states."""
    mask = forget_answer_mask(labels, config)
    rows = answer_rows(hidden[:, :-1] if config.forget_mask == "shifted" else hidden, mask)
    return token_mean(lambda reduction: linear_lmf_loss(rows, weight, bias, reduction=reduction, impl=config.impl),
                      mask.sum(), scale, config.empty_batch)


def forget_answer_mask(labels: torch.Tensor, config: UnlearnConfig) -> torch.Tensor:
    """The forget positions the LMF loss counts: position t predicts token t+1, so it counts when t+1 is an answer
    token (``[B, T-1]``); ``forget_mask="unshifted"`` is the reference's ``labels != -100`` (``[B, T]``)."""
    return (labels[:, 1:] if config.forget_mask == "shifted" else labels) != IGNORE_INDEX


def global_token_scales(forget: dict, retain: dict, config: UnlearnConfig) -> torch.Tensor:
    """``pdu_losses``' ``token_scales`` for a micro-batch whose global answer-token counts are not known in advance
    (a sampler hands each rank its share): ``world size / global count`` of forget and retain tokens, from one
    all-reduce of the local counts. A global micro-batch without answer tokens gets loss 0."""
    counts = torch.stack([forget_answer_mask(forget["labels"], config).sum(),
                          (retain["labels"][:, 1:] != IGNORE_INDEX).sum()]).float()
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return world_size / counts.clamp_min(1.0)


def pdu_losses(model, forget: dict, retain: dict, config: UnlearnConfig,
               token_scales: tuple[float, float] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_fgt, L_rtn)`` of one micro-batch pair: the LMF loss over the forget answer tokens and the token-mean
    cross-entropy over the retain answer tokens, both fused on the LM-head weight.

    ``token_scales=(forget, retain)`` replaces each local token-mean by ``scale · sum``: with ``scale = world size /
    answer tokens of the global micro-batch`` the mean over data-parallel ranks (DDP's and FSDP's gradient average, the
    all-reduced retain loss) is the global micro-batch's token-mean, however unevenly the ranks' tokens fall.
    """
    forget_hidden, retain_hidden, weight, bias = pair_head_inputs(model, forget, retain)
    forget_scale, retain_scale = (None, None) if token_scales is None else token_scales
    return (pdu_forget_loss(forget_hidden, weight, bias, forget["labels"], config, forget_scale),
            answer_nll(retain_hidden, weight, bias, retain["labels"], config, retain_scale))


@torch.no_grad()
def dataset_loss(model, samples: list[dict], pad_token_id: int = 0, batch_size: int = 32,
                 impl: str = "auto") -> float:
    """Token-mean cross-entropy over every answer token of ``samples`` (the retain loss of the constraint)."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(samples[start:start + batch_size], pad_token_id).items()}
        losses, mask = answer_token_losses(model, batch, impl)
        total += losses.float().sum()
        count += mask.sum()
    return (total / count.clamp_min(1)).item()
