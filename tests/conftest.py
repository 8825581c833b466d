"""Shared test setup. Triton kernels run on the CPU through the interpreter when no GPU is present; the variable must
be set before any kernel is defined, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
