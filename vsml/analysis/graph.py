"""Topology diagnostics of communication graphs (badger-bmg-es.md §B.5, §A.3).

Convention (as ``vsml.learners.badger``): A[i, j] = 1 when j sends to i.  In-degree Laplacian L = D_in − A;
symmetrised Laplacian of A_s = max(A, Aᵀ); λ₂(L_s) = algebraic connectivity (> 0 iff the undirected
graph is connected); eigen-ratio λ_max/λ₂; strongly connected components by mutual reachability.
Closed forms used in the tests: complete graph K_n: eigenvalues 0, n (×(n−1)); ring C_n:
2 − 2cos(2πk/n); ring with k neighbours per side: Σ_{m=1..k} (2 − 2cos(2πmj/n)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["algebraic_connectivity", "graph_summary", "laplacian", "laplacian_spectrum",
           "strongly_connected_components"]


def _adj(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be a square [n, n] matrix, got shape {a.shape}")
    return a


def laplacian(adj: Any, kind: str = "sym") -> np.ndarray:
    """``in``: L = D_in − A (rows: receivers); ``sym``: L of the symmetrised graph max(A, Aᵀ)."""
    a = _adj(adj)
    np.fill_diagonal(a, 0.0)
    if kind == "sym":
        a = np.maximum(a, a.T)
    elif kind != "in":
        raise ValueError(f"kind must be 'sym' or 'in', got {kind!r}")
    return np.diag(a.sum(1)) - a


def laplacian_spectrum(adj: Any, kind: str = "sym") -> np.ndarray:
    """Eigenvalues of the Laplacian, ascending (real parts for the directed ``in`` Laplacian)."""
    lap = laplacian(adj, kind)
    if kind == "sym":
        return np.linalg.eigvalsh(lap)
    return np.sort(np.linalg.eigvals(lap).real)


def algebraic_connectivity(adj: Any) -> float:
    """λ₂ of the symmetrised Laplacian (0 for a disconnected graph or n < 2)."""
    ev = laplacian_spectrum(adj, "sym")
    return _lam2(ev)


def _lam2(ev: np.ndarray, tol: float = 1e-9) -> float:
    """λ₂ with round-off below ``tol`` (relative to λ_max) reported as exactly 0 (disconnected)."""
    if len(ev) < 2:
        return 0.0
    lam2 = float(ev[1])
    return lam2 if lam2 > tol * max(1.0, float(ev[-1])) else 0.0


def strongly_connected_components(adj: Any) -> list[list[int]]:
    """The SCCs of the directed graph (j -> i when A[i, j] = 1), each a sorted list, ordered by first node.

    Reachability R = transitive closure of (I + A) by repeated boolean squaring (n is small); i and j
    share a component iff each reaches the other."""
    a = _adj(adj) > 0
    n = a.shape[0]
    reach = a.T | np.eye(n, dtype=bool)                                         # reach[j, i]: j -> i
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2)))) + 1)):
        reach = reach | ((reach.astype(np.int64) @ reach.astype(np.int64)) > 0)
    mutual = reach & reach.T
    seen, comps = np.zeros(n, dtype=bool), []
    for i in range(n):
        if not seen[i]:
            members = np.flatnonzero(mutual[i])
            seen[members] = True
            comps.append(members.tolist())
    return comps


def graph_summary(adj: Any) -> dict[str, float]:
    """λ₂, λ_max, eigen-ratio λ_max/λ₂ (inf if λ₂ = 0), #SCC, mean in-degree, weakly connected (λ₂ > 0)."""
    a = _adj(adj)
    ev = laplacian_spectrum(a, "sym")
    lam2 = _lam2(ev)
    lmax = float(ev[-1])
    return {"lambda2": lam2, "lambda_max": lmax,
            "eigen_ratio": lmax / lam2 if lam2 > 0 else float("inf"),
            "n_scc": float(len(strongly_connected_components(a))),
            "mean_in_degree": float((a > 0).sum(1).mean()), "weakly_connected": float(lam2 > 0)}
