"""Gradient-based meta-optimisation: (truncated) backprop through the online episode (vsml.md §2.3).

The meta-loss is the mean online cross-entropy over the episode and the meta-batch,

    L(θ) = 1/(E·T) Σ_e Σ_t CE(ŷ_{e,t}, y_{e,t})            (vsml.md §2.1)

The reference backpropagates through all T = 500 steps (``truncation >= T`` or 0 here).  With a
truncation length K < T the episode is cut into windows [0, K), [K, 2K), ...; the state is carried
from one window to the next but *detached*, and each window contributes ∇_θ of its own summed
loss / (E·T) — a biased estimate (it ignores θ's influence through the carried state) that needs
only one window's graph at a time.  Windows are processed sequentially: forward, backward, next.

Activation checkpointing (``checkpoint_chunk = c > 0``): inside a window the ticks are grouped in
chunks of c; each chunk's unroll runs under ``torch.utils.checkpoint.checkpoint`` (non-reentrant)
as a function of (θ, state tensors), so only the states at chunk boundaries are kept and each
chunk is recomputed during the backward pass.  Peak memory ≈ (K/c) boundary states + one chunk
of activations instead of K ticks of activations (vsml.md §2.5: ~4-5 GB for a 500-step MNIST
episode without rematerialisation).  The gradient is unchanged (recomputation is exact).

Clipping: :func:`bptt_gradient` clips the returned gradient to ``cfg.clip_grad_norm`` (global L2
norm; 0 disables; reference 25) itself, so the caller must not clip again; the *unclipped* norm
is ``metrics["grad_norm"]``.  A non-finite loss or gradient yields a zero gradient and
``metrics["nonfinite"] = 1`` instead of an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from vsml.estimators.base import clip_grad
from vsml.learners.base import state_detach, tree_flatten

__all__ = ["BPTTConfig", "bptt_gradient", "unroll_chunked"]


@dataclass
class BPTTConfig:
    """Backprop meta-gradient settings.

    Attributes:
        truncation: window length K in ticks; 0 (or any K >= T) = full BPTT (the reference).
        checkpoint_chunk: 0 = no activation checkpointing; else chunk length in ticks.
        clip_grad_norm: clip the global gradient norm to this value; 0 = no clipping (reference 25).
        streams: ``--estimator tbptt`` only: split the meta-batch into this many streams of episodes at
            staggered window positions (stream g starts at window ⌊g·W/streams⌋ of its first episode, W the
            windows per episode), so every meta-step mixes early and late windows; 1 = all episodes in step.
    """

    truncation: int = 50
    checkpoint_chunk: int = 0
    clip_grad_norm: float = 25.0
    streams: int = 1

    def __post_init__(self) -> None:
        if int(self.truncation) != self.truncation or self.truncation < 0:
            raise ValueError(f"BPTTConfig.truncation must be an integer >= 0 (0 = full episode), "
                             f"got {self.truncation}")
        if int(self.checkpoint_chunk) != self.checkpoint_chunk or self.checkpoint_chunk < 0:
            raise ValueError(f"BPTTConfig.checkpoint_chunk must be an integer >= 0 (0 = off), "
                             f"got {self.checkpoint_chunk}")
        if int(self.streams) != self.streams or self.streams < 1:
            raise ValueError(f"BPTTConfig.streams must be an integer >= 1, got {self.streams}")
        if not (self.clip_grad_norm >= 0 and math.isfinite(self.clip_grad_norm)):
            raise ValueError(f"BPTTConfig.clip_grad_norm must be a finite number >= 0 (0 = off), "
                             f"got {self.clip_grad_norm}")


def unroll_chunked(learner: Any, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   state: Any, chunk: int, per_episode: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Unroll ``x`` [E, T', D] from ``state`` with activation checkpointing every ``chunk`` ticks.

    Returns (summed loss over E and T' (differentiable), number correct (float), final state); with
    ``per_episode`` the loss and number correct are summed over T' only: [E] each.
    With ``chunk <= 0`` or ``chunk >= T'`` it is a plain unroll.
    """
    t_len = x.shape[1]
    dims = (1,) if per_episode else (0, 1)                # the axes of out.loss [E, T'] that are summed
    if chunk <= 0 or chunk >= t_len or not torch.is_grad_enabled():
        out = learner.unroll(theta, x, y, num_classes, state=state)
        return out.loss.sum(dims), out.correct.sum(dims).to(theta.dtype), out.state
    leaves, rebuild = tree_flatten(state)
    loss_sum = theta.new_zeros(x.shape[:1] if per_episode else ())
    n_correct = theta.new_zeros(x.shape[:1] if per_episode else ())
    for c0 in range(0, t_len, chunk):
        c1 = min(t_len, c0 + chunk)
        xc, yc = x[:, c0:c1], y[:, c0:c1]

        def chunk_fn(th: torch.Tensor, *lv: torch.Tensor, _xc=xc, _yc=yc):
            out = learner.unroll(th, _xc, _yc, num_classes, state=rebuild(lv))
            new_leaves, _ = tree_flatten(out.state)
            return (out.loss.sum(dims), out.correct.sum(dims).to(th.dtype), *new_leaves)

        res = checkpoint(chunk_fn, theta, *leaves, use_reentrant=False)
        loss_sum = loss_sum + res[0]
        n_correct = n_correct + res[1].detach()
        leaves = list(res[2:])
    return loss_sum, n_correct, rebuild(leaves)


