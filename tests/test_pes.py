"""Truncated ES and PES (vsml/estimators/pes.py; badger-bmg-es.md §D.2-§D.3).

Toy unrolled system: s_0 = 0, s_{n} = s_{n-1} + θ (a vector), ℓ_n = ‖s_n − c‖², full-horizon loss
L(θ) = Σ_{n=1}^{H} ‖nθ − c‖² with ∇L = Σ_n 2n(nθ − c).  The loss is quadratic in every
perturbation, so Gaussian smoothing leaves the gradient unchanged and the antithetic difference is
exactly linear: the only error of PES is sampling noise, while truncated ES converges to the
truncated gradient Σ_{t0} Σ_{j=1}^{K} 2j((t0 + j)θ − c) (it ignores θ → carried state s_{t0}).

Run: python -m pytest tests/test_pes.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from vsml import ConfigError, SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.estimators.es import sample_noise
from vsml.estimators.pes import PES, LearnerSystem, PESConfig, TruncatedES, UnrolledSystem

DT = torch.float64


class LinearSystem:
    """s ← s + θ_m per step, loss ‖s − c‖²; records every reset (init_state call)."""

    def __init__(self, c: torch.Tensor):
        self.c = c
        self.inits = 0

    def init_state(self, num_particles, generator):
        self.inits += 1
        return torch.zeros(num_particles, self.c.numel(), dtype=DT)           # [M, d]

    def unroll(self, thetas, state, t0, length):
        out = []
        for _ in range(length):
            state = state + thetas                                            # [M, d]
            out.append(((state - self.c) ** 2).sum(-1))                      # [M]
        return torch.stack(out, 1), state                                     # [M, length], [M, d]


def true_grad(th, c, horizon):
    return sum(2 * n * (n * th - c) for n in range(1, horizon + 1))


def truncated_grad(th, c, horizon, k):
    return sum(2 * j * ((t0 + j) * th - c) for t0 in range(0, horizon, k) for j in range(1, k + 1))


def _problem(d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(d, generator=g, dtype=DT), torch.randn(d, generator=g, dtype=DT)


def _run(cls, cfg, th, system, steps, start=0):
    est = cls(cfg)
    st = est.init(th)
    total = torch.zeros_like(th)
    for k in range(start, start + steps):
        g, m, st = est.step(th, st, system, k)
        total += g
    return total, m, st


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_protocol():
    assert isinstance(LinearSystem(torch.zeros(2, dtype=DT)), UnrolledSystem)


@pytest.mark.parametrize("seed", [0, 1])
def test_pes_unbiased_truncated_es_biased(seed):
    th, c = _problem(seed=seed)
    h, k = 20, 4
    cfg = PESConfig(particles=4000, sigma=0.1, truncation=k, horizon=h, seed=seed, reduction="sum")
    g_true, g_trunc = true_grad(th, c, h), truncated_grad(th, c, h, k)
    assert _rel(g_trunc, g_true) > 0.5                                        # the toy is biased for TES

    pes, _, _ = _run(PES, cfg, th, LinearSystem(c), h // k)                   # one full horizon
    tes, _, _ = _run(TruncatedES, cfg, th, LinearSystem(c), h // k)
    assert _rel(pes, g_true) < 0.1
    assert float(torch.cosine_similarity(pes, g_true, 0)) > 0.95
    assert _rel(tes, g_true) > 0.5                                            # measurably biased
    assert _rel(tes, g_trunc) < 0.1                                           # ... towards the truncated gradient


def test_reduction_mean_is_sum_over_k():
    th, c = _problem()
    kw = {"particles": 8, "sigma": 0.1, "truncation": 4, "horizon": 12, "seed": 3}
    for cls in (PES, TruncatedES):
        gs, _, _ = _run(cls, PESConfig(reduction="sum", **kw), th, LinearSystem(c), 5)
        gm, _, _ = _run(cls, PESConfig(reduction="mean", **kw), th, LinearSystem(c), 5)
        torch.testing.assert_close(gm * 4, gs)


def test_determinism():
    th, c = _problem()
    cfg = PESConfig(particles=16, sigma=0.1, truncation=3, horizon=9, seed=7)
    for cls in (PES, TruncatedES):
        a, _, sa = _run(cls, cfg, th, LinearSystem(c), 4)
        b, _, sb = _run(cls, cfg, th, LinearSystem(c), 4)
        assert torch.equal(a, b) and torch.equal(sa.accum, sb.accum) and torch.equal(sa.inner, sb.inner)
        o, _, _ = _run(cls, PESConfig(particles=16, sigma=0.1, truncation=3, horizon=9, seed=8), th,
                       LinearSystem(c), 4)
        assert not torch.equal(a, o)


def test_reset_at_horizon_boundary():
    th, c = _problem()
    p, k, h = 5, 4, 8
    cfg = PESConfig(particles=p, sigma=0.1, truncation=k, horizon=h, seed=1)
    pes, system = PES(cfg), LinearSystem(c)
    st = pes.init(th)
    eps0 = sample_noise(1, 0, range(p), th.shape, DT)
    eps1 = sample_noise(1, 1, range(p), th.shape, DT)
    _, m, st = pes.step(th, st, system, 0)
    assert st.t == 4 and st.episode == 0 and m["resets"] == 0
    torch.testing.assert_close(st.accum, eps0)
    # per-particle states diverge within a pair: s = 4 (θ ± σ ε0)
    torch.testing.assert_close(st.inner[0::2], 4 * (th + 0.1 * eps0))
    torch.testing.assert_close(st.inner[1::2], 4 * (th - 0.1 * eps0))
    _, m, st = pes.step(th, st, system, 1)
    assert st.t == 0 and st.episode == 1 and m["resets"] == 1 and system.inits == 2
    assert torch.count_nonzero(st.accum) == 0 and torch.count_nonzero(st.inner) == 0   # reset
    # next truncation starts the new episode: ξ = ε2 only, not ε0 + ε1 + ε2
    _, m, st = pes.step(th, st, system, 2)
    torch.testing.assert_close(st.accum, sample_noise(1, 2, range(p), th.shape, DT))
    assert not torch.allclose(st.accum, eps0 + eps1 + sample_noise(1, 2, range(p), th.shape, DT))


def test_truncated_es_continues_from_positive_member():
    th, c = _problem()
    tes = TruncatedES(PESConfig(particles=3, sigma=0.1, truncation=2, horizon=6, seed=0))
    st = tes.init(th)
    _, _, st = tes.step(th, st, LinearSystem(c), 0)
    eps0 = sample_noise(0, 0, range(3), th.shape, DT)
    torch.testing.assert_close(st.inner[0::2], 2 * (th + 0.1 * eps0))
    torch.testing.assert_close(st.inner[1::2], st.inner[0::2])
    assert torch.count_nonzero(st.accum) == 0


def test_reset_inside_truncation_non_multiple_horizon():
    th, c = _problem()
    p, k, h = 5, 4, 10
    cfg = PESConfig(particles=p, sigma=0.1, truncation=k, horizon=h, seed=2)
    pes, system = PES(cfg), LinearSystem(c)
    st = pes.init(th)
    for i in range(2):
        _, m, st = pes.step(th, st, system, i)
    assert st.t == 8 and m["resets"] == 0
    _, m, st = pes.step(th, st, system, 2)                                    # steps 8, 9 | reset | 0, 1
    eps2 = sample_noise(2, 2, range(p), th.shape, DT)
    assert st.t == 2 and st.episode == 1 and m["resets"] == 1
    torch.testing.assert_close(st.accum, eps2)                               # new episode: current ε only
    torch.testing.assert_close(st.inner[0::2], 2 * (th + 0.1 * eps2))        # 2 steps from s0 = 0
    torch.testing.assert_close(st.inner[1::2], 2 * (th - 0.1 * eps2))


def test_pes_unbiased_with_split_truncations():
    # H = 10, K = 4: 5 truncations = 20 inner steps = exactly 2 episodes; the third truncation is
    # split at t = 10 (steps 8, 9 of episode 0 and 0, 1 of episode 1); Σ ĝ ≈ 2 ∇L.
    th, c = _problem(seed=3)
    h, k = 10, 4
    cfg = PESConfig(particles=4000, sigma=0.1, truncation=k, horizon=h, seed=3, reduction="sum")
    pes, _, st = _run(PES, cfg, th, LinearSystem(c), 5)
    assert st.t == 0 and st.episode == 2
    assert _rel(pes, 2 * true_grad(th, c, h)) < 0.1
    # truncation longer than the horizon: several resets in one truncation
    cfg = PESConfig(particles=4000, sigma=0.1, truncation=25, horizon=10, seed=4, reduction="sum")
    g, m, st = _run(PES, cfg, th, LinearSystem(c), 2)                         # 50 steps = 5 episodes
    assert st.t == 0 and st.episode == 5 and m["resets"] == 3
    assert _rel(g, 5 * true_grad(th, c, h)) < 0.1


@pytest.mark.parametrize("kw", [{"particles": 0}, {"particles": 1.5}, {"sigma": 0.0}, {"sigma": -1.0},
                                {"sigma": math.inf}, {"truncation": 0}, {"horizon": 0},
                                {"reduction": "max"}, {"seed": None}])
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        PESConfig(**kw)
    assert issubclass(ConfigError, ValueError)


def test_state_shape_checked():
    th, c = _problem()
    pes = PES(PESConfig(particles=2, truncation=2, horizon=4))
    st = pes.init(torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="accum"):
        pes.step(th, st, LinearSystem(c), 0)


def test_learner_system_smoke():
    net = VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(hidden=4, msg=2)))
    theta = net.init_theta(torch.Generator().manual_seed(0))
    d, ncls = 4, 2

    def sample(num, length, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(num, d, generator=g)
        x = torch.randn(num, length, d, generator=g)
        y = (torch.einsum("nld,nd->nl", x, w) > 0).long()
        return x, y, ncls

    system = LearnerSystem(net, sample, horizon=12)
    cfg = PESConfig(particles=4, sigma=0.05, truncation=4, horizon=12, seed=0)
    for cls in (PES, TruncatedES):
        est = cls(cfg)
        st = est.init(theta)
        for k in range(4):                                                    # crosses the reset at t = 12
            g, m, st = est.step(theta, st, system, k)
            assert g.shape == theta.shape and g.dtype == theta.dtype
            assert torch.isfinite(g).all() and math.isfinite(m["loss_mean"])
        assert st.t == 4 and st.episode == 1
