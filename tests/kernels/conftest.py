"""Kernel tests run the fused Triton kernel under the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates the kernels, i.e. when ``kernels.vsml_fused`` is
first imported, so it is set here, before any test module of this folder imports ``kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
