"""Meta-gradient estimators behind one interface, the meta-optimiser and gradient clipping.

An :class:`Estimator` maps (θ, a batch of data episodes, step) to (ĝ ≈ ∇_θ L(θ), metrics), with
L the mean online cross-entropy (vsml.md §2.1).  The train loop then does::

    theta = torch.nn.Parameter(learner.init_theta(gen))
    opt = make_optimizer(theta, lr=0.025)                  # ES reference; BPTT reference lr 1e-3
    for step in range(n):
        grad, metrics = estimator.estimate(theta.detach(), x, y, num_classes, step)
        theta.grad = grad
        opt.step()

* :class:`ESEstimator` — antithetic ES (vsml.md §2.2) over a population evaluated in one batched
  ``learner.unroll`` with per-episode θ.
* :class:`BPTTEstimator` — (truncated, checkpointed) backprop (vsml.md §2.3), clipped inside.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from vsml.estimators.bptt import BPTTConfig, bptt_gradient
from vsml.estimators.es import ESConfig, es_ask, es_tell, pair_seed
from vsml.learners.base import is_meta_trainable, state_generator, state_index, state_repeat_interleave

__all__ = ["BPTTEstimator", "ESEstimator", "Estimator", "clip_grad", "grad_norm", "make_optimizer",
           "per_episode_init_state", "state_seed"]


def state_seed(seed: int, step: int, index: int) -> int:
    """Seed of pair ``index``'s initial inner state at meta-step ``step`` (per-pair streams)."""
    return pair_seed(pair_seed(seed, step, -1), index, -1)


def per_episode_init_state(learner: Any, seeds: list[int], in_dim: int, num_classes: int,
                           dtype: torch.dtype, device: torch.device) -> Any:
    """``len(seeds)`` initial states, state i drawn from its own generator on ``device`` seeded ``seeds[i]``.

    The VSML network takes the generators at once (one batched draw); other learners are drawn one
    episode at a time and concatenated."""
    from vsml.engine.params import episode_generators
    from vsml.learners.base import state_cat
    if getattr(learner, "device_generators", False):               # the VSML network: one batched draw
        return learner.init_state(len(seeds), in_dim, num_classes, episode_generators(seeds, device), dtype,
                                  device)
    return state_cat([learner.init_state(1, in_dim, num_classes, state_generator(learner, s, device), dtype, device)
                      for s in seeds])


@runtime_checkable
class Estimator(Protocol):
    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        """Returns (grad with θ's shape, metrics: dict of Python floats)."""
        ...


def _check_meta_trainable(learner: Any, who: str) -> None:
    if not is_meta_trainable(learner):
        raise ValueError(f"{who}: learner {type(learner).__name__} is not meta-trainable "
                         f"(meta_trainable=False, empty θ); evaluate it without an estimator")


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dim() < 3:
        raise ValueError(f"x must have shape [E, T, D] (or [E, T, H, W, ...]); got {list(x.shape)}")
    x = x.reshape(x.shape[0], x.shape[1], -1)                               # [E, T, D]
    if tuple(y.shape) != tuple(x.shape[:2]):
        raise ValueError(f"y has shape {list(y.shape)} but x has [E, T] = {list(x.shape[:2])}")
    return x


