"""Baseline learner tests: online timing (predict before update), vectorisation over episodes,
hand-written gradients, learning an easy stream, per-episode θ, gradient flow, padding, registry.

Run: python -m pytest tests/test_baselines.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vsml import SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.learners.baselines import HebbianLearner, MetaRNN, OnlineSGD, OnlineSGDState
from vsml.learners.registry import build, names
from vsml.estimators.bptt import BPTTConfig, bptt_gradient
from vsml.estimators.es import ESConfig
from vsml.estimators.core import ESEstimator
from vsml.learners.base import Learner, is_meta_trainable

DT = torch.float64




def _data(e=3, t=10, d=5, c=3, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, t, d, generator=g, dtype=dtype), torch.randint(0, c, (e, t), generator=g)


def _learners():
    """Small instances of every learner (name, learner, θ)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for name, lrn in [("sgd", OnlineSGD(None, 0.1, "sgd")), ("adam", OnlineSGD(None, 0.01, "adam")),
                      ("sgd2", OnlineSGD(7, 0.1, "sgd")), ("adam2", OnlineSGD(7, 0.01, "adam")),
                      ("hebbian", HebbianLearner(max_in_dim=8, max_classes=4, rate_init=-1.0)),
                      ("metarnn", MetaRNN(hidden=6, max_in_dim=8, max_classes=4)),
                      ("vsml", VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(hidden=4, msg=2))))]:
        th = lrn.init_theta(g, dtype=DT)
        if th.numel():
            th = th + 0.3 * torch.randn(th.shape, generator=g, dtype=DT)
        out.append((name, lrn, th))
    return out


LEARNERS = _learners()
IDS = [n for n, _, _ in LEARNERS]


@pytest.mark.parametrize("name,lrn,theta", LEARNERS, ids=IDS)
def test_interface_and_shapes(name, lrn, theta):
    assert isinstance(lrn, Learner)
    x, y = _data()
    out = lrn.unroll(theta, x, y, 3, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (3, 10, 3) and out.loss.shape == (3, 10) and out.correct.shape == (3, 10)
    assert torch.isfinite(out.loss).all() and out.logits.abs().max() <= 100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.transpose(1, 2), y, reduction="none"))
    # continuing from the carried state == one long unroll
    a = lrn.unroll(theta, x[:, :4], y[:, :4], 3, generator=torch.Generator().manual_seed(0))
    b = lrn.unroll(theta, x[:, 4:], y[:, 4:], state=a.state)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), out.logits)
    assert is_meta_trainable(lrn) == (name not in ("sgd", "adam", "sgd2", "adam2"))


