"""Inner-loop state of a VSML network and the random initial-state rule (vsml.md §1.6)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable

import torch

from vsml.engine.config import VSMLConfig
from vsml.engine.params import truncated_normal


@dataclass
class VSMLState:
    """Everything a VSML network carries from one example to the next.

    For every dense layer k with A_k inputs and B_k outputs:
        h[k], c[k]  [E, A_k, B_k, N]   sub-LSTM states, one per (input a, output b) pair
        bwd[k]      [E, B_k, M]        backward message waiting to enter layer k at its next
                                       update (for the last layer: the error/label message of
                                       the previous example; zero at the start of an episode)
    Forward messages need not be stored: within a tick they flow from layer 1 to K at once.

    A conv layer k (vsml.md §1.9, ``vsml/engine/conv.py``) with kernel k_k, IC in- and OC out-channels and
    output image Ho x Wo instead has
        h[k], c[k]  [E, k_k, k_k, IC, OC, N]   one state per (tap, in-channel, out-channel), shared
                                              by every output position
        bwd[k]      [E, Ho*Wo*OC, M]          its incoming backward message, flattened (Ho, Wo, OC)
    """

    h: list[torch.Tensor]
    c: list[torch.Tensor]
    bwd: list[torch.Tensor]

    @property
    def num_episodes(self) -> int:
        return self.h[0].shape[0]

    @property
    def in_dim(self) -> int | None:
        """D of a dense first layer; None when the first layer is a conv layer (its state is shared
        across positions and does not depend on the image size)."""
        return self.h[0].shape[1] if self.h[0].dim() == 4 else None

    @property
    def num_classes(self) -> int:
        return self.h[-1].shape[2]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "VSMLState":
        return VSMLState([fn(t) for t in self.h], [fn(t) for t in self.c], [fn(t) for t in self.bwd])

    def detach(self) -> "VSMLState":
        """Cut the autograd graph (truncated BPTT)."""
        return self.map(torch.Tensor.detach)

    def clone(self) -> "VSMLState":
        return self.map(torch.Tensor.clone)

    def to(self, *args, **kwargs) -> "VSMLState":
        return self.map(lambda t: t.to(*args, **kwargs))

    def index(self, idx) -> "VSMLState":
        """Select episodes (first axis)."""
        return self.map(lambda t: t[idx])

    def repeat_interleave(self, repeats: int) -> "VSMLState":
        """[E, ...] -> [E*repeats, ...]: e.g. both members of an antithetic pair share one draw."""
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(states: list["VSMLState"]) -> "VSMLState":
        k = len(states[0].h)
        return VSMLState([torch.cat([s.h[i] for s in states]) for i in range(k)],
                         [torch.cat([s.c[i] for s in states]) for i in range(k)],
                         [torch.cat([s.bwd[i] for s in states]) for i in range(k)])


def init_state(cfg: VSMLConfig, num_episodes: int, in_dim: int, num_classes: int,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> VSMLState:
    """A fresh random state per episode (vsml.md §1.6).

    h = 0; c[..., :R] ~ TruncatedNormal(0, 1/√A_k) cut at ±2σ with R = int(N * init_rand_proportion);
    c[..., R:] = 0; every incoming message zero.  Each of the ``num_episodes`` episodes gets its own
    draw; to share one draw between the two members of an antithetic pair, draw P states and call
    ``repeat_interleave(2)``.  Nothing about the state is learned.

    ``generator``: one generator for the whole batch, or ``num_episodes`` generators (per-episode streams,
    :func:`vsml.engine.params.episode_generators`), each consumed in layer order.  The draw happens on the
    generator's device (a CUDA generator keeps everything on the GPU).
    """
    if num_episodes < 1 or in_dim < 1 or num_classes < 1:
        raise ValueError(f"init_state needs num_episodes, in_dim, num_classes >= 1, got "
                         f"{num_episodes}, {in_dim}, {num_classes}")
    n, m, r = cfg.cell.hidden, cfg.cell.msg, cfg.cell.num_rand
    hs, cs, bwds = [], [], []
    for spec, g in zip(cfg.conv, cfg.conv_geometry(in_dim)):
        # conv tap states [E, k, k, IC, OC, N]; std 1/√(k²·IC) (fan-in) or the reference's 1/√k (§1.6, §8 #3)
        shape = (num_episodes, g.kernel, g.kernel, g.in_channels, g.out_channels)
        std = 1.0 / math.sqrt(g.kernel if spec.state_std == "kernel" else g.kernel * g.kernel * g.in_channels)
        h = torch.zeros(*shape, n, dtype=dtype, device=device)
        c = torch.zeros(*shape, n, dtype=dtype, device=device)
        if r > 0:
            c[..., :r] = truncated_normal((*shape, r), std, generator, dtype, device)
        hs.append(h)
        cs.append(c)
        bwds.append(torch.zeros(num_episodes, g.out_dim, m, dtype=dtype, device=device))
    for a, b in cfg.layer_dims(in_dim, num_classes):
        h = torch.zeros(num_episodes, a, b, n, dtype=dtype, device=device)
        c = torch.zeros(num_episodes, a, b, n, dtype=dtype, device=device)
        if r > 0:
            c[..., :r] = truncated_normal((num_episodes, a, b, r), 1.0 / math.sqrt(a), generator,
                                          dtype, device)
        hs.append(h)
        cs.append(c)
        bwds.append(torch.zeros(num_episodes, b, m, dtype=dtype, device=device))
    return VSMLState(hs, cs, bwds)


@dataclass
class EpisodeOutput:
    """Result of an online unroll.

    logits  [E, T, C]  ŷ_t, computed before y_t was seen
    loss    [E, T]     cross-entropy CE(ŷ_t, y_t)
    correct [E, T]     argmax ŷ_t == y_t
    state   the state after the last example (pass it back in to continue the episode)
    """

    logits: torch.Tensor
    loss: torch.Tensor
    correct: torch.Tensor
    state: Any          # VSMLState for VSML; the baselines return their own state types

    @property
    def accuracy(self) -> torch.Tensor:
        """Online accuracy per episode [E]."""
        return self.correct.float().mean(1)