class ESEstimator:
    """Antithetic ES on the online meta-loss (vsml.md §2.2).

    ``estimate(theta, x, y, C, step)`` with x [P, T, ...], y [P, T]: one data episode per pair.
    It builds the 2P perturbed θ ± σε_i (noise regenerated from (cfg.seed, step, i)) as ONE
    per-episode θ tensor [2P, *θ], repeats every data episode twice (x.repeat_interleave(2, 0))
    and draws P initial states from a generator seeded by (cfg.seed, step), each repeated for
    both members of its pair (common random numbers: both members share data and initial state).
    The whole population runs in one ``learner.unroll`` under ``torch.no_grad`` (or in chunks of
    ``max_batch`` members, an even number, to bound memory).  Member loss = mean over t of the
    online CE.  Metrics: those of :func:`vsml.estimators.es.es_tell` plus ``accuracy`` (mean online accuracy
    over the population).
    """

    def __init__(self, learner: Any, cfg: ESConfig, max_batch: int | None = None):
        _check_meta_trainable(learner, "ESEstimator")
        if max_batch is not None and (max_batch < 2 or max_batch % 2):
            raise ValueError(f"max_batch must be an even integer >= 2 (whole antithetic pairs) or None, "
                             f"got {max_batch}")
        self.learner = learner
        self.cfg = cfg
        self.max_batch = max_batch

    def initial_state(self, num_pairs: int, in_dim: int, num_classes: int, step: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                      pairs: range | None = None) -> Any:
        """The per-pair initial states of meta-step ``step`` (before repeat_interleave(2)).

        On the CPU (``pairs`` None): all P drawn from one ``Generator().manual_seed(pair_seed(cfg.seed,
        step, -1))`` (reproducible on any machine; the numbers of every earlier version).  On any other
        device, or for a subset ``pairs`` of the P pairs (one rank's share): per-pair streams, pair i from
        its own generator on ``device`` seeded by :func:`state_seed` (cfg.seed, step, i), so a rank draws
        only its own pairs, on the GPU, and the draw does not depend on how the pairs are split.
        """
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if pairs is None and dev.type == "cpu":
            gen = torch.Generator().manual_seed(pair_seed(self.cfg.seed, step, -1))
            return self.learner.init_state(num_pairs, in_dim, num_classes, gen, dtype, device)
        idx = range(num_pairs) if pairs is None else pairs
        return per_episode_init_state(self.learner, [state_seed(self.cfg.seed, step, i) for i in idx], in_dim,
                                      num_classes, dtype, dev)

    def member_losses(self, population: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                      step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean online CE and accuracy of every member: population [2P, *θ], x [P, T, D] -> ([2P], [2P])."""
        p = x.shape[0]
        state = state_repeat_interleave(
            self.initial_state(p, x.shape[2], num_classes, step, population.dtype, population.device), 2)
        x2 = x.repeat_interleave(2, 0)                                      # [2P, T, D]
        y2 = y.repeat_interleave(2, 0)                                      # [2P, T]
        n = 2 * p
        mb = n if self.max_batch is None else self.max_batch
        losses, accs = [], []
        with torch.no_grad():
            for m0 in range(0, n, mb):
                m1 = min(n, m0 + mb)
                st = state if (m0 == 0 and m1 == n) else state_index(state, slice(m0, m1))
                out = self.learner.unroll(population[m0:m1], x2[m0:m1], y2[m0:m1], num_classes, state=st)
                losses.append(out.loss.mean(1))                             # [m]
                accs.append(out.correct.to(population.dtype).mean(1))
        return torch.cat(losses), torch.cat(accs)

    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        x = _check_batch(x, y)
        if x.shape[0] != self.cfg.pairs:
            raise ValueError(f"ESEstimator needs one data episode per antithetic pair: x has "
                             f"{x.shape[0]} episodes but ESConfig.pairs = {self.cfg.pairs}")
        theta = theta.detach()
        pop = es_ask(theta, self.cfg, step)                                 # [2P, *θ]
        losses, accs = self.member_losses(pop, x, y, num_classes, step)
        del pop
        grad, metrics = es_tell(theta, losses, self.cfg, step)
        metrics["accuracy"] = float(accs.mean())
        return grad, metrics


class BPTTEstimator:
    """Backprop through the online episode (vsml.md §2.3), see :func:`vsml.estimators.bptt.bptt_gradient`.

    ``estimate(theta, x, y, C, step)`` with x [E, T, ...] a meta-batch evaluated with shared θ;
    initial states drawn from ``Generator().manual_seed(pair_seed(seed, step, -1))``.  The
    returned gradient is already clipped to ``cfg.clip_grad_norm``; ``metrics["grad_norm"]`` is
    the unclipped norm.
    """

    def __init__(self, learner: Any, cfg: BPTTConfig, seed: int = 0):
        _check_meta_trainable(learner, "BPTTEstimator")
        self.learner = learner
        self.cfg = cfg
        self.seed = int(seed)

    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        x = _check_batch(x, y)
        # on the run's device for the VSML network (a CPU generator on the CPU: the earlier numbers)
        gen = state_generator(self.learner, pair_seed(self.seed, step, -1), theta.device)
        return bptt_gradient(self.learner, theta.detach(), x, y, num_classes, self.cfg, gen)


# --------------------------------------------------------------------------------------------
# meta-optimiser


def make_optimizer(theta_param: torch.nn.Parameter, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam on θ (vsml.md §2.2: lr 0.025, β (0.9, 0.999), eps 1e-8 for ES; §2.3: lr 1e-3 for BPTT).

    With ``weight_decay > 0`` it is AdamW: decoupled decay θ ← θ − lr·wd·θ applied besides the Adam
    step (not added to the gradient, so it is not rescaled by Adam's second moment).  The
    reference uses no weight decay.  Usage: ``theta.grad = grad; opt.step()``.
    """
    if not isinstance(theta_param, torch.Tensor) or not theta_param.is_leaf:
        raise TypeError("make_optimizer needs a leaf tensor / torch.nn.Parameter θ")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if weight_decay > 0:
        return torch.optim.AdamW([theta_param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.Adam([theta_param], lr=lr, betas=betas, eps=eps, weight_decay=0.0)


def grad_norm(grad: torch.Tensor) -> float:
    """Global L2 norm of a gradient tensor."""
    return float(grad.detach().norm())


def clip_grad(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale ``grad`` so that its global L2 norm is at most ``max_norm`` (0 or less: unchanged).

    A gradient with a non-finite norm is returned unchanged (clipping cannot repair it; the caller
    should skip the step).  Returns a new tensor; use :func:`grad_norm` for the norm before.
    """
    if max_norm <= 0:
        return grad
    norm = grad_norm(grad)
    if not math.isfinite(norm) or norm <= max_norm:
        return grad
    return grad * (max_norm / (norm + 1e-12))
