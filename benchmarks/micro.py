"""Microbenchmark of one case with one provider: every mode timed and its memory measured, then errors against the
float64 reference. Rows are plain dicts with the CSV's columns (see :mod:`benchmarks.report`).

On the CPU each (case, provider) runs in a fresh process (``python -m benchmarks.micro``) so that its resident-set
figures hold nothing of another provider's; on a GPU the allocator's counters are exact and everything runs in one
process.
"""
import argparse
import gc
import json
import sys
import traceback
from typing import Callable

import torch

from .memory import MemoryProbe
from .providers import PROVIDERS, USEFUL_GEMMS, Inputs, make_inputs, relative_error
from .shapes import Case
from .timing import Budget, time_op

ROWS_MARKER = "BENCH-ROWS "
WARM_UP_ORDER = ("full", "forward", "backward")


def case_row(case: Case, provider: str, mode: str) -> dict:
    return {**case.to_dict(), "provider": provider, "mode": mode, "status": "ok"}


def operation(mode: str, loss_fn, inputs: Inputs):
    """``(setup, op)`` timed for ``mode``: the backward's ``setup`` builds a fresh graph outside the timing, so no
    graph is retained (as in training)."""
    wrt = (inputs.hidden, inputs.weight)
    if mode == "forward":
        return None, lambda: loss_fn(*wrt)
    if mode == "backward":
        return (lambda: loss_fn(*wrt)), lambda loss: torch.autograd.grad(loss, wrt)
    return None, lambda: torch.autograd.grad(loss_fn(*wrt), wrt)


def _failure(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"
    message = str(error).strip().split("\n")[0][:160]
    return f"error: {type(error).__name__}: {message}"


def measure(case: Case, provider_name: str, device: torch.device, budget: Budget,
            reference: Callable[[], dict] | None = None) -> list[dict]:
    """Rows for every mode of ``provider_name`` on ``case``; a failure becomes a row's status, never an exception.

    ``reference`` gives the float64 loss and gradients, asked for only after the measurements (it may load a file).
    """
    provider = PROVIDERS[provider_name]
    inputs = make_inputs(case, device)
    try:
        built = provider.build(case, inputs)
    except Exception as error:  # a peer library that fails to set itself up is reported, not fatal
        return [{**case_row(case, provider_name, mode), "status": _failure(error)} for mode in provider.modes]
    rows = {mode: case_row(case, provider_name, mode) for mode in provider.modes}
    # forward+backward first: its call warms up (and compiles) every code path, so the other modes need no warm-up
    for index, mode in enumerate(sorted(provider.modes, key=WARM_UP_ORDER.index)):
        row = rows[mode]
        try:
            setup, op = (None, built) if provider_name == "floor" else operation(mode, built, inputs)
            if index == 0:  # the warm-up
                op(*(() if setup is None else (setup(),)))
            probe = MemoryProbe(device)
            if device.type == "cuda":
                args = () if setup is None else (setup(),)
                with probe:
                    result = op(*args)
                del result, args
            timing = time_op(op, device, budget, setup, first_rep=None if device.type == "cuda" else probe)
        except Exception as error:
            row["status"] = _failure(error)
            continue
        finally:
            setup = op = None
            _release(device)
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps)
        if provider_name != "floor":
            row.update(peak_mb=probe.peak_mb, delta_mb=probe.delta_mb)
        gemms = USEFUL_GEMMS[(case.loss, mode)]
        if gemms:
            row["tflops"] = gemms * 2 * case.tokens * case.hidden * case.vocab / (timing.median_ms * 1e-3) / 1e12
    rows = list(rows.values())
    if reference is not None and provider_name != "floor" and any(r["status"] == "ok" for r in rows):
        errors = _errors(built, inputs, reference())
        for row in rows:
            row.update(errors)
    return rows


def _errors(loss_fn, inputs: Inputs, reference: dict) -> dict:
    try:
        loss = loss_fn(inputs.hidden, inputs.weight)
        grad_hidden, grad_weight = torch.autograd.grad(loss, (inputs.hidden, inputs.weight))
    except Exception:
        return {}
    return {"loss_err": relative_error(loss.detach(), reference["loss"]),
            "grad_hidden_err": relative_error(grad_hidden, reference["grad_hidden"]),
            "grad_weight_err": relative_error(grad_weight, reference["grad_weight"])}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    """Subprocess entry: measure one (case, provider) on the CPU and print its rows as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True, help="the Case as JSON")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--budget", required=True, help="the timing Budget as JSON")
    parser.add_argument("--reference", help="torch.save'd float64 loss and gradients for the error columns")
    args = parser.parse_args()
    case, budget = Case(**json.loads(args.case)), Budget(**json.loads(args.budget))
    reference = (lambda: torch.load(args.reference)) if args.reference else None
    try:
        rows = measure(case, args.provider, torch.device("cpu"), budget, reference)
    except Exception as error:
        traceback.print_exc()
        rows = [{**case_row(case, args.provider, "forward"), "status": _failure(error)}]
    print(ROWS_MARKER + json.dumps(rows), flush=True)


if __name__ == "__main__":
    sys.exit(main())
