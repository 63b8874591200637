"""Antithetic evolution strategies: the default meta-gradient estimator of VSML (vsml.md §2.2).

Pure ES core, independent of VSML: θ is any floating tensor, the loss is any function of a
batch of perturbed θs.  The estimator (vsml.md §2.2; badger-bmg-es.md §D.1) is

    ĝ = (1/P) Σ_i ε_i (f_i⁺ − f_i⁻) / (2σ),      ε_i ~ N(0, I),   f_i^± = f(θ ± σ ε_i)

with P antithetic pairs.  ``fitness="raw"`` uses f = the loss itself (the reference: no fitness
shaping, no normalisation); ``fitness="centered_rank"`` (Salimans et al. 2017) replaces the 2P
losses by their centered ranks u = rank/(2P − 1) − 0.5 ∈ [−0.5, 0.5] (rank 0 = lowest loss =
best) and uses the *same* formula.  Scaling of the rank estimator: it equals OpenAI-ES's
g = (1/(2P)) Σ_i (u_i⁺ − u_i⁻) ε_i multiplied by 1/σ (OpenAI absorbs σ into the learning rate);
its magnitude is not that of the loss gradient, only its direction is comparable.  Either way ĝ
is a *descent* direction's negative, i.e. an estimate of ∇L: the optimiser subtracts it.

Pairs and ordering: the population is interleaved, members [+ε_0, −ε_0, +ε_1, −ε_1, ...]
(member 2i = θ + σε_i, member 2i+1 = θ − σε_i), so ``x.repeat_interleave(2, 0)`` gives both
members of a pair the same data episode (common random numbers, §2.2).

Noise seeding (shared-seed ES, badger-bmg-es.md §D.1): ε_i of meta-step ``step`` is a
deterministic function of (seed, step, i) only: a 63-bit key = splitmix64-mix(seed, step, i)
seeds a private ``torch.Generator`` (Philox on CUDA, MT19937 on CPU), which draws ε_i with
``torch.randn`` in float32 and casts to θ's dtype.  Any process (e.g. another distributed rank)
can therefore regenerate any member's noise from three integers; the estimator never keeps ε
longer than needed: it is drawn to build the population, dropped, and redrawn in chunks when the
fitness-weighted sum is formed.  Noise drawn on CPU is identical across machines; noise drawn on
a GPU (``noise_device="cuda"``) is identical across runs on that device type but differs from
the CPU stream.

Non-finite losses (NaN, ±inf; e.g. a diverged member): each one is counted in
``metrics["nonfinite"]`` and ranked worst.  For ``raw`` it is replaced by the largest finite loss
of the population (the worst observed value), so its pair's difference pushes θ away from the
failing direction without an infinite step; for ``centered_rank`` it receives the highest ranks
(ties among non-finite losses broken by member index).  If every loss is non-finite the gradient
is zero and ``metrics["all_nonfinite"] = 1``.  Nothing raises.

API in the ask/tell shape of evosax (style-anchors.md §4b): :func:`es_ask` builds the population,
:func:`es_tell` turns losses into (ĝ, metrics); :func:`es_gradient` does both around a loss
function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange

__all__ = ["ESConfig", "centered_ranks", "es_ask", "es_gradient", "es_tell", "pair_seed", "sample_noise"]

_MASK64 = (1 << 64) - 1
FITNESS_MODES = ("raw", "centered_rank")


@dataclass
class ESConfig:
    """Antithetic ES hyper-parameters (vsml.md §2.2 defaults).

    Attributes:
        pairs: P antithetic pairs (2P evaluations per meta-step); reference 1024.
        sigma: noise scale σ; reference 0.05.
        fitness: "raw" (loss differences, the reference) or "centered_rank".
        seed: base seed of the noise and, in ESEstimator, of the per-pair initial states.
        noise_chunk: pairs per chunk when regenerating ε for the weighted sum (memory bound).
        noise_device: where ε is drawn: None = on the CPU (reproducible everywhere, then moved to
            θ's device), or a device string such as "cuda" (faster for large θ · P).
    """

    pairs: int = 1024
    sigma: float = 0.05
    fitness: Literal["raw", "centered_rank"] = "raw"
    seed: int = 0
    noise_chunk: int = 256
    noise_device: str | None = None

    def __post_init__(self) -> None:
        if int(self.pairs) != self.pairs or self.pairs < 1:
            raise ValueError(f"ESConfig.pairs must be an integer >= 1, got {self.pairs}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"ESConfig.sigma must be a finite number > 0, got {self.sigma}")
        if self.fitness not in FITNESS_MODES:
            raise ValueError(f"ESConfig.fitness must be one of {FITNESS_MODES}, got {self.fitness!r}")
        if int(self.seed) != self.seed:
            raise ValueError(f"ESConfig.seed must be an integer, got {self.seed}")
        if self.noise_chunk < 1:
            raise ValueError(f"ESConfig.noise_chunk must be >= 1, got {self.noise_chunk}")


# --------------------------------------------------------------------------------------------
# counter-based seeding


def _splitmix64(z: int) -> int:
    """The splitmix64 finaliser: a bijective 64-bit mix (Steele, Lea & Flood 2014)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def pair_seed(seed: int, step: int, index: int) -> int:
    """63-bit generator seed for (seed, step, index): splitmix64 chained over the three integers.

    ``index`` is the pair index for noise; ESEstimator uses index −1 for the initial-state draw.
    """
    z = _splitmix64(int(seed) & _MASK64)
    z = _splitmix64(z ^ (int(step) & _MASK64))
    z = _splitmix64(z ^ (int(index) & _MASK64))
    return z & ((1 << 63) - 1)


def sample_noise(seed: int, step: int, pair_indices: Sequence[int] | torch.Tensor, shape: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 noise_device: torch.device | str | None = None) -> torch.Tensor:
    """ε for the given pairs, regenerated deterministically: returns [len(pair_indices), *shape].

    Pair i's noise depends only on (seed, step, i) (see the module docstring), not on which other
    pairs are requested, so ``sample_noise(s, k, [3])[0] == sample_noise(s, k, range(8))[3]``.
    Drawn in float32 on ``noise_device`` (default CPU), then cast to ``dtype`` on ``device``.
    """
    if torch.is_tensor(pair_indices):
        pair_indices = pair_indices.tolist()
    shape = tuple(int(s) for s in shape)
    gen_dev = torch.device(noise_device) if noise_device is not None else torch.device("cpu")
    out = torch.empty((len(pair_indices), *shape), dtype=torch.float32, device=gen_dev)
    g = torch.Generator(device=gen_dev)
    for j, i in enumerate(pair_indices):
        g.manual_seed(pair_seed(seed, step, int(i)))
        out[j] = torch.randn(shape, generator=g, dtype=torch.float32, device=gen_dev)
    return out.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# fitness shaping


def centered_ranks(losses: torch.Tensor) -> torch.Tensor:
    """Centered ranks of a 1-D tensor: rank/(n − 1) − 0.5 ∈ [−0.5, 0.5], rank 0 = smallest value.

    Non-finite values (NaN, ±inf) get the largest ranks (worst), ties among them broken by index;
    ties among finite values are broken by index too (stable sort).  For n = 1 returns 0.
    """
    n = losses.numel()
    if n == 1:
        return torch.zeros_like(losses, dtype=torch.float64)
    key = losses.detach().to(torch.float64).clone()
    key[~torch.isfinite(key)] = math.inf
    order = torch.argsort(key, stable=True)
    ranks = torch.empty(n, dtype=torch.float64, device=losses.device)
    ranks[order] = torch.arange(n, dtype=torch.float64, device=losses.device)
    return ranks / (n - 1) - 0.5


# --------------------------------------------------------------------------------------------
# ask / tell


def es_ask(theta: torch.Tensor, cfg: ESConfig, step: int,
           pair_indices: Sequence[int] | None = None) -> torch.Tensor:
    """The population θ ± σε_i for the given pairs (default: all ``cfg.pairs``).

    Returns [2·len(pairs), *theta.shape], interleaved [+ε_0, −ε_0, +ε_1, −ε_1, ...].
    """
    if pair_indices is None:
        pair_indices = range(cfg.pairs)
    theta = theta.detach()
    eps = sample_noise(cfg.seed, step, pair_indices, theta.shape, theta.dtype, theta.device,
                       cfg.noise_device)                                   # [P, *θ]
    eps.mul_(cfg.sigma)
    pop = torch.stack([theta + eps, theta - eps], dim=1)
    del eps
    return rearrange(pop, "p sign ... -> (p sign) ...")                    # members θ₀⁺, θ₀⁻, θ₁⁺, ...


def es_tell(theta: torch.Tensor, losses: torch.Tensor, cfg: ESConfig, step: int) -> tuple[torch.Tensor, dict]:
    """ĝ and metrics from the 2P member losses (ordered as :func:`es_ask` built them).

    Returns (grad with theta's shape/dtype/device, metrics of Python floats):
    ``loss_mean`` (mean of the finite member losses; equals mean_i (L_i⁺ + L_i⁻)/2, the
    reference's logged meta-loss, when all are finite), ``loss_std``, ``loss_min``, ``loss_max``,
    ``nonfinite`` (count), ``all_nonfinite`` (0/1), ``grad_norm``.
    """
    p = cfg.pairs
    losses = losses.detach().reshape(-1).to(torch.float64)
    if losses.numel() != 2 * p:
        raise ValueError(f"expected 2*pairs = {2 * p} losses (one per member), got {losses.numel()}")
    finite = torch.isfinite(losses)
    n_bad = int((~finite).sum())
    metrics: dict[str, float] = {"nonfinite": float(n_bad), "all_nonfinite": 0.0}
    if n_bad == losses.numel():
        nan = float("nan")
        metrics.update(loss_mean=nan, loss_std=nan, loss_min=nan, loss_max=nan, grad_norm=0.0,
                       all_nonfinite=1.0)
        return torch.zeros_like(theta), metrics
    fin = losses[finite]
    metrics.update(loss_mean=float(fin.mean()), loss_std=float(fin.std(unbiased=False)),
                   loss_min=float(fin.min()), loss_max=float(fin.max()))

    if cfg.fitness == "raw":
        f = torch.where(finite, losses, fin.max())                          # worst finite loss
    else:
        f = centered_ranks(losses)                                          # [2P] in [-0.5, 0.5]
    f = rearrange(f, "(p sign) -> p sign", sign=2)                          # sign 0: +ε, 1: −ε
    w = (f[:, 0] - f[:, 1]) / (2.0 * cfg.sigma * p)                         # [P]  (f⁺ − f⁻)/(2σP)

    grad = torch.zeros(theta.shape, dtype=torch.float32 if theta.dtype != torch.float64 else torch.float64,
                       device=theta.device)
    flat = grad.reshape(-1)
    for c0 in range(0, p, cfg.noise_chunk):
        c1 = min(p, c0 + cfg.noise_chunk)
        eps = sample_noise(cfg.seed, step, range(c0, c1), (flat.numel(),), flat.dtype, theta.device,
                           cfg.noise_device)                               # [c, |θ|]
        flat += w[c0:c1].to(flat.dtype).to(theta.device) @ eps
    grad = grad.to(theta.dtype)
    metrics["grad_norm"] = float(grad.norm())
    return grad, metrics


def es_gradient(theta: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], cfg: ESConfig,
                step: int) -> tuple[torch.Tensor, dict]:
    """Antithetic ES estimate of ∇_θ E_ε[L(θ + σε)] (vsml.md §2.2).

    Args:
        theta: any floating tensor.
        loss_fn: maps the population [2P, *theta.shape] (interleaved ±, see :func:`es_ask`) to
            the 2P losses [2P] (lower is better).  Called once, under ``torch.no_grad``.
        cfg: ESConfig.
        step: meta-step; with ``cfg.seed`` it fixes every ε (reproducible, regenerable).
    Returns:
        (ĝ shaped like theta, metrics) — see :func:`es_tell`.
    """
    pop = es_ask(theta, cfg, step)
    with torch.no_grad():
        losses = loss_fn(pop)
    del pop
    if not torch.is_tensor(losses):
        losses = torch.as_tensor(losses)
    return es_tell(theta, losses, cfg, step)
