"""What gets measured and what it must reach: LM-head presets by model, token counts, the case lists of each command,
and the targets (``TARGETS``) that the reports' verdicts read.

A case is one loss on one head shape; the providers and modes are crossed with it by the runner. Cases are listed
in priority order, since the GPU command stops starting new ones when its time budget runs out.
"""
from dataclasses import asdict, dataclass

HEADS = {
    # name: (hidden size H, vocabulary V) of the model's LM head
    "llama-3.2-1b": (2048, 128256),
    "llama-3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma-2-2b": (2304, 256000),
    # the foundation issue's CPU target: a Llama-3 vocabulary on a narrow hidden size
    "cpu-target": (256, 128256),
    # a few-second smoke test of every code path
    "tiny": (32, 1000),
}
GPU_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
GPU_HEADLINE = ("llama-3-8b", 8192)
CPU_TARGET_TOKENS = 2048
CPU_CE_TARGET_TOKENS = (512, CPU_TARGET_TOKENS)
"""The token counts of the CPU cross-entropy targets (issue 15)."""


@dataclass(frozen=True)
class Target:
    """A bound on a measured ratio: met when the ratio is at least ``bound`` (``at_least``) or at most it."""
    bound: float
    at_least: bool

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def __str__(self) -> str:
        """The bound as the reports write it: "≥ 2.9", "≤ 0.06"."""
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}"


TARGETS = {
    # Issue 15's targets, read by report.py (the suites' key ratios), interleaved.py and e2e.py; "eager" is eager-fp32,
    # the reference implementation, and a memory figure is the peak over the inputs (or over the model+optimizer state).
    # CPU, head "cpu-target" in float32:
    "cpu_lmf_speed": Target(2.9, True),  # LMF fwd+bwd at CPU_TARGET_TOKENS: ceu-torch's speed-up over eager
    "cpu_lmf_memory": Target(0.06, False),  # the same LMF case: ceu-torch's peak memory as a share of eager's
    "cpu_ce_speed": Target(1.3, True),  # CE fwd+bwd at each of CPU_CE_TARGET_TOKENS: ceu-torch's speed-up over eager
    "cpu_ce_vs_compile": Target(1.0, True),  # the same CE cases: ceu-torch's speed relative to torch.compile's
    "cpu_ce_memory": Target(0.15, False),  # CE at CPU_TARGET_TOKENS: ceu-torch's peak memory as a share of eager's
    # CPU, the PDU step on SmolLM2-135M (benchmarks.e2e):
    "cpu_e2e_speed": Target(1.2, True),  # fused step's speed-up over the eager step
    "cpu_e2e_checkpointed_memory": Target(0.5, False),  # fused+checkpointing's peak memory as a share of eager's
    # GPU, bfloat16 at GPU_HEADLINE; "best" is the fastest of ceu's backends:
    "gpu_lmf_floor": Target(1.15, False),  # LMF fwd+bwd: best backend's time over the GEMM floor (one h @ W.T)
    "gpu_lmf_speed": Target(3.0, True),  # LMF fwd+bwd: best backend's speed-up over eager
    "gpu_ce_vs_cce": Target(1.0, False),  # CE fwd+bwd: best backend's time and peak memory over cut-cross-entropy's
    # GPU, the PDU step (benchmarks.e2e's GPU shape):
    "gpu_e2e_speed": Target(1.5, True),  # fused step's speed-up over the eager step
    "gpu_e2e_memory_saving": Target(2.0, True),  # eager's peak memory over fused's (how many times smaller)
}


def verdict(name: str, value: float) -> str:
    """"meets" or "misses": ``value`` against ``TARGETS[name]``."""
    return "meets" if TARGETS[name].met(value) else "misses"


@dataclass(frozen=True)
class Case:
    loss: str  # "lmf" | "ce"
    preset: str
    tokens: int
    hidden: int
    vocab: int
    dtype: str  # torch dtype name: "float32" | "bfloat16"

    @property
    def key(self) -> str:
        return f"{self.loss}-{self.preset}-t{self.tokens}-{self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


def case(loss: str, preset: str, tokens: int, dtype: str) -> Case:
    hidden, vocab = HEADS[preset]
    return Case(loss, preset, tokens, hidden, vocab, dtype)


def cpu_cases(tiny: bool = False) -> list[Case]:
    """float32 on the CPU: the foundation's LMF target shape first, then smaller token counts for the plots."""
    if tiny:
        return [case(loss, "tiny", tokens, "float32") for loss in ("lmf", "ce") for tokens in (64, 128)]
    return ([case("lmf", "cpu-target", n, "float32") for n in (CPU_TARGET_TOKENS, 512, 256)]
            + [case("ce", "cpu-target", n, "float32") for n in (CPU_TARGET_TOKENS, 512, 256, 128)])


def gpu_cases(tiny: bool = False) -> list[Case]:
    """bfloat16 on the GPU: the headline shape of both losses, its preset's token sweep, then the other presets at
    a few token counts before the rest of their sweep (the command stops where its time budget runs out)."""
    if tiny:
        return [case(loss, "tiny", tokens, "bfloat16") for loss in ("lmf", "ce") for tokens in (64, 128)]
    headline_preset, headline_tokens = GPU_HEADLINE
    others = ("llama-3.2-1b", "qwen2.5-7b", "gemma-2-2b")
    order = [(headline_preset, headline_tokens)] + [(headline_preset, n) for n in GPU_TOKENS]
    order += [(p, n) for n in (8192, 2048, 32768) for p in others]
    order += [(p, n) for p in others for n in GPU_TOKENS]
    cases = []
    for preset, tokens in order:
        for loss in ("lmf", "ce"):
            candidate = case(loss, preset, tokens, "bfloat16")
            if candidate not in cases:
                cases.append(candidate)
    return cases
