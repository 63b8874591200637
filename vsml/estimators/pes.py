"""Truncated ES and Persistent Evolution Strategies (PES) over an unrolled system.

References: badger-bmg-es.md §D.2 (PES, Vicol, Metz & Sohl-Dickstein, ICML 2021) and §D.3 (how
``google/learned_optimization`` implements ``TruncatedES`` and ``TruncatedPES``).

Problem (§D.2).  An unrolled system with inner state s_t, meta-parameters θ, a horizon of T inner
steps split into truncations of K steps, and the loss L(θ) = Σ_t ℓ_t(s_t).  Each call of
:meth:`PES.step` / :meth:`TruncatedES.step` advances every particle by one truncation of K steps
and returns an estimate ĝ of the gradient of the loss of that truncation.

Particles.  ``cfg.particles`` = P antithetic pairs, i.e. M = 2P particles, interleaved as in
:mod:`vsml.estimators.es`: member 2i runs θ + σε_i, member 2i+1 runs θ − σε_i, ε_i ~ N(0, I) (unit noise,
perturbation σε_i).  ε_i of truncation ``step_index`` is regenerated from (cfg.seed, step_index, i)
with :func:`vsml.estimators.es.sample_noise`.

Truncated ES (§D.3, ``truncated_es.py``).  Both members of a pair start the truncation from the
same state; ĝ = (1/P) Σ_i ε_i (L_i⁺ − L_i⁻)/(2σ), with L the truncation's loss; afterwards both
members continue from the *positive* member's state.  It ignores θ's influence on the state
carried into the truncation, hence it is **biased** for the full-horizon gradient.

PES (§D.2, Vicol et al. 2021, antithetic form as in learned_optimization ``truncated_pes.py``).
Every particle keeps its own inner state (the two members of a pair diverge), and every pair keeps
the accumulated perturbation of the current episode, ξ_i = Σ_{truncations so far} ε_i (the
negative member's accumulator is −ξ_i, so only ξ_i [P, *θ] is stored).  Per truncation:

    ξ_i ← ξ_i + ε_i
    ĝ   = (1/P) Σ_i ξ_i (L_i⁺ − L_i⁻) / (2σ)

This is §D.2's ĝ = mean over pairs of (L⁺ − L⁻)/(2σ²)·ξ⁺ with ξ⁺ in perturbation units (σ·ξ_i
here), i.e. the same estimator written with unit noise as in :mod:`vsml.estimators.es`.  Summed over the
truncations of an episode, E[ĝ] is the gradient of the Gaussian-smoothed full-horizon loss
(**unbiased**); its variance grows with the number of truncations so far (‖ξ‖ ~ √n).

Per-truncation loss L (§D.2): ``reduction="mean"`` (learned_optimization: mean over the K steps)
or ``"sum"`` (the toy PES code: summed loss).

Resets (§D.2, "Resets inside a truncation").  All particles share the inner time t.  When t
reaches the horizon T every inner state is re-initialised (``system.init_state``, a new episode)
and t restarts at 0.  If the episode ends *inside* a truncation (T not a multiple of K, or K > T),
the truncation is split into segments at the boundary:

* losses before the reset are weighted by the accumulated ξ (which already includes the current ε);
* losses after the reset are weighted by the current ε only (the new episode runs under it);
* afterwards ξ ← ε if an episode started during the truncation, or ξ ← 0 if the truncation ended
  exactly at the boundary (the next truncation starts the episode afresh);
* with ``reduction="mean"`` every segment is divided by the same number, K.

Truncated ES uses the same segmentation with weight ε throughout (no accumulator).

Generic interface: any object satisfying :class:`UnrolledSystem`.  :class:`LearnerSystem` adapts a
VSML learner (``VSMLNetwork`` or any :class:`vsml.learners.base.Learner`) plus a data stream.  Usage::

    pes = PES(PESConfig(particles=64, sigma=0.05, truncation=10, horizon=100))
    st = pes.init(theta)
    for k in range(n):
        grad, metrics, st = pes.step(theta.detach(), st, system, k)
        theta.grad = grad; opt.step()

In the training loop PES / truncated ES run as :class:`TruncatedMetaEstimator` (the
:class:`vsml.estimators.base.MetaGradientEstimator` protocol, registered as ``pes`` / ``tes``): the
:class:`PESState` is the estimator state, checkpointed with ``state_dict`` / ``load_state_dict``.

Initial states of episode e are drawn from ``Generator().manual_seed(pair_seed(seed, e, -2))``, so
a run is reproducible from ``cfg.seed`` alone.  Not implemented (gaps): staggered inner-time
offsets per particle (learned_optimization's ``random_initial_iteration_offset``; all particles
reset together, as in evosax ``PersistentES``), fitness shaping, chunked population evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from einops import rearrange

from tasks.base import derive_seed
from vsml.engine.config import ConfigError
from vsml.estimators.base import Problem, register
from vsml.estimators.es import pair_seed, sample_noise
from vsml.learners.base import state_from_leaves, state_index, state_repeat_interleave, tree_flatten

__all__ = ["PES", "LearnerSystem", "PESConfig", "PESState", "TruncatedES", "TruncatedMetaEstimator",
           "UnrolledSystem"]


@runtime_checkable
class UnrolledSystem(Protocol):
    """An inner problem that can be advanced a few steps at a time, per particle.

    State: any tree of tensors with the particle axis first (see :mod:`vsml.learners.base`), so that
    :func:`vsml.learners.base.state_index` can select particles.
    """

    def init_state(self, num_particles: int, generator: torch.Generator) -> Any:
        """Fresh inner states for ``num_particles`` = 2P particles (a new episode, t = 0)."""
        ...

    def unroll(self, thetas: torch.Tensor, state: Any, t0: int, length: int) -> tuple[torch.Tensor, Any]:
        """Advance particle m with θ = thetas[m] ([M, *θ]) for inner steps t0 .. t0+length−1.

        Returns (losses [M, length], new state).
        """
        ...


@dataclass
class PESConfig:
    """Settings of :class:`PES` and :class:`TruncatedES`.

    particles: antithetic pairs P >= 1 (2P particles run).
    sigma: perturbation std σ > 0 (finite).
    truncation: K >= 1 inner steps per estimate.
    horizon: T >= 1 inner steps per episode; the inner states reset when t reaches T.
        T need not be a multiple of K (the truncation is then split at the boundary, see module doc).
    seed: base seed of the noise and of the initial states.
    reduction: per-truncation loss, "mean" (over the K steps; learned_optimization) or "sum".
    """

    particles: int = 64
    sigma: float = 0.05
    truncation: int = 10
    horizon: int = 100
    seed: int = 0
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if not (isinstance(self.particles, int) and self.particles >= 1):
            raise ConfigError(f"PESConfig.particles (antithetic pairs) must be an integer >= 1, got {self.particles!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"PESConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        if not (isinstance(self.truncation, int) and self.truncation >= 1):
            raise ConfigError(f"PESConfig.truncation must be an integer >= 1, got {self.truncation!r}")
        if not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise ConfigError(f"PESConfig.horizon must be an integer >= 1, got {self.horizon!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"PESConfig.seed must be an integer, got {self.seed!r}")
        if self.reduction not in ("mean", "sum"):
            raise ConfigError(f"PESConfig.reduction must be 'mean' or 'sum', got {self.reduction!r}")


@dataclass
class PESState:
    """Estimator state between truncations.

    inner: the system's state of the 2P particles (None until the first step builds it).
    accum: ξ [P, *θ], the accumulated unit perturbations of the current episode (PES only; the
        negative member's is −ξ).  Zeros for TruncatedES.
    t: inner time of the next truncation's first step, in [0, horizon).
    episode: number of episodes started so far minus one (index of the current episode).
    """

    inner: Any
    accum: torch.Tensor
    t: int = 0
    episode: int = 0
    extra: dict = field(default_factory=dict)


class _TruncatedBase:
    persistent: bool = False          # PES: per-particle states + accumulator

    def __init__(self, cfg: PESConfig):
        if not isinstance(cfg, PESConfig):
            raise TypeError(f"expected a PESConfig, got {type(cfg).__name__}")
        self.cfg = cfg

    def init(self, theta: torch.Tensor) -> PESState:
        """Initial estimator state: no inner state yet (built on the first step), ξ = 0, t = 0."""
        theta = theta.detach()
        return PESState(inner=None, accum=torch.zeros((self.cfg.particles, *theta.shape), dtype=theta.dtype,
                                                      device=theta.device), t=0, episode=0)

    def _fresh(self, system: UnrolledSystem, episode: int) -> Any:
        # on the system's device (a CPU generator on the CPU: the numbers of every earlier version)
        from vsml.learners.base import state_generator
        gen = state_generator(getattr(system, "learner", None), pair_seed(self.cfg.seed, episode, -2),
                              getattr(system, "device", None))
        return system.init_state(2 * self.cfg.particles, gen)

    def step(self, theta: torch.Tensor, state: PESState, system: UnrolledSystem,
             step_index: int) -> tuple[torch.Tensor, dict, PESState]:
        """One truncation: returns (ĝ shaped like θ, metrics of Python floats, new state).

        ĝ estimates ∇_θ of this truncation's loss (TruncatedES: biased; PES: its sum over an
        episode's truncations is unbiased for the full-horizon loss).  ``step_index`` fixes the
        noise ε_i = sample_noise(cfg.seed, step_index, i); use a new index for every truncation.
        The input state is not modified.
        """
        cfg = self.cfg
        p, k_len, horizon = cfg.particles, cfg.truncation, cfg.horizon
        theta = theta.detach()
        if tuple(state.accum.shape) != (p, *theta.shape):
            raise ValueError(f"state.accum has shape {list(state.accum.shape)}, expected [P, *θ] = "
                             f"{[p, *theta.shape]}; build the state with init(theta)")
        if not 0 <= state.t < horizon:
            raise ValueError(f"state.t = {state.t} outside [0, horizon = {horizon})")
        eps = sample_noise(cfg.seed, step_index, range(p), theta.shape, theta.dtype, theta.device)   # [P, *θ]
        pert = cfg.sigma * eps
        thetas = rearrange(torch.stack([theta + pert, theta - pert], 1), "p sign ... -> (p sign) ...")   # [2P, *θ]
        del pert

        inner, t, episode = state.inner, state.t, state.episode
        if inner is None:
            inner = self._fresh(system, episode)
        xi = (state.accum + eps) if self.persistent else eps                   # [P, *θ] weight of segment 1
        grad_flat = torch.zeros(theta.numel(), dtype=torch.float64, device=theta.device)
        remaining, resets, loss_sum, n_loss = k_len, 0, 0.0, 0
        with torch.no_grad():
            while remaining > 0:
                n = min(remaining, horizon - t)
                losses, inner = system.unroll(thetas, inner, t, n)
                losses = torch.as_tensor(losses).detach().to(torch.float64)
                if tuple(losses.shape) != (2 * p, n):
                    raise ValueError(f"system.unroll returned losses of shape {list(losses.shape)}, "
                                     f"expected [2P, length] = {[2 * p, n]}")
                loss_sum += float(losses.sum())
                n_loss += losses.numel()
                seg = rearrange(losses.sum(1), "(p sign) -> p sign", sign=2)  # sign 0: +ε, 1: −ε
                diff = seg[:, 0] - seg[:, 1]                                   # [P]  L⁺ − L⁻
                grad_flat += diff @ xi.reshape(p, -1).to(torch.float64)
                t += n
                remaining -= n
                if t == horizon:                                              # episode ends: reset
                    t, episode, resets = 0, episode + 1, resets + 1
                    inner = self._fresh(system, episode)
                    # a new episode runs under the current ε only (§D.2); none yet if truncation done
                    xi = eps if remaining > 0 else torch.zeros_like(eps)
        denom = 2.0 * cfg.sigma * p * (k_len if cfg.reduction == "mean" else 1)
        grad = (grad_flat / denom).to(theta.dtype).reshape(theta.shape)

        if self.persistent:
            accum = xi                                                         # ξ + ε, ε or 0 (resets)
        else:
            accum = state.accum
            # truncated ES: both members continue from the positive member's state (§D.3)
            idx = torch.arange(0, 2 * p, 2).repeat_interleave(2)
            inner = state_index(inner, idx)
        metrics = {
            "loss_mean": loss_sum / max(n_loss, 1),
            "grad_norm": float(grad.norm()),
            "accum_norm": float(accum.norm()) if self.persistent else 0.0,
            "t": float(t),
            "episode": float(episode),
            "resets": float(resets),
        }
        return grad, metrics, PESState(inner=inner, accum=accum, t=t, episode=episode)


class TruncatedES(_TruncatedBase):
    """Antithetic truncated ES (badger-bmg-es.md §D.3, learned_optimization ``TruncatedES``).

    ĝ = (1/P) Σ_i ε_i (L_i⁺ − L_i⁻)/(2σ) over the current truncation's loss; both members start
    from the same (positive member's) state.  Biased: ignores θ → carried state.
    """

    persistent = False


class PES(_TruncatedBase):
    """Persistent ES (Vicol et al. 2021; badger-bmg-es.md §D.2, antithetic form of §D.2/§D.3).

    ξ_i ← ξ_i + ε_i;  ĝ = (1/P) Σ_i ξ_i (L_i⁺ − L_i⁻)/(2σ); per-particle persistent inner states;
    reset-aware accumulator (module docstring).  Unbiased for the smoothed full-horizon loss.
    """

    persistent = True


# --------------------------------------------------------------------------------------------
# VSML adapter


class LearnerSystem:
    """A learner (e.g. :class:`vsml.VSMLNetwork`) plus a data stream as an :class:`UnrolledSystem`.

    ``sample(num, length, seed) -> (x [num, length, ...], y [num, length], num_classes)`` draws
    ``num`` data episodes of ``length`` = horizon examples.  At every reset (``init_state``) one
    episode is drawn per antithetic pair and shared by both members (common random numbers), as
    is the learner's initial state (``state_repeat_interleave``).  ``unroll`` feeds the slice
    x[:, t0:t0+length] to ``learner.unroll`` with per-particle θ [2P, *θ] and carries the state.
    The per-step loss is the learner's online cross-entropy [2P, length].

    State: ``{"inner": learner state [2P], "x": [2P, H, D], "y": [2P, H], "num_classes": C}``.
    """

    def __init__(self, learner: Any, sample: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor, int]],
                 horizon: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if not (isinstance(horizon, int) and horizon >= 1):
            raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
        self.learner = learner
        self.sample = sample
        self.horizon = horizon
        self.dtype = dtype
        self.device = device

    def init_state(self, num_particles: int, generator: torch.Generator) -> dict:
        if num_particles < 2 or num_particles % 2:
            raise ValueError(f"LearnerSystem needs an even number of particles (antithetic pairs), got {num_particles}")
        p = num_particles // 2
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        x, y, num_classes = self.sample(p, self.horizon, seed)
        x = x.reshape(x.shape[0], x.shape[1], -1).to(self.dtype)                # [P, H, D]
        if x.shape[0] != p or x.shape[1] != self.horizon or tuple(y.shape) != (p, self.horizon):
            raise ValueError(f"sample({p}, {self.horizon}, seed) must return x [P, H, ...] and y [P, H] "
                             f"with P = {p}, H = {self.horizon}; got {list(x.shape)} and {list(y.shape)}")
        inner = self.learner.init_state(p, x.shape[2], int(num_classes), generator, self.dtype, self.device)
        return {"inner": state_repeat_interleave(inner, 2),
                "x": x.repeat_interleave(2, 0).to(self.device) if self.device is not None else x.repeat_interleave(2, 0),
                "y": y.repeat_interleave(2, 0).to(x.device if self.device is None else self.device),
                "num_classes": int(num_classes)}

    def unroll(self, thetas: torch.Tensor, state: dict, t0: int, length: int) -> tuple[torch.Tensor, dict]:
        if t0 < 0 or t0 + length > state["x"].shape[1]:
            raise ValueError(f"unroll of steps [{t0}, {t0 + length}) outside the episode of length "
                             f"{state['x'].shape[1]}")
        x = state["x"][:, t0:t0 + length]                                      # [2P, length, D]
        y = state["y"][:, t0:t0 + length]                                      # [2P, length]
        with torch.no_grad():
            out = self.learner.unroll(thetas, x, y, state["num_classes"], state=state["inner"])
        return out.loss, {**state, "inner": out.state}


# --------------------------------------------------------------------------------------------
# the training loop's protocol (vsml.estimators.base.MetaGradientEstimator)


@dataclass
class TruncatedMetaEstimator:
    """PES / truncated ES on a fixed :class:`UnrolledSystem` as a
    :class:`vsml.estimators.base.MetaGradientEstimator`: the state is the :class:`PESState`
    (persistent inner states, ξ, t, episode), carried across meta-steps and checkpoints."""

    est: _TruncatedBase
    system: UnrolledSystem
    loss_metric: str = "loss_mean"

    def init(self, theta: torch.Tensor) -> PESState:
        return self.est.init(theta)

    def step(self, theta: torch.Tensor, state: PESState, step: int) -> tuple[torch.Tensor, dict, PESState]:
        return self.est.step(theta, state, self.system, step)

    def state_dict(self, state: PESState) -> dict:
        """PESState -> plain dict of tensors / ints (loads with ``weights_only=True``)."""
        leaves = [] if state.inner is None else tree_flatten(state.inner)[0]
        return {"t": int(state.t), "episode": int(state.episode), "accum": state.accum.detach().cpu(),
                "has_inner": state.inner is not None, "inner_leaves": [t.detach().cpu() for t in leaves]}

    def load_state_dict(self, theta: torch.Tensor, d: dict) -> PESState:
        """Inverse of :meth:`state_dict`: the inner state's structure comes from a fresh draw of the
        same episode, its tensors from ``d``."""
        fresh = self.est.init(theta)
        inner = None
        if d["has_inner"]:
            inner = state_from_leaves(self.est._fresh(self.system, d["episode"]), d["inner_leaves"],
                                      "the saved PES inner state")
        return PESState(inner=inner, accum=d["accum"].to(fresh.accum.device), t=d["t"], episode=d["episode"])


def _build_truncated(cls: type[_TruncatedBase], cfg: Any, problem: Problem) -> TruncatedMetaEstimator:
    """PES / truncated ES over the learner and the training family: episodes of pes.horizon examples,
    advanced by pes.truncation examples per meta-step; noise seed derived from the run seed."""
    pcfg = replace(cfg.pes, seed=derive_seed(cfg.seed, "pes-noise", cfg.pes.seed))

    def sample(num: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        b = problem.sample(num, length, seed)
        return b.x, b.y, b.num_classes

    system = LearnerSystem(problem.learner, sample, horizon=cfg.pes.horizon, device=problem.device)
    return TruncatedMetaEstimator(cls(pcfg), system)


@register("pes", distributed="refuse", why="its particles keep inner states across meta-steps that would have to be sharded and checkpointed per rank (not implemented); run it as one process, or use --estimator es / bptt")
def _build_pes(cfg: Any, problem: Problem) -> TruncatedMetaEstimator:
    return _build_truncated(PES, cfg, problem)


@register("tes", distributed="refuse", why="its particles keep inner states across meta-steps that would have to be sharded and checkpointed per rank (not implemented); run it as one process, or use --estimator es / bptt")
def _build_tes(cfg: Any, problem: Problem) -> TruncatedMetaEstimator:
    return _build_truncated(TruncatedES, cfg, problem)
