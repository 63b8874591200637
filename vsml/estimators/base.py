"""The one meta-gradient estimator protocol, its registry, the problem an estimator meta-trains on,
and gradient clipping (issue 16, item 2).

Every estimator the training loop runs (ES, PES, truncated ES, BPTT, BMG, cloning) satisfies
:class:`MetaGradientEstimator`: state in, (ĝ ≈ ∇_θ L(θ), metrics, state) out, so the loop is::

    est = build("pes", cfg, problem)                 # vsml.estimators.registry
    state = est.init(theta.detach())
    for step in range(n):
        grad, metrics, state = est.step(theta.detach(), state, step)
        theta.grad = grad; opt.step()

and checkpoints carry ``est.state_dict(state)`` (plain tensors and ints, loads with
``weights_only=True``); ``est.load_state_dict(theta, d)`` restores it exactly.  A stateless
estimator (ES, BPTT, BMG, cloning: every draw of meta-step s is derived from (seed, s)) has the
trivial state ``None`` and an empty state dict.

The estimators that draw one batch of data episodes per meta-step keep their batch-level API
``estimate(θ, x, y, C, step) -> (ĝ, metrics)`` (:class:`BatchEstimator`, used directly by the
tests and the studies); :class:`EpisodeBatchEstimator` turns one into a
:class:`MetaGradientEstimator` by drawing the step's batch from the :class:`Problem`.

Sharding (vsml/training/distributed.py) needs no second implementation of any estimator: a
:class:`ShardableEstimator` splits ``estimate`` into ``partial`` (the contribution of a slice of
its parts: ES pairs, BPTT / cloning episodes) and ``reduce`` (gradient and metrics from the
combined contributions); :meth:`ShardableEstimator.estimate` is ``reduce(partial(all parts))``.

Registry: ``@register("name", distributed=..., parts=...)`` on a builder ``(cfg, problem) ->
MetaGradientEstimator``, with ``cfg`` a :class:`vsml.training.config.TrainConfig` (each builder reads
its own section); the keywords declare its :class:`Capabilities` (multi-process support and the
number of parts per meta-step), which preflight checks before anything is built or written.  The
built-in builders live next to their estimators; :mod:`vsml.estimators.registry` imports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from tasks.base import derive_seed, sample_episodes

__all__ = ["BatchEstimator", "Capabilities", "EpisodeBatchEstimator", "MetaGradientEstimator", "Problem", "ShardableEstimator",
           "Stateless", "capabilities", "clip_grad", "grad_norm", "register"]

# how an estimator runs under torchrun: parts split over the processes / the same work on every process / not at all
Distributed = Literal["shard", "replicate", "refuse"]


# --------------------------------------------------------------------------------------------
# the problem: learner x task family x run seed


@dataclass(frozen=True)
class Problem:
    """What an estimator meta-trains: a learner on a task family's training split.

    ``seed`` is the run seed; the data of meta-step s is the family's batch for
    ``derive_seed(seed, "meta-train-data", s)`` (one rule for every estimator, so a resumed run
    redraws exactly the batches of an uninterrupted one).
    """

    learner: Any
    family: Any                       # a tasks.base.TaskFamily
    seed: int = 0
    device: torch.device | str = "cpu"

    def sample(self, num: int, length: int, seed: int, episodes: range | None = None) -> Any:
        """``num`` training-split episodes of ``length`` examples for ``seed``, built on ``device``; with
        ``episodes``, only those of the ``num`` (``tasks.base.sample_episodes``: per-episode streams)."""
        b = sample_episodes(self.family, num, length, seed, "train", device=self.device, episodes=episodes)
        b.x, b.y = b.x.to(self.device), b.y.to(self.device)
        return b

    def batch(self, num: int, length: int, step: int, episodes: range | None = None) -> Any:
        """The data batch of meta-step ``step`` (seed ``derive_seed(seed, "meta-train-data", step)``)."""
        return self.sample(num, length, derive_seed(self.seed, "meta-train-data", step), episodes)


# --------------------------------------------------------------------------------------------
# the protocol


@runtime_checkable
class MetaGradientEstimator(Protocol):
    """One meta-gradient estimator with explicit state (module docstring).

    ``loss_metric``: the key of ``metrics`` the progress line reports (e.g. ``"loss_mean"``).
    """

    loss_metric: str

    def init(self, theta: torch.Tensor) -> Any:
        """The state before the first step (``None`` for a stateless estimator)."""
        ...

    def step(self, theta: torch.Tensor, state: Any, step: int) -> tuple[torch.Tensor, dict, Any]:
        """(ĝ with θ's shape, metrics of Python floats, new state) for meta-step ``step``."""
        ...

    def state_dict(self, state: Any) -> dict:
        """``state`` as plain tensors / ints / bools (CPU), for a checkpoint."""
        ...

    def load_state_dict(self, theta: torch.Tensor, d: dict) -> Any:
        """Inverse of :meth:`state_dict` (``theta`` gives device and dtype)."""
        ...


class Stateless:
    """The trivial estimator state: ``None``, saved as ``{}``."""

    def init(self, theta: torch.Tensor) -> None:
        return None

    def state_dict(self, state: None) -> dict:
        return {}

    def load_state_dict(self, theta: torch.Tensor, d: dict) -> None:
        return None


@runtime_checkable
class BatchEstimator(Protocol):
    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        """(ĝ with θ's shape, metrics of Python floats) from the meta-batch x [E, T, ...], y [E, T]."""
        ...


@dataclass
class EpisodeBatchEstimator(Stateless):
    """A :class:`BatchEstimator` as a :class:`MetaGradientEstimator`: at meta-step s it draws
    ``episodes`` x ``length`` training episodes with :meth:`Problem.batch` and calls ``inner.estimate``."""

    inner: Any                        # a BatchEstimator (possibly a sharded one)
    problem: Problem
    episodes: int
    length: int
    loss_metric: str = "loss"
    shard: range | None = None        # draw only these of the episodes (a GPU rank's share of ES pairs)

    def step(self, theta: torch.Tensor, state: None, step: int) -> tuple[torch.Tensor, dict, None]:
        b = self.problem.batch(self.episodes, self.length, step, self.shard)
        grad, metrics = self.inner.estimate(theta, b.x, b.y, b.num_classes, step)
        return grad, metrics, state


class ShardableEstimator:
    """A batch estimator whose work splits over ``num_parts(x)`` independent parts.

    ``partial(θ, x, y, C, step, part)`` computes the contribution of the parts in ``part`` (a
    range) from the *global* batch; ``reduce(θ, total, step)`` turns the combined contributions
    into (ĝ, metrics).  ``combine`` says how contributions combine: ``"gather"`` (rows
    concatenated in part order, ``rows_per_part`` rows each: ES member losses) or ``"sum"``
    (elementwise sum: gradient shares).  A partition of the parts, combined, gives exactly the
    one-process result (vsml/training/distributed.py relies on this).
    """

    distributed: ClassVar[Distributed] = "shard"
    combine: ClassVar[Literal["gather", "sum"]] = "sum"
    rows_per_part: ClassVar[int] = 1
    takes_own_share: ClassVar[bool] = False   # partial also accepts x holding only its parts' episodes

    def num_parts(self, x: torch.Tensor) -> int:
        raise NotImplementedError

    def partial(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int,
                part: range) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, theta: torch.Tensor, total: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 step: int) -> tuple[torch.Tensor, dict]:
        return self.reduce(theta, self.partial(theta, x, y, num_classes, step, range(self.num_parts(x))), step)


