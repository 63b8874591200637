"""Analysis tools (vsml/analysis, badger-bmg-es.md §B) against analytic cases and against nolds."""

import importlib.util
import math
import os
import warnings

import numpy as np
import pytest

from vsml.analysis import (
    algebraic_connectivity,
    binding_information,
    fgn,
    frequency_errors,
    gaussian_mi,
    graph_summary,
    hurst_rs,
    information_decomposition,
    information_from_cov,
    ksg_mi,
    laplacian_spectrum,
    loss_curve_hurst,
    lyap_r,
    mi_matrix,
    mi_summary,
    strongly_connected_components,
)
from vsml.learners.badger import sample_topology


def _nolds_measures():
    """nolds.measures loaded from its file (nolds 0.6.3's package __init__ fails to import its datasets on
    Python 3.11); None when nolds is not installed."""
    spec = importlib.util.find_spec("nolds")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "measures.py")
    try:
        s = importlib.util.spec_from_file_location("_nolds_measures", path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        return mod
    except Exception:       # noqa: BLE001 - any import problem means: no reference available
        return None


def _logistic(n=1500, r=4.0, x0=0.3):
    x = np.empty(n)
    x[0] = x0
    for i in range(1, n):
        x[i] = r * x[i - 1] * (1 - x[i - 1])
    return x


# ------------------------------------------------------------------------------------ mutual information

def test_independent_gaussians_have_zero_mi_and_binding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 5, 3))                       # 5 independent experts, 3 dims each
    s = mi_summary(x)
    assert abs(s["mi_mean"]) < 0.01 and s["mi_max"] < 0.02
    info = information_decomposition(x)
    assert abs(info["binding"]) < 0.05 and abs(info["total_correlation"]) < 0.05
    assert abs(ksg_mi(x[:1000, 0], x[:1000, 1])) < 0.05


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_gaussian_mi_matches_closed_form(rho):
    rng = np.random.default_rng(1)
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=20000)
    want = -0.5 * math.log(1 - rho ** 2)
    assert gaussian_mi(z[:, 0], z[:, 1]) == pytest.approx(want, abs=0.02)
    assert gaussian_mi(z[:, 0], z[:, 1], copula=True) == pytest.approx(want, abs=0.03)


def test_ksg_matches_closed_form_and_sklearn():
    rng = np.random.default_rng(2)
    rho = 0.6
    want = -0.5 * math.log(1 - rho ** 2)
    est = [ksg_mi(*rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=1500).T, k=4) for _ in range(4)]
    assert np.mean(est) == pytest.approx(want, abs=0.04)
    # the same estimator as scikit-learn's mutual_info_regression (KSG, k=3, scalar target)
    from sklearn.feature_selection import mutual_info_regression
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=800)
    ref = mutual_info_regression(z[:, :1], z[:, 1], n_neighbors=3, random_state=0)[0]
    assert ksg_mi(z[:, 0], z[:, 1], k=3) == pytest.approx(ref, abs=0.02)


def test_ksg_sees_nonlinear_dependence_gaussian_misses():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 1500)
    y = x ** 2 + 0.05 * rng.standard_normal(1500)              # zero correlation, strong dependence
    assert abs(gaussian_mi(x, y)) < 0.02
    assert ksg_mi(x, y) > 0.8


