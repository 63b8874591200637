"""Hurst exponent by rescaled range, matching ``nolds.hurst_rs`` 0.6.x (badger-bmg-es.md §B.3), and an
exact fractional-Gaussian-noise generator for tests.

Algorithm (nolds defaults): window sizes ``logmid_n(N, 1/4, 15)``; for each n, non-overlapping windows
of length n, R/S per window (mean-removed cumulative sum's range over the ddof-1 std; windows with
R = 0 dropped), averaged; then a line fit of log(R/S)_n − log E[(R/S)_n] (Anis–Lloyd–Peters) against
log n; H = slope + 0.5.  ``fit="poly"`` (least squares, deterministic) or ``"RANSAC"`` (scikit-learn,
seeded here; nolds leaves it unseeded).

Caveat (§B.3): R/S assumes increment-like input; a trending loss curve gives H ≈ 1 regardless.
:func:`loss_curve_hurst` therefore reports both H(loss) (the blog's quantity) and H(diff(log loss)).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

__all__ = ["expected_rs", "fgn", "hurst_rs", "line_fit", "logmid_n", "loss_curve_hurst", "rs"]


def logmid_n(max_n: int, ratio: float = 0.25, nsteps: int = 15) -> np.ndarray:
    """Unique integers round(exp(l(1 − ratio)/2 + (j/nsteps)·l·ratio)), j < nsteps, l = ln max_n."""
    l = np.log(max_n)
    mid = l * (1 - ratio) * 0.5 + np.arange(nsteps) / nsteps * (l * ratio)
    return np.unique(np.round(np.exp(mid)).astype(np.int64))


def expected_rs(n: int) -> float:
    """Anis–Lloyd–Peters E[(R/S)_n] of white noise: ((n − ½)/n) · G(n) · Σ_{i<n} √((n − i)/i)."""
    i = np.arange(1, n)
    back = float(np.sum(np.sqrt((n - i) / i)))
    mid = math.gamma((n - 1) * 0.5) / math.sqrt(math.pi) / math.gamma(n * 0.5) if n <= 340 \
        else 1.0 / math.sqrt(n * math.pi * 0.5)
    return (n - 0.5) / n * mid * back


def rs(x: np.ndarray, n: int, unbiased: bool = True) -> float:
    """(R/S)_n: the mean rescaled range over the ⌊N/n⌋ non-overlapping windows of length n (NaN if none)."""
    m = len(x) // n
    seqs = np.asarray(x[:m * n], dtype=np.float64).reshape(m, n)                # [m, n] windows
    y = np.cumsum(seqs - seqs.mean(1, keepdims=True), axis=1)
    r = y.max(1) - y.min(1)
    s = seqs.std(1, ddof=1 if unbiased else 0)
    keep = r != 0
    return float(np.mean(r[keep] / s[keep])) if keep.any() else float("nan")


def line_fit(x: np.ndarray, y: np.ndarray, fit: Literal["poly", "RANSAC"] = "poly", seed: int = 0) -> tuple[float, float]:
    """(slope, intercept) of a line through (x, y): least squares, or RANSAC (nolds' setup, seeded)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if fit == "poly":
        a, b = np.polyfit(x, y, 1)
        return float(a), float(b)
    if fit != "RANSAC":
        raise ValueError(f"fit must be 'poly' or 'RANSAC', got {fit!r}")
    from sklearn.linear_model import LinearRegression, RANSACRegressor
    from sklearn.preprocessing import PolynomialFeatures
    feats = PolynomialFeatures(1).fit_transform(x.reshape(-1, 1))             # [k, 2] = [1, x]
    model = RANSACRegressor(LinearRegression(fit_intercept=False), random_state=seed)
    try:
        model.fit(feats, y)
        b, a = model.estimator_.coef_
    except ValueError:                      # no consensus: fall back to least squares, as nolds does
        a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def hurst_rs(data: Any, nvals: Any = None, fit: Literal["poly", "RANSAC"] = "poly", corrected: bool = True,
             unbiased: bool = True, seed: int = 0) -> float:
    """Hurst exponent of a 1-D series by R/S (nolds.hurst_rs semantics; ``fit="poly"`` by default here
    for determinism; pass ``fit="RANSAC"`` for nolds' default).  NaN if every (R/S)_n is NaN."""
    x = np.asarray(data, dtype=np.float64).ravel()
    if len(x) < 8:
        raise ValueError(f"hurst_rs needs a series of at least 8 points, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError("hurst_rs: the series contains non-finite values")
    nv = logmid_n(len(x)) if nvals is None else np.asarray(nvals, dtype=np.int64)
    vals = np.array([rs(x, int(n), unbiased) for n in nv])
    ok = ~np.isnan(vals)
    if not ok.any():
        return float("nan")
    nv, vals = nv[ok], vals[ok]
    xs, ys = np.log(nv), np.log(vals)
    if corrected:
        ys = ys - np.log([expected_rs(int(n)) for n in nv])
    slope, _ = line_fit(xs, ys, fit, seed)
    return slope + 0.5 if corrected else slope


def loss_curve_hurst(loss: Any, fit: Literal["poly", "RANSAC"] = "poly") -> dict[str, float]:
    """{"hurst_loss": H(loss) (trend-dominated, blog-compatible), "hurst_dlogloss": H(diff(log loss))}."""
    x = np.asarray(loss, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    out = {"hurst_loss": hurst_rs(x, fit=fit)}
    lx = np.log(np.maximum(x, 1e-12))
    out["hurst_dlogloss"] = hurst_rs(np.diff(lx), fit=fit)
    return out


def fgn(n: int, hurst: float, seed: int = 0) -> np.ndarray:
    """Exact fractional Gaussian noise of length n (unit variance) by circulant embedding (Davies & Harte
    1987): autocovariance γ(k) = ½(|k+1|^{2H} − 2|k|^{2H} + |k−1|^{2H}); H = 0.5 is white noise."""
    if not 0 < hurst < 1:
        raise ValueError(f"hurst must lie in (0, 1), got {hurst}")
    k = np.arange(n + 1, dtype=np.float64)
    g = 0.5 * ((k + 1) ** (2 * hurst) - 2 * k ** (2 * hurst) + np.abs(k - 1) ** (2 * hurst))  # γ(0..n)
    row = np.concatenate([g, g[-2:0:-1]])                                       # circulant first row, 2n
    lam = np.fft.fft(row).real
    if lam.min() < -1e-9:
        raise ValueError("circulant embedding is not non-negative definite for this H / n")
    lam = np.maximum(lam, 0.0)
    m = len(row)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    z = np.fft.fft(np.sqrt(lam / m) * w)
    return z.real[:n]
