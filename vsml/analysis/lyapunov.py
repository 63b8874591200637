"""Largest Lyapunov exponent by Rosenstein et al. (1993), matching ``nolds.lyap_r`` 0.6.3 (§B.4).

Defaults as nolds: emb_dim 10, lag by the autocorrelation rule, min_tsep = ⌈1/mean frequency⌉ (power
spectrum |f|², capped at ⌊0.25 N⌋), trajectory_len 20, min_neighbors 20.  The line fit is least squares
(``fit="poly"``) by default here; ``"RANSAC"`` is nolds' default.  λ is per sample (÷ tau).
For a loss curve (§B.4 notes) use :func:`loss_curve_lyapunov` (on log loss).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np

from .hurst import line_fit

__all__ = ["delay_embedding", "lyap_r", "loss_curve_lyapunov"]


def delay_embedding(x: np.ndarray, emb_dim: int, lag: int = 1) -> np.ndarray:
    """Orbit vectors X_i = [x_i, x_{i+lag}, …, x_{i+(emb_dim−1)lag}] -> [m, emb_dim]."""
    min_len = (emb_dim - 1) * lag + 1
    if len(x) < min_len:
        raise ValueError(f"cannot embed {len(x)} points with emb_dim {emb_dim} and lag {lag} (need {min_len})")
    m = len(x) - min_len + 1
    idx = np.arange(emb_dim)[None, :] * lag + np.arange(m)[:, None]            # [m, emb_dim]
    return x[idx]


def _min_len(emb_dim: int, lag: int, trajectory_len: int, min_tsep: int) -> int:
    return (emb_dim - 1) * lag + 1 + (trajectory_len - 1) + min_tsep * 2 + 1


def lyap_r(data: Any, emb_dim: int = 10, lag: int | None = None, min_tsep: int | None = None, tau: float = 1.0,
           min_neighbors: int = 20, trajectory_len: int = 20, fit: Literal["poly", "RANSAC"] = "poly",
           fit_offset: int = 0, seed: int = 0) -> float:
    """Largest Lyapunov exponent of a 1-D series (per sample / tau)."""
    x = np.asarray(data, dtype=np.float64).ravel()
    n = len(x)
    if not np.isfinite(x).all():
        raise ValueError("lyap_r: the series contains non-finite values")
    if lag is None or min_tsep is None:
        f = np.fft.rfft(x, n * 2 - 1)
    if min_tsep is None:
        freqs = np.fft.rfftfreq(n * 2 - 1)
        psd = np.abs(f) ** 2
        mf = np.sum(freqs[1:] * psd[1:]) / np.sum(psd[1:])
        min_tsep = int(np.ceil(1.0 / mf))
        if min_tsep > 0.25 * n:
            min_tsep = int(0.25 * n)
            warnings.warn(f"signal has very low mean frequency, setting min_tsep = {min_tsep}", RuntimeWarning)
    if lag is None:
        acorr = np.roll(np.fft.irfft(f * np.conj(f)), n - 1)
        eps = acorr[n - 1] * (1 - 1.0 / np.e)
        lag = 1
        for i in range(1, n):
            lag = i
            if acorr[n - 1 + i] < eps or acorr[n - 1 - i] < eps:
                break
            if max(0, n - _min_len(emb_dim, i, trajectory_len, min_tsep)) < min_neighbors:
                warnings.warn(f"autocorrelation declined too slowly to find a suitable lag, setting lag to {lag}",
                              RuntimeWarning)
                break
    need = _min_len(emb_dim, lag, trajectory_len, min_tsep)
    if n < need:
        warnings.warn(f"lyap_r: emb_dim={emb_dim}, lag={lag}, min_tsep={min_tsep}, trajectory_len={trajectory_len} "
                      f"need at least {need} points, got {n}", RuntimeWarning)
    orbit = delay_embedding(x, emb_dim, lag)                                    # [m, emb_dim]
    m = len(orbit)
    sq = (orbit ** 2).sum(1)
    dists = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * orbit @ orbit.T, 0.0))  # [m, m] Euclidean
    ii = np.arange(m)
    dists[np.abs(ii[:, None] - ii[None, :]) <= min_tsep] = np.inf              # temporal neighbours excluded
    ntraj = m - trajectory_len + 1
    if ntraj <= 0:
        raise ValueError(f"lyap_r: not enough data points, need {-ntraj + 1} more to follow a complete trajectory")
    if ntraj < min_tsep * 2 + 2:
        raise ValueError(f"lyap_r: at least {min_tsep * 2 + 2} trajectories are needed with min_tsep={min_tsep}, "
                         f"only {ntraj} could be formed")
    nb = np.argmin(dists[:ntraj, :ntraj], axis=1)                               # [ntraj] nearest neighbour
    div = np.empty(trajectory_len)
    for k in range(trajectory_len):
        d = dists[np.arange(ntraj) + k, nb + k]
        d = d[d != 0]
        div[k] = np.mean(np.log(d)) if len(d) else -np.inf
    ks = np.arange(trajectory_len)
    ok = np.isfinite(div)
    ks, div = ks[ok], div[ok]
    if len(ks) < 1:
        return float("-inf")
    slope, _ = line_fit(ks[fit_offset:], div[fit_offset:], fit, seed)
    return slope / tau


def loss_curve_lyapunov(loss: Any, **kw: Any) -> float:
    """λ of log(loss) (scale removed; §B.4 notes); a descriptive statistic of the training trajectory."""
    x = np.asarray(loss, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    return lyap_r(np.log(np.maximum(x, 1e-12)), **kw)