def bptt_gradient(learner: Any, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                  cfg: BPTTConfig, generator: torch.Generator | None = None,
                  state: Any = None) -> tuple[torch.Tensor, dict]:
    """∇_θ of the mean online CE over a meta-batch, by (truncated, checkpointed) BPTT.

    Args:
        learner: any :class:`vsml.learners.base.Learner`.
        theta: shared θ (``learner.init_theta()`` shape); not modified.
        x: [E, T, D] (or [E, T, H, W, ...], flattened); y: [E, T] int labels.
        num_classes: C.
        cfg: BPTTConfig.
        generator: draws the initial state (one draw per episode) unless ``state`` is given.
        state: optional initial state.
    Returns:
        (grad shaped like theta — clipped to ``cfg.clip_grad_norm`` when > 0, metrics) with metrics
        ``loss`` (mean online CE), ``accuracy`` (mean online accuracy), ``grad_norm`` (unclipped),
        ``clipped`` (0/1), ``nonfinite`` (0/1), ``truncations``.
    """
    if x.dim() < 3:
        raise ValueError(f"x must have shape [E, T, D]; got {list(x.shape)}")
    e, t_len = x.shape[0], x.shape[1]
    x = x.reshape(e, t_len, -1)                                              # [E, T, D]
    if tuple(y.shape) != (e, t_len):
        raise ValueError(f"y has shape {list(y.shape)} but x has [E, T] = {[e, t_len]}")
    if t_len < 1:
        raise ValueError("bptt_gradient needs an episode of at least one tick")
    th = theta.detach().clone().requires_grad_(True)
    if state is None:
        state = learner.init_state(e, x.shape[2], num_classes, generator, theta.dtype, theta.device)
    k = cfg.truncation if 0 < cfg.truncation < t_len else t_len
    denom = float(e * t_len)
    grad = torch.zeros_like(th)
    loss_total, correct_total, n_trunc = 0.0, 0.0, 0
    nonfinite = False
    with torch.enable_grad():
        for t0 in range(0, t_len, k):
            t1 = min(t_len, t0 + k)
            state = state_detach(state)
            loss_sum, n_correct, state = unroll_chunked(learner, th, x[:, t0:t1], y[:, t0:t1], num_classes,
                                                        state, cfg.checkpoint_chunk)
            n_trunc += 1
            lv = float(loss_sum.detach())
            loss_total += lv
            correct_total += float(n_correct)
            if not math.isfinite(lv):
                nonfinite = True
                break
            (g,) = torch.autograd.grad(loss_sum / denom, th, allow_unused=True)
            if g is not None:
                grad += g
    norm = float(grad.norm()) if not nonfinite else float("nan")
    if not math.isfinite(norm):
        nonfinite = True
        grad = torch.zeros_like(th)
    clipped = not nonfinite and cfg.clip_grad_norm > 0 and norm > cfg.clip_grad_norm
    if clipped:
        grad = clip_grad(grad, cfg.clip_grad_norm)
    metrics = {"loss": loss_total / denom, "accuracy": correct_total / denom, "grad_norm": norm,
               "clipped": float(clipped), "nonfinite": float(nonfinite), "truncations": float(n_trunc)}
    return grad.detach(), metrics
