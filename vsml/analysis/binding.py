"""Binding information, residual entropy, total correlation and O-information (badger-bmg-es.md §B.2).

Definitions (Rosas, Mediano, Ugarte & Jensen 2018) for X = (X_1, …, X_n), X_i ∈ R^{d_i}, with the
Gaussian closed forms used here (Σ the joint covariance, P = Σ^{−1}, P_[ii] its diagonal blocks):

    H(X)  = ½ [D log(2πe) + log det Σ]
    R(X)  = Σ_i H(X_i | X_−i) = ½ Σ_i [d_i log(2πe) − log det P_[ii]]          residual entropy
    B(X)  = H(X) − R(X)       = ½ [log det Σ + Σ_i log det P_[ii]]              binding information
    TC(X) = Σ_i H(X_i) − H(X) = ½ [Σ_i log det Σ_[ii] − log det Σ]              total correlation
    Ω(X)  = TC − B                                                            O-information

B is invariant under invertible affine maps within each part.  Computed in float64 with slogdet and
optional shrinkage Σ + λ·tr(Σ)/D·I; ``pca`` reduces each part to p principal components first so
that n·p ≪ S (§B.2 numerical notes).  Works on any learner's states [S, n_parts, d].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._util import as_samples, copula_normal, pca_reduce, shrink, zscore

__all__ = ["binding_information", "information_decomposition", "information_from_cov", "o_information",
           "residual_entropy", "total_correlation"]

_LOG2PIE = float(np.log(2 * np.pi * np.e))


def _logdet(a: np.ndarray) -> float:
    sign, ld = np.linalg.slogdet(a)
    if sign <= 0:
        raise np.linalg.LinAlgError("matrix is not positive definite; use shrinkage > 0 or fewer dims (pca)")
    return float(ld)


def information_from_cov(cov: Any, block_sizes: list[int] | tuple[int, ...]) -> dict[str, float]:
    """H, R, B, TC, Ω (nats) of a Gaussian with covariance ``cov`` [D, D] split into parts of ``block_sizes``."""
    cov = np.asarray(cov, dtype=np.float64)
    d = cov.shape[0]
    if cov.shape != (d, d) or sum(block_sizes) != d or min(block_sizes) < 1:
        raise ValueError(f"cov must be [D, D] with D = sum(block_sizes); got {cov.shape} and {list(block_sizes)}")
    prec = np.linalg.inv(cov)
    ld = _logdet(cov)
    edges = np.cumsum([0, *block_sizes])
    ld_p = [_logdet(prec[a:b, a:b]) for a, b in zip(edges[:-1], edges[1:])]    # log det P_[ii]
    ld_s = [_logdet(cov[a:b, a:b]) for a, b in zip(edges[:-1], edges[1:])]     # log det Σ_[ii]
    h = 0.5 * (d * _LOG2PIE + ld)
    r = 0.5 * sum(di * _LOG2PIE - lp for di, lp in zip(block_sizes, ld_p))
    b = 0.5 * (ld + sum(ld_p))
    tc = 0.5 * (sum(ld_s) - ld)
    return {"entropy": h, "residual_entropy": r, "binding": b, "total_correlation": tc, "o_information": tc - b}


def information_decomposition(states: Any, shrinkage: float = 1e-3, pca: int | None = None,
                              copula: bool = False) -> dict[str, float]:
    """The Gaussian H, R, B, TC, Ω of recorded states [S, n, d] (parts = experts), z-scored first."""
    x = as_samples(states)
    if pca:
        x = pca_reduce(x, pca)
    s, n, d = x.shape
    z = x.reshape(s, n * d)                                                     # [S, n, d] -> [S, n·d]
    if copula:
        z = copula_normal(z)
    z = zscore(z)
    cov = shrink(np.atleast_2d(np.cov(z, rowvar=False)), shrinkage)
    return information_from_cov(cov, [d] * n)


def binding_information(states: Any, shrinkage: float = 1e-3, pca: int | None = None, copula: bool = False) -> float:
    """B(X) = H(X) − R(X) in nats (dual total correlation)."""
    return information_decomposition(states, shrinkage, pca, copula)["binding"]


def residual_entropy(states: Any, shrinkage: float = 1e-3, pca: int | None = None, copula: bool = False) -> float:
    """R(X) = Σ_i H(X_i | X_−i) in nats (differential: may be negative; read its trend)."""
    return information_decomposition(states, shrinkage, pca, copula)["residual_entropy"]


def total_correlation(states: Any, shrinkage: float = 1e-3, pca: int | None = None, copula: bool = False) -> float:
    """TC(X) = Σ_i H(X_i) − H(X) in nats."""
    return information_decomposition(states, shrinkage, pca, copula)["total_correlation"]


def o_information(states: Any, shrinkage: float = 1e-3, pca: int | None = None, copula: bool = False) -> float:
    """Ω = TC − B (> 0 redundancy-dominated, < 0 synergy-dominated)."""
    return information_decomposition(states, shrinkage, pca, copula)["o_information"]
