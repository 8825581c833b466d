"""One primal-dual (PDU) unlearning step end to end: eager, as the reference implementation does it, against ceu's
fused losses, on a Llama-shaped model with random weights built from a ``transformers.LlamaConfig`` (no download).

The step minimises the Lagrangian ``L_fgt + lam * (L_rtn - eps)`` over the model with AdamW, where ``L_fgt`` is the
LMF loss on a forget batch and ``L_rtn`` the next-token cross-entropy on a retain batch, then takes a dual ascent
step on ``lam``. The eager variant takes full logits from the model's forward and upcasts them to float32; the fused
one takes the hidden states from the model's body and applies the fused losses to the (tied) head weight. Both start
from the same weights and batches, so their first-step losses must agree.

Self-contained on purpose: ceu's own training loop is not imported.
"""
import argparse
import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ceu

from .memory import MemoryProbe
from .timing import Budget, time_op

ROWS_MARKER = "BENCH-E2E "
DUAL_INIT, EPSILON, DUAL_LR, LEARNING_RATE = 1.0, 2.0, 0.1, 1e-5


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    batch: int  # sequences per batch, forget and retain alike
    seq_len: int
    dtype: str
    steps: int  # timed steps after one warm-up step


E2E_SHAPES = {
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, 8, 1024, "bfloat16", 5),
    # the CPU's: Llama-3.2-1B's vocabulary (the part the fused losses change) on a narrow, shallow body
    "llama-3.2-1b-cpu": ModelShape("llama-3.2-1b-cpu", 256, 704, 2, 4, 2, 128256, 2, 256, "float32", 3),
    "tiny": ModelShape("tiny", 32, 64, 1, 2, 1, 1000, 2, 16, "float32", 2),
}


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 0 on padding
    labels: torch.Tensor  # [B, T], input_ids with -100 on padding


def make_batch(shape: ModelShape, device: torch.device, seed: int) -> Batch:
    """Random token ids; the last sequence is right-padded over its final quarter so masks matter."""
    generator = torch.Generator(device).manual_seed(seed)
    input_ids = torch.randint(shape.vocab_size, (shape.batch, shape.seq_len), device=device, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, shape.seq_len - shape.seq_len // 4:] = 0
    return Batch(input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100))


def build_model(shape: ModelShape, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size,
                         max_position_embeddings=max(2048, shape.seq_len), tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, shape.dtype)).train()


def eager_losses(model, forget: Batch, retain: Batch, impl: str):
    """The reference implementation's losses: full logits from the model, upcast to float32."""
    logits = model(input_ids=forget.input_ids, attention_mask=forget.attention_mask).logits
    loss_fgt = ceu.lmf_loss(logits.float(), mask=forget.attention_mask.bool())
    logits = model(input_ids=retain.input_ids, attention_mask=retain.attention_mask).logits
    loss_rtn = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), retain.labels[:, 1:].flatten())
    return loss_fgt, loss_rtn


def fused_losses(model, forget: Batch, retain: Batch, impl: str):
    """ceu's: hidden states from the model's body, the fused losses on the head weight; no logits held."""
    weight = model.get_output_embeddings().weight
    hidden = model.model(input_ids=forget.input_ids, attention_mask=forget.attention_mask).last_hidden_state
    loss_fgt = ceu.linear_lmf_loss(hidden, weight, mask=forget.attention_mask.bool(), impl=impl)
    hidden = model.model(input_ids=retain.input_ids, attention_mask=retain.attention_mask).last_hidden_state
    loss_rtn = ceu.linear_cross_entropy(hidden[:, :-1], weight, retain.labels[:, 1:], impl=impl)
    return loss_fgt, loss_rtn


VARIANTS = {"eager": eager_losses, "fused": fused_losses}


class PDUStep:
    """One primal step on the Lagrangian with AdamW, then dual ascent on ``lam`` (kept on the device, no sync)."""

    def __init__(self, model, losses, forget: Batch, retain: Batch, impl: str):
        self.model, self.losses, self.forget, self.retain, self.impl = model, losses, forget, retain, impl
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        self.dual = torch.tensor(DUAL_INIT, device=forget.input_ids.device)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss_fgt, loss_rtn = self.losses(self.model, self.forget, self.retain, self.impl)
        (loss_fgt + self.dual * (loss_rtn - EPSILON)).backward()
        self.optimizer.step()
        self.dual = (self.dual + DUAL_LR * (loss_rtn.detach() - EPSILON)).clamp_min(0)
        return loss_fgt.detach(), loss_rtn.detach()


def run_variant(shape: ModelShape, variant: str, device: torch.device, impl: str = "auto") -> dict:
    """Time and peak memory of ``shape.steps`` PDU steps after a warm-up step that creates the optimizer state."""
    row = {"model": shape.name, "tokens_per_batch": shape.batch * shape.seq_len, "dtype": shape.dtype,
           "variant": variant, "impl": impl if variant == "fused" else "–", "status": "ok"}
    try:
        model = build_model(shape, device)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        step = PDUStep(model, VARIANTS[variant], make_batch(shape, device, seed=1), make_batch(shape, device, seed=2),
                       impl)
        loss_fgt, loss_rtn = step()  # warm-up: the first step, from the same weights for both variants
        row.update(loss_fgt=loss_fgt.item(), loss_rtn=loss_rtn.item())
        probe = MemoryProbe(device)
        if device.type == "cuda":
            with probe:
                result = step()
            del result
        timing = time_op(step, device, Budget(0.0, shape.steps, shape.steps),
                         first_rep=None if device.type == "cuda" else probe)
    except torch.OutOfMemoryError:
        row["status"] = "oom"
        return row
    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
               peak_mb=probe.peak_mb, total_peak_mb=probe.total_peak_mb)
    return row


def main() -> None:
    """Subprocess entry (CPU): one variant in a fresh process, its row printed as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(E2E_SHAPES), required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--impl", default="auto")
    args = parser.parse_args()
    row = run_variant(E2E_SHAPES[args.shape], args.variant, torch.device("cpu"), args.impl)
    print(ROWS_MARKER + json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