def test_mi_matrix_vector_experts_known_covariance():
    # expert 0 and 1 share one latent coordinate (corr rho), expert 2 independent
    rng = np.random.default_rng(4)
    s, rho = 20000, 0.8
    a = rng.standard_normal((s, 2))
    b = rng.standard_normal((s, 2))
    b[:, 0] = rho * a[:, 0] + math.sqrt(1 - rho ** 2) * b[:, 0]
    c = rng.standard_normal((s, 2))
    m = mi_matrix(np.stack([a, b, c], 1), shrinkage=0.0)
    assert m[0, 1] == pytest.approx(-0.5 * math.log(1 - rho ** 2), abs=0.02)
    assert abs(m[0, 2]) < 0.01 and abs(m[1, 2]) < 0.01 and m[0, 0] == 0.0
    assert np.allclose(m, m.T)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="S, n_experts, d"):
        mi_summary(np.zeros((4, 2, 2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        binding_information(np.full((10, 2, 1), np.nan))
    with pytest.raises(ValueError, match="same number of samples"):
        gaussian_mi(np.zeros(10), np.zeros(11))


# ------------------------------------------------------------------------------------ binding information

def test_binding_closed_form_known_covariance():
    # two scalars with correlation rho: B = TC = MI = -½ log(1 - rho²) (n = 2: dual TC = TC)
    rho = 0.7
    info = information_from_cov(np.array([[1, rho], [rho, 1]]), [1, 1])
    mi = -0.5 * math.log(1 - rho ** 2)
    assert info["binding"] == pytest.approx(mi) and info["total_correlation"] == pytest.approx(mi)
    assert info["entropy"] == pytest.approx(info["binding"] + info["residual_entropy"])
    # independent blocks
    zero = information_from_cov(np.diag([1.0, 2.0, 3.0, 0.5]), [2, 2])
    assert abs(zero["binding"]) < 1e-12 and abs(zero["total_correlation"]) < 1e-12


def test_binding_synergy_and_invariance():
    rng = np.random.default_rng(5)
    s = 20000
    x1, x2 = rng.standard_normal(s), rng.standard_normal(s)
    x3 = x1 + x2 + 0.1 * rng.standard_normal(s)
    info = information_decomposition(np.stack([x1, x2, x3], 1), shrinkage=0.0)
    assert info["binding"] > info["total_correlation"] and info["o_information"] < 0      # synergy
    # closed form for the same covariance
    cov = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 2.01]])
    assert info["binding"] == pytest.approx(information_from_cov(cov, [1, 1, 1])["binding"], abs=0.05)
    # invariance to an invertible map within each expert
    v = rng.standard_normal((s, 3, 2))
    v[:, 1, 0] += 0.8 * v[:, 0, 1]
    v[:, 2, 1] += 0.5 * v[:, 1, 0]
    b0 = binding_information(v, shrinkage=0.0)
    rot = np.array([[2.0, 1.0], [-0.5, 3.0]])
    b1 = binding_information(np.einsum("snd,ed->sne", v, rot), shrinkage=0.0)
    assert b0 > 0.1 and b1 == pytest.approx(b0, rel=1e-6)


# ------------------------------------------------------------------------------------ Hurst

def test_hurst_white_noise_random_walk_increments_and_persistent():
    rng = np.random.default_rng(6)
    white = [hurst_rs(rng.standard_normal(4096)) for _ in range(4)]
    assert np.mean(white) == pytest.approx(0.5, abs=0.06)
    walk = np.cumsum(rng.standard_normal(4097))
    assert hurst_rs(np.diff(walk)) == pytest.approx(0.5, abs=0.08)       # increments of a random walk
    assert hurst_rs(walk) > 0.85                                          # the walk itself: trending
    persistent = [hurst_rs(fgn(4096, 0.8, seed=s)) for s in range(4)]
    assert np.mean(persistent) > 0.65 and min(persistent) > 0.6
    anti = [hurst_rs(fgn(4096, 0.25, seed=s)) for s in range(4)]
    assert np.mean(anti) < 0.4


def test_fgn_has_the_exact_autocovariance():
    h = 0.8
    x = np.stack([fgn(256, h, seed=s) for s in range(400)])               # [runs, n]
    lag1 = np.mean(x[:, :-1] * x[:, 1:])
    assert np.var(x) == pytest.approx(1.0, abs=0.05)
    assert lag1 == pytest.approx(0.5 * (2 ** (2 * h) - 2), abs=0.03)      # γ(1) = ½(2^{2H} − 2)


def test_hurst_matches_nolds():
    nm = _nolds_measures()
    if nm is None:
        pytest.skip("nolds is not installed")
    rng = np.random.default_rng(7)
    for x in (rng.standard_normal(1000), np.cumsum(rng.standard_normal(1000)), fgn(1500, 0.7, 3)):
        assert hurst_rs(x, fit="poly") == pytest.approx(nm.hurst_rs(x, fit="poly"), abs=1e-10)


