"""Bootstrapped meta-gradients (BMG; Flennerhag et al., ICLR 2022) for learners whose "parameters"
are an inner state: VSML's sub-LSTM states, the Meta-RNN's h/c, a baseline's explicit weights.

Reference: badger-bmg-es.md §C.1 (the algorithm) and §C.2 (the mapping to memory-based / VSML-style
learners, Irie & Schmidhuber 2023).  Mapping used here (§C.2, "For VSML"): the learner state s plays
the role of the learner parameters x, the learner's forward pass over one labelled example is the
meta-learned update rule φ(s, τ_t; θ), and θ are the meta-parameters w.

Per meta-step, with one data episode per row, x [E, T, D], y [E, T], T >= K + L + Q
(``k_steps`` = K, ``l_steps`` = L, ``probe`` = Q)::

    s_0         fresh initial state (drawn from (seed, step))
    s_K(θ)      = unroll(θ, s_0, x[:, 0:K])                    K steps WITH autograd (§C.1 step 1)
    probe batch = (x, y)[:, K+L : K+L+Q]                       Q held-out labelled examples

    target (no gradient, from s_K.detach(); §C.1 step 2):
      grounding "data"      s̃ = unroll(θ, s_K, x[:, K:K+L])          L learned-rule steps on extra
                            labelled examples; the grounding comes from the extra labels (§C.2,
                            Irie & Schmidhuber: no explicit gradient step)
      grounding "gradient"  s' = unroll(θ, s_K, x[:, K:K+L−1])        L − 1 learned-rule steps, then one
                            plain gradient step on the state:
                            s̃ = s' − α ∇_s f(s'),   f(s) = mean_q CE(π_θ(·|x_q; s), y_q)
                            (per episode; for a learner with explicit weights as its state this is a
                            plain SGD step on those weights, §C.1's x̃ = x − α∇f(x))

    matching μ (§C.1 step 3), averaged over the E episodes:
      "kl"   μ = mean_{e,q} KL(π(·|x_q; s̃) ‖ π_θ(·|x_q; s_K(θ)))      target first (§C.2 pitfalls)
      "l2"   μ = mean_e ½ ‖s̃ − s_K(θ)‖²   over every floating leaf of the state

    meta-loss  M(θ) = μ + λ · (1/(E·K)) Σ_{e, t<K} CE(ŷ_t, y_t)      (λ = ``task_weight``, default 0)
    ĝ = ∇_θ M, clipped to ``clip_grad_norm``.

π_θ(·|x_q; s) is the learner's prediction for probe input x_q from state s *without* consuming it:
one step of ``learner.unroll`` from a copy of s (the online protocol predicts ŷ_t before y_t is
used, so the dummy label never matters); the Q probes run as E·Q independent one-step episodes
(``state_repeat_interleave``), and the resulting states are discarded.

Which meta-gradient BMG reduces to (§C.1 "Special case"; tested in tests/test_bmg.py).  With L = 1,
grounding "gradient" and matching "l2",  s̃ = s_K − α∇_s f(s_K)  and

    ∇_θ μ = (1/E) Σ_e (∂s_K,e/∂θ)ᵀ (s_K,e − s̃_e) = α · (1/E) Σ_e (∂s_K,e/∂θ)ᵀ ∇_s f_e(s_K,e)
          = α · ∇_θ [ (1/E) Σ_e f_e(s_K,e(θ); θ̄) ]

i.e. α times the K-step meta-gradient of the probe loss *through the state*, with θ's direct use in
the probe prediction held fixed (θ̄ = stop-gradient θ).  For a learner whose prediction does not
use θ directly (explicit weights, a fixed readout) this is exactly the usual K-step meta-gradient
∇_θ f(s_K(θ)).  For VSML / Meta-RNN, whose prediction step itself runs θ, the full ∇_θ f(s_K(θ); θ)
has an extra direct term, so the two differ in direction.

Cost per meta-step: K steps forward + backward, L forward-only steps, and 1 − 3 probe evaluations of
E·Q one-step episodes.  Horizon seen by the meta-objective: K + L examples, with backprop through
only K of them (§C.1: "L > 1 extends the effective horizon to K + L").

Stateless between meta-steps (every episode, initial state and probe is derived from (seed, step)),
so a resumed run repeats the uninterrupted one exactly.

Not implemented (gaps): the online/persistent variant that continues the learner from s_{K+L−1}
across meta-steps (§C.1 replication, ``continue_from``); mixture matching functions; per-sample
L2 norms (GradNCP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from vsml.estimators.base import EpisodeBatchEstimator, Problem, clip_grad, register
from vsml.estimators.bptt import unroll_chunked
from vsml.engine.config import ConfigError
from vsml.estimators.es import pair_seed
from vsml.learners.base import is_meta_trainable, state_detach, state_repeat_interleave, tree_flatten

__all__ = ["BMGConfig", "BMGEstimator", "bmg_gradient", "match_l2", "probe_logits", "state_gradient_step"]

MATCHINGS = ("kl", "l2")
GROUNDINGS = ("data", "gradient")


@dataclass(frozen=True)
class BMGConfig:
    """Bootstrapped meta-gradient settings (badger-bmg-es.md §C.1 / §C.2).

    Attributes:
        k_steps: K, inner steps (examples) unrolled with autograd; backprop runs through these only.
        l_steps: L >= 1, bootstrap steps of the target: L learned-rule steps (grounding "data") or
            L − 1 learned-rule steps plus one plain gradient step on the state (grounding "gradient").
        matching: "kl" (KL(target ‖ current) of the probe predictions) or "l2" (½‖s̃ − s_K‖² on the states).
        grounding: "data" (extra labelled examples) or "gradient" (a gradient step on the state).
        probe: Q >= 1 held-out labelled examples per episode for the KL matching and the gradient step.
        alpha: step size α > 0 of the gradient grounding step (unused with grounding "data").
        task_weight: λ >= 0, weight of the online CE over the K differentiable steps added to μ.
        checkpoint_chunk: activation checkpointing of the K-step unroll every this many ticks (0: off).
        clip_grad_norm: clip the global norm of ĝ to this (0: off).
    """

    k_steps: int = 50
    l_steps: int = 50
    matching: Literal["kl", "l2"] = "kl"
    grounding: Literal["data", "gradient"] = "data"
    probe: int = 20
    alpha: float = 1.0
    task_weight: float = 0.0
    checkpoint_chunk: int = 0
    clip_grad_norm: float = 25.0

    def __post_init__(self) -> None:
        for name, lo in (("k_steps", 1), ("l_steps", 1), ("probe", 1), ("checkpoint_chunk", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"BMGConfig.{name} must be an integer >= {lo}, got {v!r}")
        if self.matching not in MATCHINGS:
            raise ConfigError(f"BMGConfig.matching must be one of {MATCHINGS} (KL on probe outputs or L2 on "
                              f"states), got {self.matching!r}")
        if self.grounding not in GROUNDINGS:
            raise ConfigError(f"BMGConfig.grounding must be one of {GROUNDINGS} (extra labelled steps or a "
                              f"gradient step on the state), got {self.grounding!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"BMGConfig.alpha (grounding step size) must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.task_weight, (int, float)) and math.isfinite(self.task_weight)
                and self.task_weight >= 0):
            raise ConfigError(f"BMGConfig.task_weight must be a finite number >= 0, got {self.task_weight!r}")
        if not (isinstance(self.clip_grad_norm, (int, float)) and math.isfinite(self.clip_grad_norm)
                and self.clip_grad_norm >= 0):
            raise ConfigError(f"BMGConfig.clip_grad_norm must be a finite number >= 0 (0 = off), "
                              f"got {self.clip_grad_norm!r}")

    @property
    def episode_length(self) -> int:
        """Examples per episode the estimator needs: K + L + Q."""
        return self.k_steps + self.l_steps + self.probe


# --------------------------------------------------------------------------------------------
# building blocks


def probe_logits(learner: Any, theta: torch.Tensor, state: Any, xq: torch.Tensor, num_classes: int) -> torch.Tensor:
    """π_θ(·|x_q; s) as logits: the prediction for every probe input from ``state``, not consuming it.

    theta: shared θ; state: E episodes; xq [E, Q, D] -> logits [E, Q, C].  Runs E·Q one-step
    episodes from copies of the state (differentiable w.r.t. θ and the state).
    """
    e, q, _ = xq.shape
    rep = state_repeat_interleave(state, q)                                   # [E*Q] (episode-major)
    xr = rearrange(xq, "e q d -> (e q) 1 d")                                  # E·Q one-step episodes
    yr = torch.zeros(e * q, 1, dtype=torch.long, device=xq.device)            # unused: ŷ precedes y
    out = learner.unroll(theta, xr, yr, num_classes, state=rep)
    return rearrange(out.logits, "(e q) 1 c -> e q c", e=e)


def _float_leaves(state: Any) -> tuple[list[torch.Tensor], list[int], Any]:
    leaves, rebuild = tree_flatten(state)
    idx = [i for i, t in enumerate(leaves) if t.is_floating_point()]
    return leaves, idx, rebuild


def match_l2(target: Any, current: Any) -> torch.Tensor:
    """mean_e ½ ‖target_e − current_e‖² over every floating leaf ([E, ...]) of two states."""
    lt, idx, _ = _float_leaves(target)
    lc, idx_c, _ = _float_leaves(current)
    if len(lt) != len(lc) or idx != idx_c:
        raise ValueError("match_l2: the two states have different structures")
    e = lc[idx[0]].shape[0]
    total = lc[idx[0]].new_zeros(())
    for i in idx:
        if lt[i].shape != lc[i].shape:
            raise ValueError(f"match_l2: leaf {i} has shapes {list(lt[i].shape)} vs {list(lc[i].shape)}")
        total = total + 0.5 * (lt[i].detach() - lc[i]).pow(2).sum()
    return total / e


def state_gradient_step(learner: Any, theta: torch.Tensor, state: Any, xq: torch.Tensor, yq: torch.Tensor,
                        num_classes: int, alpha: float) -> tuple[Any, torch.Tensor]:
    """The grounding step s̃ = s − α ∇_s f(s), f(s) = mean_q CE(π_θ(·|x_q; s), y_q), per episode.

    Returns (s̃ detached, f per episode [E]).  Every floating leaf of the state takes the step;
    θ is held fixed.  Episodes are independent, so ∇ of Σ_e f_e gives each episode its own gradient.
    """
    leaves, idx, rebuild = _float_leaves(state_detach(state))
    var = [t.detach().clone().requires_grad_(i in idx) if t.is_floating_point() else t
           for i, t in enumerate(leaves)]
    th = theta.detach().clone().requires_grad_(True)      # eager (differentiable) path of the learner
    with torch.enable_grad():
        lg = probe_logits(learner, th, rebuild(var), xq, num_classes)        # [E, Q, C]
        f = F.cross_entropy(lg.reshape(-1, num_classes), yq.reshape(-1).long(),
                            reduction="none").reshape(yq.shape).mean(1)      # [E]
        grads = torch.autograd.grad(f.sum(), [var[i] for i in idx], allow_unused=True)
    new = list(var)
    for i, g in zip(idx, grads):
        new[i] = (var[i] - alpha * g).detach() if g is not None else var[i].detach()
    return rebuild(new), f.detach()


def _kl_target_current(target_logits: torch.Tensor, current_logits: torch.Tensor) -> torch.Tensor:
    """mean over [E, Q] of KL(softmax(target) ‖ softmax(current)); the target is a constant."""
    lp_t = torch.log_softmax(target_logits.detach(), -1)
    lp_c = torch.log_softmax(current_logits, -1)
    return (lp_t.exp() * (lp_t - lp_c)).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# the estimator


def bmg_gradient(learner: Any, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 cfg: BMGConfig, generator: torch.Generator | None = None,
                 state: Any = None) -> tuple[torch.Tensor, dict]:
    """The BMG meta-gradient of the module docstring for one meta-batch.

    Args:
        learner: any :class:`vsml.learners.base.Learner`.
        theta: shared θ (``learner.init_theta()`` shape); not modified.
        x: [E, T, D] (or [E, T, H, W, ...]) with T >= K + L + Q; y: [E, T] labels.  Only the first
            K + L + Q examples are used.
        num_classes: C.
        cfg: BMGConfig.
        generator: draws s_0 unless ``state`` is given.
    Returns:
        (ĝ with θ's shape, clipped; metrics) with ``loss`` / ``accuracy`` (online, K steps),
        ``matching`` (μ), ``meta_loss`` (μ + λ·loss), ``probe_loss_k`` / ``probe_acc_k`` (probe CE /
        accuracy at s_K), ``probe_loss_target`` / ``probe_acc_target`` (at the target; for grounding
        "gradient" before the gradient step), ``grad_norm`` (unclipped), ``clipped``, ``nonfinite``.
    """
    if x.dim() < 3:
        raise ValueError(f"x must have shape [E, T, D]; got {list(x.shape)}")
    e, t_len = x.shape[0], x.shape[1]
    x = x.reshape(e, t_len, -1)                                                # [E, T, D]
    if tuple(y.shape) != (e, t_len):
        raise ValueError(f"y has shape {list(y.shape)} but x has [E, T] = {[e, t_len]}")
    k, lb, q = cfg.k_steps, cfg.l_steps, cfg.probe
    if t_len < cfg.episode_length:
        raise ValueError(f"BMG needs episodes of K + L + Q = {k} + {lb} + {q} = {cfg.episode_length} examples, "
                         f"got T = {t_len}; lengthen the episodes (train.py: --episode_length) or shrink "
                         f"bmg.k_steps / bmg.l_steps / bmg.probe")
    y = y.long()
    xq, yq = x[:, k + lb:k + lb + q], y[:, k + lb:k + lb + q]                     # [E, Q, D], [E, Q]
    th = theta.detach().clone().requires_grad_(True)
    if state is None:
        state = learner.init_state(e, x.shape[2], num_classes, generator, theta.dtype, theta.device)

    # 1. K differentiable steps
    with torch.enable_grad():
        loss_sum, n_correct, s_k = unroll_chunked(learner, th, x[:, :k], y[:, :k], num_classes, state,
                                                  cfg.checkpoint_chunk)
    # 2. the target, without gradient, from the detached s_K
    s_det = state_detach(s_k)
    n_learned = lb if cfg.grounding == "data" else lb - 1
    with torch.no_grad():
        s_t = s_det
        if n_learned > 0:
            s_t = learner.unroll(theta.detach(), x[:, k:k + n_learned], y[:, k:k + n_learned], num_classes,
                                 state=s_det).state
        lg_t = probe_logits(learner, theta.detach(), s_t, xq, num_classes)     # [E, Q, C]
    probe_loss_t = float(F.cross_entropy(lg_t.reshape(-1, num_classes), yq.reshape(-1)))
    probe_acc_t = float((lg_t.argmax(-1) == yq).float().mean())
    if cfg.grounding == "gradient":
        s_t, _ = state_gradient_step(learner, theta, s_t, xq, yq, num_classes, cfg.alpha)
    # 3. matching, meta-loss and its gradient
    with torch.enable_grad():
        lg_k = None
        if cfg.matching == "kl":
            lg_target = lg_t                                 # grounding "data": the target's own probe outputs
            if cfg.grounding == "gradient":
                with torch.no_grad():
                    lg_target = probe_logits(learner, theta.detach(), s_t, xq, num_classes)
            lg_k = probe_logits(learner, th, s_k, xq, num_classes)             # [E, Q, C]
            mu = _kl_target_current(lg_target, lg_k)
        else:
            mu = match_l2(s_t, s_k)
        task = loss_sum / float(e * k)
        meta = mu + cfg.task_weight * task if cfg.task_weight > 0 else mu
        nonfinite = not bool(torch.isfinite(meta.detach()))
        grad = torch.zeros_like(th)
        if not nonfinite:
            (g,) = torch.autograd.grad(meta, th, allow_unused=True)
            if g is not None:
                grad = g.detach()
    with torch.no_grad():
        if lg_k is None:
            lg_k = probe_logits(learner, theta.detach(), s_det, xq, num_classes)
        lg_k = lg_k.detach()
    norm = float(grad.norm())
    if not math.isfinite(norm):
        nonfinite, grad = True, torch.zeros_like(th).detach()
    clipped = not nonfinite and cfg.clip_grad_norm > 0 and norm > cfg.clip_grad_norm
    if clipped:
        grad = clip_grad(grad, cfg.clip_grad_norm)
    metrics = {
        "loss": float(loss_sum.detach()) / (e * k),
        "accuracy": float(n_correct) / (e * k),
        "matching": float(mu.detach()),
        "meta_loss": float(meta.detach()),
        "probe_loss_k": float(F.cross_entropy(lg_k.reshape(-1, num_classes), yq.reshape(-1))),
        "probe_acc_k": float((lg_k.argmax(-1) == yq).float().mean()),
        "probe_loss_target": probe_loss_t,
        "probe_acc_target": probe_acc_t,
        "grad_norm": norm if not nonfinite else float("nan"),
        "clipped": float(clipped),
        "nonfinite": float(nonfinite),
    }
    return grad.detach(), metrics


class BMGEstimator:
    """BMG behind the :class:`vsml.estimators.base.BatchEstimator` interface (see :func:`bmg_gradient`).

    ``estimate(theta, x, y, C, step)`` with x [E, T, ...] (T >= K + L + Q), a meta-batch evaluated
    with shared θ; initial states drawn from ``Generator().manual_seed(pair_seed(seed, step, −1))``
    (as :class:`vsml.estimators.core.BPTTEstimator`).  The gradient is clipped inside; use a gradient
    meta-optimiser (Adam, lr ~1e-3) as for BPTT.
    """

    def __init__(self, learner: Any, cfg: BMGConfig, seed: int = 0):
        if not isinstance(cfg, BMGConfig):
            raise TypeError(f"expected a BMGConfig, got {type(cfg).__name__}")
        if not is_meta_trainable(learner):
            raise ValueError(f"BMGEstimator: learner {type(learner).__name__} is not meta-trainable")
        self.learner = learner
        self.cfg = cfg
        self.seed = int(seed)

    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        gen = torch.Generator().manual_seed(pair_seed(self.seed, step, -1))
        return bmg_gradient(self.learner, theta.detach(), x, y, num_classes, self.cfg, gen)


@register("bmg", distributed="refuse", why="BMG has no multi-process version (es, bptt and clone have); run it as one process")
def _build_bmg(cfg: Any, problem: Problem) -> EpisodeBatchEstimator:
    """BMG: meta_batch episodes of episode_length (>= K + L + Q) per meta-step."""
    est = BMGEstimator(problem.learner, cfg.bmg, seed=cfg.seed)
    return EpisodeBatchEstimator(est, problem, cfg.meta_batch, cfg.episode_length, loss_metric="loss")
