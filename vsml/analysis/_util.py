"""Input handling shared by the analysis estimators (badger-bmg-es.md §B, "Which samples")."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import ndtri

__all__ = ["as_samples", "copula_normal", "pca_reduce", "shrink", "zscore"]


def as_samples(states: Any, name: str = "states") -> np.ndarray:
    """A float64 array [S, n, d] from a tensor / array of recorded expert states.

    Accepts [S, n, d] (S samples, e.g. tasks at one inner step t*, n experts, d dims each) or [S, n]
    (scalar experts, returned as [S, n, 1]).  Raises ``ValueError`` for anything else.
    """
    if hasattr(states, "detach"):
        states = states.detach().cpu().numpy()
    x = np.asarray(states, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, :, None]                                                       # [S, n] -> [S, n, 1]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [S, n_experts, d] (or [S, n_experts]), got shape {x.shape}")
    if x.shape[0] < 3:
        raise ValueError(f"{name}: need at least 3 samples (S), got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def zscore(x: np.ndarray) -> np.ndarray:
    """Each column (last axis, over the sample axis 0) to zero mean and unit std (constant columns -> 0)."""
    mu = x.mean(axis=0, keepdims=True)
    sd = x.std(axis=0, keepdims=True)
    return (x - mu) / np.where(sd > 0, sd, 1.0)


def copula_normal(x: np.ndarray) -> np.ndarray:
    """Gaussian-copula transform (Ince et al. 2017): each column's ranks to standard-normal quantiles.

    x [S, ...] -> same shape; ranks are taken over axis 0 (ties broken by order)."""
    s = x.shape[0]
    ranks = np.argsort(np.argsort(x, axis=0, kind="stable"), axis=0, kind="stable")
    return ndtri((ranks + 1.0) / (s + 1.0))


def pca_reduce(x: np.ndarray, p: int) -> np.ndarray:
    """Each expert's states [S, n, d] projected on its own top-p principal components -> [S, n, min(p, d)].

    A within-expert linear map, so the Gaussian binding information is unchanged when p = d (§B.2) and
    the joint dimension n·p stays small compared with S (§B.1 tier 1)."""
    if p < 1:
        raise ValueError(f"pca components p must be >= 1, got {p}")
    s, n, d = x.shape
    if p >= d:
        return x
    out = np.empty((s, n, p))
    for i in range(n):                     # one SVD per expert (n is small; analysis, not the learner)
        xi = x[:, i, :] - x[:, i, :].mean(0)                                    # [S, d]
        _, _, vt = np.linalg.svd(xi, full_matrices=False)
        out[:, i, :] = xi @ vt[:p].T                                            # [S, p]
    return out


def shrink(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """Σ + λ·(tr Σ / D)·I with λ = ``shrinkage`` (§B.1: λ ≈ 1e-3 keeps log det finite)."""
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    if shrinkage == 0:
        return cov
    dim = cov.shape[0]
    scale = np.trace(cov) / dim if np.trace(cov) > 0 else 1.0
    return cov + shrinkage * scale * np.eye(dim)
