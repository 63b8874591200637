"""ES estimator tests: noise regeneration, unbiasedness on a quadratic, fitness shaping, non-finite
fitness, ES + Adam descent, and the batched ESEstimator on a tiny VSML task.

Run: python -m pytest tests/test_es.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from vsml import SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.learners.baselines import OnlineSGD
from vsml.estimators.es import ESConfig, centered_ranks, es_ask, es_gradient, es_tell, pair_seed, sample_noise
from vsml.estimators.base import clip_grad
from vsml.estimators.core import ESEstimator, make_optimizer

DT = torch.float64




def _quadratic(d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=DT)
    a = a @ a.T / d + torch.eye(d, dtype=DT)                                  # SPD
    c = torch.randn(d, generator=g, dtype=DT)

    def loss(th):                                                             # th [..., d] -> [...]
        r = th - c
        return 0.5 * torch.einsum("...i,ij,...j->...", r, a, r)

    def grad(th):
        return a @ (th - c)

    return loss, grad, torch.randn(d, generator=g, dtype=DT)


def _cos(a, b):
    return float(torch.dot(a.flatten().to(DT), b.flatten().to(DT)) / (a.norm() * b.norm()))


# --------------------------------------------------------------------------------------------
# config, noise


def test_config_validation():
    for bad in [dict(pairs=0), dict(sigma=0.0), dict(sigma=float("nan")), dict(fitness="rank"),
                dict(noise_chunk=0)]:
        with pytest.raises(ValueError):
            ESConfig(**bad)
    ESConfig(pairs=1, sigma=1e-3, fitness="centered_rank")


def test_noise_regenerated_from_seeds():
    a = sample_noise(3, 7, range(8), (5, 4))
    assert a.shape == (8, 5, 4)
    assert torch.equal(a, sample_noise(3, 7, range(8), (5, 4)))              # deterministic
    assert torch.equal(a[5], sample_noise(3, 7, [5], (5, 4))[0])             # independent of the others
    assert torch.equal(a[2:6], sample_noise(3, 7, torch.arange(2, 6), (5, 4)))
    assert torch.equal(a.reshape(8, -1), sample_noise(3, 7, range(8), (20,)))  # shape-independent stream
    assert not torch.allclose(a, sample_noise(3, 8, range(8), (5, 4)))      # step matters
    assert not torch.allclose(a, sample_noise(4, 7, range(8), (5, 4)))      # seed matters
    assert not torch.allclose(a[0], a[1])                                    # pairs differ
    assert sample_noise(3, 7, [0], (5,), dtype=DT).dtype == DT
    assert len({pair_seed(0, s, i) for s in range(20) for i in range(-1, 50)}) == 20 * 51
    big = sample_noise(0, 0, range(64), (1000,))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01


def test_population_is_interleaved_antithetic():
    cfg = ESConfig(pairs=3, sigma=0.1, seed=5)
    th = torch.randn(2, 4)
    pop = es_ask(th, cfg, step=2)
    eps = sample_noise(5, 2, range(3), (2, 4))
    assert pop.shape == (6, 2, 4)
    torch.testing.assert_close(pop[0::2], th + 0.1 * eps)
    torch.testing.assert_close(pop[1::2], th - 0.1 * eps)


def test_centered_ranks():
    u = centered_ranks(torch.tensor([3.0, 1.0, float("nan"), 2.0, float("inf")]))
    # sorted: 1 (rank 0), 2, 3, nan (worst, by index), inf -> rank/4 - 0.5
    torch.testing.assert_close(u, torch.tensor([0.0, -0.5, 0.25, -0.25, 0.5], dtype=DT))
    assert float(u.min()) == -0.5 and float(u.max()) == 0.5


# --------------------------------------------------------------------------------------------
# estimator on a quadratic


@pytest.mark.parametrize("fitness", ["raw", "centered_rank"])
def test_quadratic_cosine_with_true_gradient(fitness):
    loss, grad, th = _quadratic()
    g, m = es_gradient(th, loss, ESConfig(pairs=2000, sigma=0.05, fitness=fitness, seed=1), step=0)
    assert g.shape == th.shape and g.dtype == th.dtype
    assert _cos(g, grad(th)) > 0.9
    assert m["nonfinite"] == 0 and m["all_nonfinite"] == 0
    for k in ("loss_mean", "loss_std", "loss_min", "loss_max", "grad_norm"):
        assert isinstance(m[k], float) and math.isfinite(m[k])
    assert m["loss_min"] <= m["loss_mean"] <= m["loss_max"]
    if fitness == "raw":   # the raw estimator is unbiased for the (smoothed) quadratic: magnitude too
        assert abs(float(g.norm()) / float(grad(th).norm()) - 1) < 0.15


def test_raw_estimator_formula():
    """ĝ = (1/P) Σ ε_i (L⁺ − L⁻)/(2σ) on a linear loss equals (1/P) Σ ε_i ε_iᵀ w exactly."""
    w = torch.randn(6, dtype=DT)
    cfg = ESConfig(pairs=7, sigma=0.3, seed=2)
    g, _ = es_gradient(torch.zeros(6, dtype=DT), lambda th: th @ w, cfg, step=4)
    eps = sample_noise(2, 4, range(7), (6,), dtype=DT)
    torch.testing.assert_close(g, eps.T @ (eps @ w) / 7)


def test_nonfinite_fitness_is_ranked_worst_and_counted():
    loss, grad, th = _quadratic()
    cfg = ESConfig(pairs=200, sigma=0.05, seed=3)
    bad = {0: float("nan"), 5: float("inf"), 6: -float("inf")}

    def poisoned(pop):
        out = loss(pop)
        for i, v in bad.items():
            out[i] = v
        return out

    for fitness in ("raw", "centered_rank"):
        c = ESConfig(pairs=200, sigma=0.05, seed=3, fitness=fitness)
        g, m = es_gradient(th, poisoned, c, step=0)
        assert torch.isfinite(g).all()
        assert m["nonfinite"] == 3 and m["all_nonfinite"] == 0
        assert _cos(g, grad(th)) > 0.8
    # raw: a non-finite member counts as the worst finite loss of the population
    losses = loss(es_ask(th, cfg, 0))
    ref = losses.clone()
    worst = losses[[j for j in range(400) if j not in bad]].max()
    for i, v in bad.items():
        ref[i] = worst
        losses[i] = v
    g1, _ = es_tell(th, losses, cfg, 0)
    g2, _ = es_tell(th, ref, cfg, 0)
    torch.testing.assert_close(g1, g2)
    # all non-finite: zero gradient, flagged, no exception
    g, m = es_gradient(th, lambda pop: torch.full((pop.shape[0],), float("nan"), dtype=DT), cfg, 0)
    assert torch.equal(g, torch.zeros_like(th))
    assert m["all_nonfinite"] == 1 and m["nonfinite"] == 400 and m["grad_norm"] == 0


def test_loss_fn_shape_error():
    with pytest.raises(ValueError, match="2\\*pairs"):
        es_gradient(torch.zeros(3), lambda pop: pop.sum(-1)[:-1], ESConfig(pairs=4), 0)


@pytest.mark.parametrize("fitness", ["raw", "centered_rank"])
def test_es_adam_descends_quadratic(fitness):
    loss, _, th0 = _quadratic(seed=4)
    theta = torch.nn.Parameter(th0.clone())
    opt = make_optimizer(theta, lr=0.05)
    cfg = ESConfig(pairs=64, sigma=0.05, fitness=fitness, seed=0)
    start = float(loss(theta.detach()))
    for step in range(40):
        grad, _ = es_gradient(theta.detach(), loss, cfg, step)
        theta.grad = grad
        opt.step()
    assert float(loss(theta.detach())) < 0.5 * start


# --------------------------------------------------------------------------------------------
# optimiser helpers


def test_make_optimizer_and_clip():
    p = torch.nn.Parameter(torch.ones(4))
    assert type(make_optimizer(p, 0.025)) is torch.optim.Adam
    opt = make_optimizer(p, 0.1, weight_decay=0.5)
    assert type(opt) is torch.optim.AdamW
    p.grad = torch.zeros(4)
    opt.step()                                    # zero gradient: only the decoupled decay acts
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - 0.1 * 0.5))
    for bad in [dict(lr=0.0), dict(lr=1.0, weight_decay=-1.0), dict(lr=1.0, betas=(0.9, 1.0)),
                dict(lr=1.0, eps=0.0)]:
        with pytest.raises(ValueError):
            make_optimizer(p, **bad)
    g = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(clip_grad(g, 1.0), torch.tensor([0.6, 0.8]))
    assert clip_grad(g, 10.0) is g and clip_grad(g, 0.0) is g
    nan = torch.tensor([float("nan"), 1.0])
    assert clip_grad(nan, 1.0) is nan


# --------------------------------------------------------------------------------------------
# ESEstimator on VSML


def _tiny_vsml():
    return VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(hidden=4, msg=2)))


def _tiny_task(p, t, d=4, c=2, seed=0, dtype=torch.float32):
    """'random'-like data: a few fixed random patterns with fixed random labels, repeated."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(p, c * 2, d, generator=g, dtype=dtype)
    labels = torch.arange(c * 2) % c
    idx = torch.randint(0, c * 2, (p, t), generator=g)
    x = torch.gather(protos, 1, idx[..., None].expand(p, t, d))
    y = labels[idx]
    return x, y