# --------------------------------------------------------------------------------------------
# registry

Builder = Callable[[Any, Problem], MetaGradientEstimator]
REGISTRY: dict[str, Builder] = {}


@dataclass(frozen=True)
class Capabilities:
    """What a registered estimator supports, declared next to its builder and read *before* it is built
    (vsml/training/preflight.py checks a torchrun launch against it before the run folder exists).

    distributed: "shard" (its parts split over the processes: ES pairs, BPTT / cloning episodes),
        "replicate" (every process computes the same full estimate: no speed-up, still exact) or
        "refuse" (cannot run on several processes; ``why`` says why).
    parts: ``parts(cfg) -> (flag, count)``: the config flag that sets the number of parts per meta-step
        and its value in a TrainConfig (each process needs at least one); None: no minimum.
    why: the reason for "refuse" (one clause, shown after "cannot run on N processes: ").
    """

    distributed: Distributed = "refuse"
    parts: Callable[[Any], tuple[str, int]] | None = None
    why: str = "it has no multi-process version"


CAPABILITIES: dict[str, Capabilities] = {}


def register(name: str, *, distributed: Distributed = "refuse",
             parts: Callable[[Any], tuple[str, int]] | None = None,
             why: str = "it has no multi-process version") -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(cfg, problem) -> MetaGradientEstimator`` under ``name``, with its
    :class:`Capabilities` (by default: one process only)."""
    if distributed not in ("shard", "replicate", "refuse"):
        raise ValueError(f"distributed must be shard, replicate or refuse, got {distributed!r}")

    def deco(builder: Builder) -> Builder:
        if name in REGISTRY and REGISTRY[name] is not builder:
            raise ValueError(f"estimator {name!r} is already registered")
        REGISTRY[name] = builder
        CAPABILITIES[name] = Capabilities(distributed, parts, why)
        return builder
    return deco


def capabilities(name: str) -> Capabilities:
    """The declared capabilities of estimator ``name`` (an estimator registered without any: one process only)."""
    return CAPABILITIES.get(name, Capabilities())


# --------------------------------------------------------------------------------------------
# clipping


def grad_norm(grad: torch.Tensor) -> float:
    """Global L2 norm of a gradient tensor."""
    return float(grad.detach().norm())


def clip_grad(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Rescale ``grad`` so that its global L2 norm is at most ``max_norm`` (0 or less: unchanged):
    ĝ ← ĝ · max_norm / (‖ĝ‖ + 1e-12) when ‖ĝ‖ > max_norm (vsml.md §2.3, reference 25 for BPTT).

    A gradient with a non-finite norm is returned unchanged (clipping cannot repair it; the caller
    should skip the step).  Returns a new tensor; use :func:`grad_norm` for the norm before.
    """
    if max_norm <= 0:
        return grad
    norm = grad_norm(grad)
    if not math.isfinite(norm) or norm <= max_norm:
        return grad
    return grad * (max_norm / (norm + 1e-12))
