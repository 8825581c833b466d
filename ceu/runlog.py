"""The JSONL training log both loops write: one line per logged optimizer step, made by :func:`log_record`."""
import json
from pathlib import Path

from ceu.files import write_text


def log_record(step: int, epoch: float, forget_loss: float, retain_loss: float, lam: float, epsilon: float,
               lr: float | None, dual_warmup: bool, **extra) -> dict:
    """One log line: optimizer step (1-based), epochs done, the interval's mean forget and retain losses, λ after the
    step, ε, the slack ``retain_loss − ε``, the step's LR, whether λ was held at λ₀ (dual warm-up), and ``extra``."""
    return {"step": step, "epoch": round(epoch, 4), "forget_loss": forget_loss, "retain_loss": retain_loss,
            "lambda": lam, "epsilon": epsilon, "slack": retain_loss - epsilon, "lr": lr, **extra,
            "dual_warmup": dual_warmup}


def open_log(path: str | None, resumed_step: int):
    """The JSONL log, started afresh for a new run (the ``ceu unlearn`` command refuses to start over an earlier run's
    folder unless told to); on resume, keeping only the lines up to the checkpoint's step, so lines logged after it by
    the interrupted run are not duplicated. That rewrite is atomic (:func:`ceu.files.replacing`), and a last line
    cut short by a crash mid-write is dropped; an unreadable line before it is refused, naming the file and line."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resumed_step and path.exists():
        kept = [line for line, record in _records(path) if record["step"] <= resumed_step]
        write_text(path, "".join(line + "\n" for line in kept))
        return open(path, "a")
    return open(path, "w")


def _records(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for each line of a JSONL log, but a last line cut short (no newline, not valid JSON)."""
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                print(f"{path}: dropping its last line, cut short (the run was stopped while writing it)")
                break
            raise ValueError(f"{path} line {number} is not a log record ({error}): not a log ceu wrote, or damaged")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} has no integer 'step': not a log ceu wrote")
        records.append((line, record))
    return records


def write_record(log_file, record: dict) -> None:
    if log_file is not None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
