"""What gets measured: LM-head presets by model, token counts, and the case lists of each command.

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
