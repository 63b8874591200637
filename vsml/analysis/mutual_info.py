"""Pairwise mutual information between experts (badger-bmg-es.md §B.1).

* :func:`gaussian_mi` — tier 1, the Gaussian closed form
  MI(X; Y) = ½ [log det Σ_XX + log det Σ_YY − log det Σ_[XY]] (nats), with shrinkage;
  ``copula=True`` applies the Gaussian-copula transform first (tier 2, GCMI, Ince et al. 2017).
* :func:`ksg_mi` — tier 3, Kraskov–Stögbauer–Grassberger estimator 1 with the max-norm:
  MI = ψ(k) + ψ(S) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩.
* :func:`mi_matrix` — the n×n matrix over the experts of recorded states [S, n, d], and
  :func:`mi_summary` — its mean off-diagonal value ("redundancy") and a diversity score.

Samples: S i.i.d. tasks at one inner step t* (``states = out.hidden[:, t*]``, [S, n, H]); every
coordinate is z-scored first.  Works on any learner's states shaped [S, n_parts, d].
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy.special import digamma

from ._util import as_samples, copula_normal, pca_reduce, shrink, zscore

__all__ = ["gaussian_entropy", "gaussian_mi", "ksg_mi", "mi_matrix", "mi_summary"]


def _logdet(cov: np.ndarray) -> float:
    sign, ld = np.linalg.slogdet(cov)
    if sign <= 0:
        raise np.linalg.LinAlgError("covariance is not positive definite; use shrinkage > 0 or fewer dims (pca)")
    return float(ld)


def _cov(z: np.ndarray) -> np.ndarray:
    """Sample covariance of z [S, D] -> [D, D] (ddof 1)."""
    return np.atleast_2d(np.cov(z, rowvar=False))


def gaussian_entropy(cov: np.ndarray) -> float:
    """Differential entropy of N(·, Σ) in nats: ½ [D log(2πe) + log det Σ] (§B.2)."""
    cov = np.atleast_2d(np.asarray(cov, dtype=np.float64))
    return 0.5 * (cov.shape[0] * np.log(2 * np.pi * np.e) + _logdet(cov))


def _prep(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]                                                          # [S] -> [S, 1]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [S] or [S, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def gaussian_mi(x: Any, y: Any, shrinkage: float = 0.0, copula: bool = False) -> float:
    """Gaussian (or Gaussian-copula) MI between x [S, dx] and y [S, dy] in nats (§B.1 tiers 1-2)."""
    x, y = _prep(x, "x"), _prep(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if copula:
        x, y = copula_normal(x), copula_normal(y)
    z = zscore(np.concatenate([x, y], axis=1))                                  # [S, dx + dy]
    cov = shrink(_cov(z), shrinkage)
    dx = x.shape[1]
    return 0.5 * (_logdet(cov[:dx, :dx]) + _logdet(cov[dx:, dx:]) - _logdet(cov))


def ksg_mi(x: Any, y: Any, k: int = 3, jitter: float = 1e-10, seed: int = 0) -> float:
    """KSG estimator 1 of MI(x; y) in nats (Kraskov et al. 2004; §B.1 tier 3).

    x [S, dx], y [S, dy]; max-norm in each space and in the joint space; brute force O(S²) memory
    (fine for S up to a few thousand).  ``jitter`` · N(0, 1) noise breaks ties (seeded).  Negative
    values mean ≈ 0 and are returned as they are (clip them yourself if needed).
    """
    x, y = _prep(x, "x"), _prep(y, "y")
    s = x.shape[0]
    if y.shape[0] != s:
        raise ValueError(f"x and y need the same number of samples, got {s} and {y.shape[0]}")
    if not 1 <= k < s:
        raise ValueError(f"k must be in [1, S) = [1, {s}), got {k}")
    rng = np.random.default_rng(seed)
    x = zscore(x) + jitter * rng.standard_normal(x.shape)
    y = zscore(y) + jitter * rng.standard_normal(y.shape)
    dx = np.abs(x[:, None, :] - x[None, :, :]).max(-1)                          # [S, S] max-norm in x
    dy = np.abs(y[:, None, :] - y[None, :, :]).max(-1)                          # [S, S]
    dz = np.maximum(dx, dy)                                                     # joint max-norm
    np.fill_diagonal(dz, np.inf)
    eps = np.partition(dz, k - 1, axis=1)[:, k - 1]                             # [S] k-th neighbour distance
    nx = (dx < eps[:, None]).sum(1) - 1                                         # strictly closer, minus self
    ny = (dy < eps[:, None]).sum(1) - 1
    return float(digamma(k) + digamma(s) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


def mi_matrix(states: Any, method: Literal["gaussian", "gcmi", "ksg"] = "gaussian", shrinkage: float = 1e-3,
              pca: int | None = None, k: int = 3) -> np.ndarray:
    """n×n pairwise MI (nats) between the experts of ``states`` [S, n, d]; zero diagonal.

    ``pca``: reduce every expert to its top-p principal components first (recommended for KSG and
    whenever S is not ≫ 2d).  ``gcmi`` is the Gaussian-copula variant.
    """
    x = as_samples(states)
    if pca:
        x = pca_reduce(x, pca)
    n = x.shape[1]
    out = np.zeros((n, n))
    for i in range(n):                     # n(n-1)/2 estimator calls on tiny blocks (analysis code)
        for j in range(i + 1, n):
            if method == "ksg":
                v = ksg_mi(x[:, i], x[:, j], k=k)
            elif method in ("gaussian", "gcmi"):
                v = gaussian_mi(x[:, i], x[:, j], shrinkage=shrinkage, copula=method == "gcmi")
            else:
                raise ValueError(f"unknown MI method {method!r}; use gaussian|gcmi|ksg")
            out[i, j] = out[j, i] = v
    return out


def mi_summary(states: Any, method: Literal["gaussian", "gcmi", "ksg"] = "gaussian", shrinkage: float = 1e-3,
               pca: int | None = None, k: int = 3) -> dict[str, float]:
    """{"mi_mean": mean off-diagonal MI, "mi_max", "mean_abs_corr": mean |corr| between the experts'
    first principal components, "diversity": 1 − mean_abs_corr} (§B.1 outputs)."""
    x = as_samples(states)
    m = mi_matrix(x, method, shrinkage, pca, k)
    n = m.shape[0]
    off = m[~np.eye(n, dtype=bool)] if n > 1 else np.zeros(1)
    pc1 = pca_reduce(x, 1)[:, :, 0]                                             # [S, n]
    sd = pc1.std(0)
    ok = sd > 1e-12
    if ok.sum() >= 2:
        c = np.corrcoef(pc1[:, ok], rowvar=False)
        mac = float(np.abs(c[~np.eye(c.shape[0], dtype=bool)]).mean())
    else:
        mac = float("nan")
    return {"mi_mean": float(off.mean()), "mi_max": float(off.max()), "mean_abs_corr": mac,
            "diversity": 1.0 - mac}
