"""Torch emulation of TF32 tensor-core products, for checking kernel v2's 3xTF32 split on a CPU.

A TF32 ``mma`` reads only the top 19 bits of each fp32 operand (sign, 8 exponent bits, 10 mantissa bits:
the low 13 bits are ignored, i.e. truncated), multiplies exactly (11 x 11 significant bits fit in fp32's
24) and accumulates in fp32.  The emulation below does the same: operands truncated to TF32, products and
the sum of each k-step of 8 in float64 (exact for these sizes), the running accumulator rounded to fp32
after every k-step (HMMA.1688 / wgmma k=8).  The split is the kernel's: hi = round-to-nearest TF32 of x
(``_tf32_split``: add 0x1000 to the bit pattern, clear the low 13 bits), lo = x - hi (exact).
"""

from __future__ import annotations

import torch


def tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (nearest, ties away from zero on the magnitude), as the kernel's _tf32_split."""
    b = x.contiguous().view(torch.int32)
    return ((b + 0x1000) & -8192).view(torch.float32)


def tf32_trunc(x: torch.Tensor) -> torch.Tensor:
    """What the tensor core sees of an fp32 operand: the low 13 mantissa bits dropped."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = tf32_rna(x)
    return hi, x - hi


def mma_tf32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """acc + a @ b on TF32 tensor cores (batched or not): k-steps of 8, fp32 accumulator."""
    a64, b64 = tf32_trunc(a).double(), tf32_trunc(b).double()
    acc = acc.float()
    for k0 in range(0, a.shape[-1], 8):
        acc = (acc.double() + a64[..., k0:k0 + 8] @ b64[..., k0:k0 + 8, :]).float()
    return acc


def dot_3xtf32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """The kernel's ``_mma`` with precision "tf32x3": a_lo·b_hi + a_hi·b_lo + a_hi·b_hi, small terms first."""
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    acc = mma_tf32(a_lo, b_hi, acc)
    acc = mma_tf32(a_hi, b_lo, acc)
    return mma_tf32(a_hi, b_hi, acc)


def dot_1xtf32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    return mma_tf32(a, b, acc)


def emulated_linear(dot):
    """A drop-in for ``vsml.engine.cell._linear`` whose matmuls run through ``dot`` (e.g. dot_3xtf32)."""
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if w.dim() == 2:
            xf = x.reshape(-1, x.shape[-1])
            y = dot(xf, w.t(), torch.zeros(xf.shape[0], w.shape[0], dtype=torch.float32))
            y = y.reshape(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
        e = x.shape[0]
        xf = x.reshape(e, -1, x.shape[-1])
        y = dot(xf, w.transpose(1, 2), torch.zeros(e, xf.shape[1], w.shape[1], dtype=torch.float32))
        if b is not None:
            y = y + b[:, None, :]
        return y.reshape(*x.shape[:-1], w.shape[-2])
    return _linear
