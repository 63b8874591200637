"""Backend selection: the fused Triton kernel on CUDA, the PyTorch reference path elsewhere.

    from kernels.backend import resolve_backend, unroll
    out = unroll(net, theta, x, y, num_classes=10, generator=g, backend="auto")   # EpisodeOutput

Names:
    "torch"   always the PyTorch path (``VSMLNetwork.unroll``); differentiable.
    "triton"  the fused kernel (``kernels.vsml_fused``); forward only.  Raises ``RuntimeError`` where it
              cannot run: no triton, no CUDA device (unless ``TRITON_INTERPRET=1`` was set before the
              kernels were imported: CPU interpreter, for tests), or gradients requested.
    "auto"    "triton" when the device is CUDA, triton imports, θ is float32 and no gradient is needed;
              "torch" otherwise (including under the CPU interpreter, which is far too slow to train with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vsml.engine.state import EpisodeOutput

from vsml.engine.network import VSMLNetwork
from vsml.engine.state import VSMLState

from . import vsml_fused
from .vsml_fused import fused_available, fused_episode

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device, *, requires_grad: bool = False,
                    dtype: torch.dtype = torch.float32) -> str:
    """Map a backend name to the one that will run: "torch" or "triton".

    Args:
        name: "auto" | "torch" | "triton".
        device: where the tensors live (torch.device, string, or None for CPU).
        requires_grad: gradients must flow through the unroll (the fused kernel has no backward).
        dtype: θ's dtype (the fused kernel computes in float32 only).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "torch":
        return "torch"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "auto":
        if (dev.type == "cuda" and vsml_fused.HAS_TRITON and not vsml_fused.INTERPRET
                and not requires_grad and dtype == torch.float32 and fused_available(dev)[0]):
            return "triton"
        return "torch"
    # forced "triton"
    ok, why = fused_available(dev)
    if not ok:
        raise RuntimeError(f"backend='triton' cannot run here: {why}")
    if requires_grad:
        raise RuntimeError("backend='triton' is forward-only (no backward pass); gradients were requested "
                           "(θ or the state requires grad under torch.enable_grad). Use backend='torch' for "
                           "backprop meta-training, or run the unroll under torch.no_grad().")
    if dtype != torch.float32:
        raise RuntimeError(f"backend='triton' computes in float32 only, got θ of dtype {dtype}; cast θ and x "
                           f"with .float() or use backend='torch'")
    return "triton"


def _needs_grad(theta: torch.Tensor, state: VSMLState | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [theta] + ([] if state is None else [*state.h, *state.c, *state.bwd])
    return any(torch.is_tensor(t) and t.requires_grad for t in tensors)


def unroll(net: VSMLNetwork, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
           num_classes: int | None = None, state: VSMLState | None = None,
           generator: torch.Generator | None = None, backend: str = "auto", **kernel_kwargs) -> EpisodeOutput:
    """``VSMLNetwork.unroll`` with a backend switch; same arguments, same ``EpisodeOutput``.

    With the fused backend the inputs are checked exactly like the torch path (``net.check_inputs``), a
    fresh state is drawn with ``generator`` when none is passed (so both backends start from the same
    state for the same generator), and loss / correct are computed from the kernel's logits the same way
    as the torch path.  ``kernel_kwargs`` go to :func:`kernels.vsml_fused.fused_episode` (block_a,
    use_dot, precision, num_warps)."""
    if not torch.is_tensor(theta):
        raise TypeError(f"θ must be a torch.Tensor, got {type(theta).__name__}")
    which = resolve_backend(backend, theta.device, requires_grad=_needs_grad(theta, state), dtype=theta.dtype)
    if which == "torch":
        if kernel_kwargs:
            raise TypeError(f"kernel options {sorted(kernel_kwargs)} only apply to the triton backend")
        return net.unroll(theta, x, y, num_classes=num_classes, state=state, generator=generator)
    x, num_classes = net.check_inputs(theta, x, y, num_classes, state)
    e, t_len, d = x.shape
    y = y.long()
    if state is None:
        state = net.init_state(e, d, num_classes, generator, theta.dtype, theta.device)
    res = fused_episode(net.cfg, theta.contiguous(), x.contiguous(), y.contiguous(),
                        state.map(torch.Tensor.contiguous), check_labels=False, **kernel_kwargs)
    logits = res.logits
    loss = F.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1), reduction="none").reshape(e, t_len)
    correct = logits.argmax(-1) == y
    return EpisodeOutput(logits, loss, correct, res.state)