def test_loss_curve_hurst_reports_both():
    # log loss = trend + random walk: the raw curve looks persistent (H ~ 1), its log-increments are white
    rng = np.random.default_rng(8)
    loss = np.exp(-np.linspace(0, 3, 2000) + np.cumsum(0.02 * rng.standard_normal(2000)))
    out = loss_curve_hurst(loss)
    assert out["hurst_loss"] > 0.85 and abs(out["hurst_dlogloss"] - 0.5) < 0.1
    # i.i.d. multiplicative noise around a trend: log-increments are anti-persistent (MA(1), H < 0.5)
    noisy = np.exp(-np.linspace(0, 3, 2000)) * (1 + 0.05 * rng.standard_normal(2000))
    assert loss_curve_hurst(noisy)["hurst_dlogloss"] < 0.3


# ------------------------------------------------------------------------------------ Lyapunov

def test_lyapunov_logistic_map_is_ln2():
    x = _logistic(1500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lam = lyap_r(x, emb_dim=1, lag=1, min_tsep=10, trajectory_len=5)
    assert lam == pytest.approx(math.log(2), abs=0.05)


def test_lyapunov_matches_nolds_and_is_small_for_noise():
    nm = _nolds_measures()
    rng = np.random.default_rng(9)
    x = rng.standard_normal(400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = lyap_r(x)
        assert abs(ours) < 0.1
        if nm is not None:
            assert ours == pytest.approx(nm.lyap_r(x, fit="poly"), abs=1e-8)
            y = _logistic(600)
            assert lyap_r(y, emb_dim=2, trajectory_len=8) == pytest.approx(
                nm.lyap_r(y, emb_dim=2, trajectory_len=8, fit="poly"), abs=1e-8)


# ------------------------------------------------------------------------------------ graphs

@pytest.mark.parametrize("n", [5, 8])
def test_laplacian_complete_and_ring_closed_forms(n):
    complete = sample_topology("complete", 1, n)[0]
    ev = laplacian_spectrum(complete)
    assert np.allclose(ev, [0] + [n] * (n - 1), atol=1e-9)
    for k in (1, 2):
        ring = sample_topology("ring", 1, n, k=k)[0]
        want = np.sort([sum(2 - 2 * math.cos(2 * math.pi * m * j / n) for m in range(1, k + 1)) for j in range(n)])
        if 2 * k >= n:        # neighbourhoods overlap: the ring is complete
            want = np.array([0] + [n] * (n - 1), dtype=float)
        assert np.allclose(laplacian_spectrum(ring), want, atol=1e-9)
    assert algebraic_connectivity(sample_topology("ring", 1, n, k=1)[0]) == pytest.approx(2 - 2 * math.cos(2 * math.pi / n))


def test_strongly_connected_components_directed():
    a = np.zeros((6, 6))
    for j, i in [(0, 1), (1, 2), (2, 0), (2, 3), (3, 4), (4, 3)]:           # j sends to i
        a[i, j] = 1
    comps = strongly_connected_components(a)
    assert sorted(map(tuple, comps)) == [(0, 1, 2), (3, 4), (5,)]
    from scipy.sparse.csgraph import connected_components
    rng = np.random.default_rng(10)
    for _ in range(5):
        r = (rng.random((12, 12)) < 0.12).astype(float)
        np.fill_diagonal(r, 0)
        ncomp, _ = connected_components(r.T, directed=True, connection="strong")
        assert len(strongly_connected_components(r)) == ncomp
    s = graph_summary(a)
    assert s["n_scc"] == 3 and s["lambda2"] == 0.0 and s["weakly_connected"] == 0.0


# ------------------------------------------------------------------------------------ frequency errors

def test_frequency_errors_are_per_frequency():
    n = 41
    xg = 2 * np.pi * np.arange(n) / n
    y = np.sin(1 * xg + 0.3) + np.sin(3 * xg + 1.0)
    g = np.sin(1 * xg + 0.3) + 0.5 * np.sin(3 * xg + 1.0)                  # k=1 exact, k=3 half amplitude
    err = frequency_errors(g[None], y[None], [1, 3])
    assert err[0] == pytest.approx(0.0, abs=1e-10) and err[1] == pytest.approx(0.5, abs=1e-10)