def test_es_estimator_pairs_share_data_and_state():
    net = _tiny_vsml()
    cfg = ESConfig(pairs=3, sigma=0.05)
    est = ESEstimator(net, cfg)
    theta = net.init_theta(torch.Generator().manual_seed(0))
    x, y = _tiny_task(3, 6)
    same = theta.expand(6, *theta.shape).clone()                             # σ = 0 population
    losses, _ = est.member_losses(same, x, y, 2, step=1)
    torch.testing.assert_close(losses[0::2], losses[1::2], rtol=0, atol=0)
    assert not torch.allclose(losses[0], losses[2])                          # different pairs differ
    # chunked evaluation (max_batch) gives the same estimate
    g1, m1 = est.estimate(theta, x, y, 2, step=1)
    g2, m2 = ESEstimator(net, cfg, max_batch=2).estimate(theta, x, y, 2, step=1)
    torch.testing.assert_close(g1, g2)
    assert m1["loss_mean"] == pytest.approx(m2["loss_mean"])
    assert 0.0 <= m1["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="pairs"):
        est.estimate(theta, x[:2], y[:2], 2, step=1)
    with pytest.raises(ValueError):
        ESEstimator(net, cfg, max_batch=3)
    with pytest.raises(ValueError, match="meta-trainable"):
        ESEstimator(OnlineSGD(), cfg)


@pytest.mark.parametrize("fitness", ["raw", "centered_rank"])
def test_es_estimator_matches_directional_derivatives_on_vsml(fitness):
    """The batched ESEstimator on a tiny VSML task equals its first-order expansion
    (1/P) Σ_i ε_i (ε_i · ∇L_i(θ)), with ∇L_i the exact (autograd) gradient of pair i's episode
    loss under the same data and initial state: checks noise regeneration, the interleaved
    ± population, shared per-pair data/state and the 1/(2σP) scaling in one go.  (The cosine
    with the mean gradient itself is low at this P: per-episode gradients vary a lot.)"""
    net = _tiny_vsml()
    p, t, c, step = 64, 20, 2, 3
    cfg = ESConfig(pairs=p, sigma=1e-3, seed=0, fitness=fitness)
    est = ESEstimator(net, cfg)
    gen = torch.Generator().manual_seed(1)
    theta = net.init_theta(gen, dtype=DT)
    theta = theta + 0.5 * torch.randn(theta.shape, generator=gen, dtype=DT)
    x, y = _tiny_task(p, t, seed=2, dtype=DT)
    g_es, m = est.estimate(theta, x, y, c, step)
    th_pe = theta.expand(p, *theta.shape).clone().requires_grad_(True)     # [P, L, |θ|]
    out = net.unroll(th_pe, x, y, c, state=est.initial_state(p, x.shape[2], c, step, dtype=DT))
    (grads,) = torch.autograd.grad(out.loss.mean(1).sum(), th_pe)          # [P, L, |θ|]: ∇L_i
    eps = sample_noise(0, step, range(p), theta.shape, dtype=DT)           # [P, L, |θ|]
    dd = (eps * grads).flatten(1).sum(1)                                    # ε_i · ∇L_i   [P]
    assert m["loss_mean"] == pytest.approx(float(out.loss.mean().detach()), abs=1e-3)
    if fitness == "raw":
        g_lin = (eps * dd[:, None, None]).mean(0)
        assert _cos(g_es, g_lin) > 0.999
        assert float(g_es.norm()) == pytest.approx(float(g_lin.norm()), rel=1e-2)
    else:   # ranks: only the direction is comparable; sign(L⁺ − L⁻) = sign(ε·∇L) to first order
        g_sign = (eps * dd.sign()[:, None, None]).mean(0)
        assert _cos(g_es, g_sign) > 0.8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_es_adam_reduces_vsml_meta_loss(seed):
    """20 ES + Adam steps (reference σ and lr, 64 pairs) from a perturbed θ reduce the meta-loss,
    measured on fixed held-out episodes and initial states."""
    net = _tiny_vsml()
    p, t, c = 64, 20, 2
    est = ESEstimator(net, ESConfig(pairs=p, sigma=0.05, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    th0 = net.init_theta(gen)
    theta = torch.nn.Parameter(th0 + 0.5 * torch.randn(th0.shape, generator=gen))
    opt = make_optimizer(theta, lr=0.025)
    x_ev, y_ev = _tiny_task(256, t, seed=100)
    ev_state = net.init_state(256, 4, c, torch.Generator().manual_seed(7))

    def eval_loss():
        with torch.no_grad():
            return float(net.unroll(theta.detach(), x_ev, y_ev, c, state=ev_state.clone()).loss.mean())

    start = eval_loss()
    for step in range(20):
        x, y = _tiny_task(p, t, seed=1000 * seed + step)
        grad, m = est.estimate(theta.detach(), x, y, c, step)
        assert m["nonfinite"] == 0
        theta.grad = grad
        opt.step()
    assert eval_loss() < start - 5e-4
