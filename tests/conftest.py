"""Shared test set-up: wandb off, Triton interpreter on CPU-only machines (set before `kernels` is imported)."""

import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test tensors are tiny: intra-op threads only add overhead, and with OpenMP spin-waiting on a
# busy 2-core machine they make small ops up to ~100x slower.
torch.set_num_threads(1)