@pytest.mark.parametrize("name,lrn,theta", LEARNERS, ids=IDS)
def test_prediction_before_update(name, lrn, theta):
    """Changing y_k leaves ŷ_0..ŷ_k unchanged and changes later predictions."""
    x, y = _data()
    k = 4
    y2 = y.clone()
    y2[:, k] = (y[:, k] + 1) % 3
    o1 = lrn.unroll(theta, x, y, 3, generator=torch.Generator().manual_seed(1))
    o2 = lrn.unroll(theta, x, y2, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(o1.logits[:, :k + 1], o2.logits[:, :k + 1], rtol=0, atol=0)
    assert not torch.allclose(o1.logits[:, k + 1:], o2.logits[:, k + 1:])


@pytest.mark.parametrize("name,lrn,theta", LEARNERS, ids=IDS)
def test_vectorised_episodes_equal_separate_runs(name, lrn, theta):
    x, y = _data(e=3)
    state = lrn.init_state(3, 5, 3, torch.Generator().manual_seed(2), dtype=DT)
    from vsml.learners.base import state_index
    out = lrn.unroll(theta, x, y, 3, state=state)
    for i in range(3):
        oi = lrn.unroll(theta, x[i:i + 1], y[i:i + 1], 3, state=state_index(state, slice(i, i + 1)))
        torch.testing.assert_close(oi.logits, out.logits[i:i + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,lrn,theta", [c for c in LEARNERS if c[0] in ("hebbian", "metarnn", "vsml")],
                         ids=["hebbian", "metarnn", "vsml"])
def test_per_episode_theta_equals_shared(name, lrn, theta):
    x, y = _data(e=3)
    state = lrn.init_state(3, 5, 3, torch.Generator().manual_seed(3), dtype=DT)
    shared = lrn.unroll(theta, x, y, 3, state=state)
    per = lrn.unroll(theta.expand(3, *theta.shape).clone(), x, y, 3, state=state)
    torch.testing.assert_close(per.logits, shared.logits, rtol=1e-10, atol=1e-12)
    # and different rows give the results of separate shared-θ runs
    g = torch.Generator().manual_seed(4)
    thetas = theta + 0.2 * torch.randn((3, *theta.shape), generator=g, dtype=DT)
    per = lrn.unroll(thetas, x, y, 3, state=state)
    from vsml.learners.base import state_index
    for i in range(3):
        oi = lrn.unroll(thetas[i], x[i:i + 1], y[i:i + 1], 3, state=state_index(state, slice(i, i + 1)))
        torch.testing.assert_close(oi.logits, per.logits[i:i + 1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        lrn.unroll(thetas[:2], x, y, 3, state=state)


@pytest.mark.parametrize("name", ["hebbian", "metarnn"])
def test_gradients_flow_and_es_runs(name):
    lrn, theta = {n: (l, t) for n, l, t in LEARNERS}[name]
    x, y = _data(e=2, t=8)
    g, m = bptt_gradient(lrn, theta, x, y, 3, BPTTConfig(truncation=3, checkpoint_chunk=2, clip_grad_norm=0),
                         torch.Generator().manual_seed(0))
    assert g.shape == theta.shape and torch.isfinite(g).all() and m["grad_norm"] > 0
    # gradients reach every parameter group that the task uses
    parts = lrn.param_shapes()
    off = 0
    for pname, shape in parts:
        size = math.prod(shape)
        assert g[off:off + size].abs().sum() > 0, f"no gradient reaches {pname}"
        off += size
    # exact against autograd of the full unroll
    g_full, _ = bptt_gradient(lrn, theta, x, y, 3, BPTTConfig(truncation=0, clip_grad_norm=0),
                              torch.Generator().manual_seed(0))
    th = theta.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(lrn.unroll(th, x, y, 3).loss.mean(), th)
    torch.testing.assert_close(g_full, want)
    # the ES estimator runs the population in one call with per-episode θ
    est = ESEstimator(lrn, ESConfig(pairs=2, sigma=0.05))
    ge, me = est.estimate(theta, x, y, 3, step=0)
    assert ge.shape == theta.shape and me["nonfinite"] == 0


# --------------------------------------------------------------------------------------------
# OnlineSGD specifics


@pytest.mark.parametrize("hidden", [None, 6])
def test_online_sgd_manual_gradients_match_autograd(hidden):
    lrn = OnlineSGD(hidden, lr=0.1, tanh_bound=2.0)          # small bound: the tanh term matters
    x, y = _data(e=2, t=1, d=4, c=3)
    st = lrn.init_state(2, 4, 3, dtype=DT)
    params = [p.clone().requires_grad_(True) for p in st.params]
    lg, h = lrn.forward(params, x[:, 0])
    loss = F.cross_entropy(lg, y[:, 0], reduction="sum")     # episodes are independent
    want = torch.autograd.grad(loss, params)
    got = lrn.grads([p.detach() for p in params], x[:, 0], lg.detach(), None if h is None else h.detach(), y[:, 0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # one SGD step as the unroll takes it
    out = lrn.unroll(torch.zeros(0), x, y, 3)
    for p, p0, gw in zip(out.state.params, st.params, want):
        torch.testing.assert_close(p, p0 - 0.1 * gw)


def test_online_adam_matches_torch_adam():
    lrn = OnlineSGD(5, lr=0.01, optimizer="adam")
    x, y = _data(e=1, t=6, d=4, c=3)
    st = lrn.init_state(1, 4, 3, dtype=DT)
    params = [p[0].clone().requires_grad_(True) for p in st.params]
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    ref_logits = []
    for t in range(6):
        h = torch.tanh(x[0, t] @ params[0] + params[1])
        lg = 100 * torch.tanh((h @ params[2] + params[3]) / 100)
        ref_logits.append(lg.detach())
        opt.zero_grad()
        F.cross_entropy(lg[None], y[:, t]).backward()
        opt.step()
    out = lrn.unroll(torch.zeros(0), x, y, 3, state=st)
    torch.testing.assert_close(out.logits[0], torch.stack(ref_logits))
    for p, q in zip(out.state.params, params):
        torch.testing.assert_close(p[0], q.detach())


@pytest.mark.parametrize("hidden,opt,lr", [(None, "sgd", 0.1), (16, "adam", 0.01)])
def test_online_sgd_learns_linearly_separable_stream(hidden, opt, lr):
    g = torch.Generator().manual_seed(0)
    e, t, d = 8, 400, 6
    w = torch.randn(d, generator=g)
    x = torch.randn(e, t, d, generator=g)
    y = (x @ w > 0).long()
    out = OnlineSGD(hidden, lr=lr, optimizer=opt).unroll(torch.zeros(0), x, y, 2)
    assert float(out.correct[:, t // 2:].float().mean()) > 0.85
    assert float(out.loss[:, t // 2:].mean()) < float(out.loss[:, :20].mean())


def test_online_sgd_same_init_every_episode_and_config_errors():
    st = OnlineSGD(4).init_state(3, 5, 2)
    assert isinstance(st, OnlineSGDState)
    for p in st.params:
        assert torch.equal(p[0], p[1]) and torch.equal(p[0], p[2])
    assert torch.equal(st.params[0], OnlineSGD(4).init_state(3, 5, 2).params[0])   # fixed seed
    st2 = OnlineSGD(4, seed=None).init_state(2, 5, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(st2.params[0][0], st2.params[0][1])
    for bad in [dict(hidden=0), dict(lr=0.0), dict(optimizer="rmsprop"), dict(tanh_bound=0.0)]:
        with pytest.raises(ValueError):
            OnlineSGD(**bad)
    with pytest.raises(ValueError, match="empty"):
        OnlineSGD().unroll(torch.zeros(3), *_data(), num_classes=3)


# --------------------------------------------------------------------------------------------
# Hebbian and Meta-RNN against naive, fully padded implementations


def _naive_hebbian(lrn: HebbianLearner, theta, x, y, c):
    """Per-episode loop on the full padded x_aug [max_in + 2 max_c] and all max_c outputs, padded
    classes masked with −inf (what the reduced-space implementation must equal)."""
    mi, mc = lrn.max_in_dim, lrn.max_classes
    i_dim = mi + 2 * mc
    off = 0
    p = {}
    for name, shape in lrn.param_shapes():
        p[name] = theta[off:off + math.prod(shape)].reshape(shape)
        off += math.prod(shape)
    eta = torch.sigmoid(p["rho"][0])
    mask = torch.full((mc,), -math.inf, dtype=theta.dtype)
    mask[:c] = 0
    logits = []
    for e in range(x.shape[0]):
        fw = torch.zeros(i_dim, mc, dtype=theta.dtype)
        out_e = []
        for t in range(x.shape[1]):
            xa = torch.zeros(i_dim, dtype=theta.dtype)
            xa[:x.shape[2]] = x[e, t]
            z = xa @ (p["W"] + p["C"] * fw) + p["b"]
            lg = 100 * torch.tanh(z / 100) + mask
            out_e.append(lg[:c])
            oh = torch.zeros(mc, dtype=theta.dtype)
            oh[y[e, t]] = 1
            err = torch.softmax(lg, 0) - oh
            err[c:] = 0
            xa[mi:mi + mc] = err
            xa[mi + mc:] = oh
            s = torch.softmax(xa @ (p["W"] + p["C"] * fw) + p["b"] + mask, 0)
            fw = fw + eta * s[None, :] * (xa[:, None] - s[None, :] * fw)
        logits.append(torch.stack(out_e))
    return torch.stack(logits)


def test_hebbian_matches_naive_padded_loop():
    lrn = HebbianLearner(max_in_dim=7, max_classes=4, rate_init=-1.0)
    g = torch.Generator().manual_seed(5)
    theta = lrn.init_theta(g, dtype=DT)
    theta = theta + 0.3 * torch.randn(theta.shape, generator=g, dtype=DT)
    x, y = _data(e=2, t=6, d=5, c=3, seed=5)
    out = lrn.unroll(theta, x, y, 3)
    torch.testing.assert_close(out.logits, _naive_hebbian(lrn, theta, x, y, 3))
    assert theta.numel() == 2 * (7 + 8) * 4 + 4 + 1
    assert float(theta[-1]) != -4.5 and float(HebbianLearner().init_theta()[-1]) == -4.5


def test_metarnn_matches_naive_padded_loop():
    lrn = MetaRNN(hidden=5, micro_ticks=2, max_in_dim=7, max_classes=4)
    g = torch.Generator().manual_seed(6)
    theta = lrn.init_theta(g, dtype=DT) + 0.2 * torch.randn(lrn.theta_size, generator=g, dtype=DT)
    x, y = _data(e=2, t=6, d=5, c=3, seed=6)
    out = lrn.unroll(theta, x, y, 3)
    hd, mi, mc = 5, 7, 4
    off, p = 0, {}
    for name, shape in lrn.param_shapes():
        p[name] = theta[off:off + math.prod(shape)].reshape(shape)
        off += math.prod(shape)
    w = torch.cat([p["W_x"], p["W_h"]], 1)                     # one affine map on [u, h] (haiku)
    for e in range(2):
        h = torch.zeros(hd, dtype=DT)
        cc = torch.zeros(hd, dtype=DT)
        err = torch.zeros(mc, dtype=DT)
        lab = torch.zeros(mc, dtype=DT)
        for t in range(6):
            u = torch.cat([F.pad(x[e, t], (0, mi - 5)), err, lab])
            for _ in range(2):
                i, gg, f, o = (w @ torch.cat([u, h]) + p["b"]).split(hd)
                cc = torch.sigmoid(f + 1) * cc + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(cc)
            lg = 100 * torch.tanh((p["W_out"] @ h + p["b_out"]) / 100)[:3]
            torch.testing.assert_close(out.logits[e, t], lg)
            lab = F.one_hot(y[e, t], mc).to(DT)
            err = F.pad(torch.softmax(lg, 0), (0, mc - 3)) - lab


def test_padding_limits_and_registry():
    with pytest.raises(ValueError, match="max_in_dim"):
        HebbianLearner(max_in_dim=4).init_state(1, 5, 2)
    with pytest.raises(ValueError, match="max_classes"):
        MetaRNN(max_classes=3).unroll(MetaRNN(max_classes=3).init_theta(), *_data(c=3), num_classes=4)
    for bad in [dict(hidden=0), dict(micro_ticks=0), dict(max_classes=1)]:
        with pytest.raises(ValueError):
            MetaRNN(**bad)
    assert set(names()) == {"vsml", "badger", "sgd", "adam", "sgd2", "adam2", "hebbian", "metarnn"}
    assert build("sgd").lr == 0.01 and build("adam").lr == 1e-3
    assert build("adam2").hidden == 160 and build("adam2").optimizer == "adam"
    assert build("sgd2", lr=0.5).lr == 0.5
    assert build("metarnn").theta_size == 4 * 128 * (784 + 124 + 128) + 4 * 128 + 62 * 128 + 62
    cfg = VSMLConfig(cell=SubLSTMConfig(layer_norm=True))
    v = build("vsml", cfg=cfg)
    assert isinstance(v, VSMLNetwork) and v.cfg is cfg
    assert build("vsml", micro_ticks=3).cfg.micro_ticks == 3
    with pytest.raises(ValueError, match="valid names"):
        build("lstm")
