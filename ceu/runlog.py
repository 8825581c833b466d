"""The JSONL training log both loops write: one line per logged optimizer step, made by :func:`log_record`."""
import json
from pathlib import Path


def log_record(step: int, epoch: float, forget_loss: float, retain_loss: float, lam: float, epsilon: float,
               lr: float | None, dual_warmup: bool, **extra) -> dict:
    """One log line: optimizer step (1-based), epochs done, the interval's mean forget and retain losses, λ after the
    step, ε, the slack ``retain_loss − ε``, the step's LR, whether λ was held at λ₀ (dual warm-up), and ``extra``."""
    return {"step": step, "epoch": round(epoch, 4), "forget_loss": forget_loss, "retain_loss": retain_loss,
            "lambda": lam, "epsilon": epsilon, "slack": retain_loss - epsilon, "lr": lr, **extra,
            "dual_warmup": dual_warmup}


def open_log(path: str | None, resumed_step: int):
    """The JSONL log, fresh for a new run; on resume, keeping only the lines up to the checkpoint's step, so lines
    logged after it by the interrupted run are not duplicated."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resumed_step and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
    log_file = open(path, "w")
    log_file.writelines(line + "\n" for line in kept)
    return log_file


def write_record(log_file, record: dict) -> None:
    if log_file is not None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
