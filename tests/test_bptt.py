"""Backprop estimator tests: exactness against autograd of the full unroll, activation
checkpointing, truncation, clipping, non-finite losses, and the generic state helpers.

Run: python -m pytest tests/test_bptt.py -q
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

from vsml import SubLSTMConfig, VSMLConfig, VSMLNetwork, VSMLState
from vsml.learners.baselines import OnlineSGD
from vsml.estimators.bptt import BPTTConfig, bptt_gradient
from vsml.estimators.es import ESConfig
from vsml.estimators.base import BatchEstimator as Estimator
from vsml.estimators.core import BPTTEstimator, ESEstimator
from vsml.learners.base import (
    Learner,
    is_meta_trainable,
    state_cat,
    state_detach,
    state_index,
    state_from_leaves,
    state_repeat_interleave,
    tree_flatten,
)

DT = torch.float64




def _net(hidden=(), ln=False):
    return VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(hidden=4, msg=3, layer_norm=ln), hidden_sizes=hidden))


def _data(e=2, t=12, d=3, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, t, d, generator=g, dtype=DT), torch.randint(0, c, (e, t), generator=g)


def _theta(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    th = net.init_theta(g, dtype=DT)
    return th + 0.3 * torch.randn(th.shape, generator=g, dtype=DT)


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def _full_autograd(net, theta, x, y, c, seed):
    th = theta.clone().requires_grad_(True)
    out = net.unroll(th, x, y, c, generator=torch.Generator().manual_seed(seed))
    (g,) = torch.autograd.grad(out.loss.mean(), th)
    return g, float(out.loss.mean().detach())


def test_config_validation():
    for bad in [dict(truncation=-1), dict(checkpoint_chunk=-2), dict(clip_grad_norm=-1.0),
                dict(clip_grad_norm=float("inf")), dict(truncation=2.5)]:
        with pytest.raises(ValueError):
            BPTTConfig(**bad)


@pytest.mark.parametrize("hidden,ln", [((), False), ((3,), True)])
def test_full_truncation_equals_autograd(hidden, ln):
    net = _net(hidden, ln)
    theta = _theta(net)
    x, y = _data()
    want, loss = _full_autograd(net, theta, x, y, 2, seed=5)
    for trunc in (0, 12, 100):
        g, m = bptt_gradient(net, theta, x, y, 2, BPTTConfig(truncation=trunc, clip_grad_norm=0),
                             torch.Generator().manual_seed(5))
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
        assert m["loss"] == pytest.approx(loss)
        assert m["truncations"] == 1 and m["grad_norm"] == pytest.approx(float(want.norm()))
        assert 0 <= m["accuracy"] <= 1 and m["nonfinite"] == 0 and m["clipped"] == 0


@pytest.mark.parametrize("trunc,chunk", [(0, 1), (0, 5), (5, 2), (4, 3), (12, 12)])
def test_checkpointing_does_not_change_the_gradient(trunc, chunk):
    net = _net((3,))
    theta = _theta(net, 1)
    x, y = _data(seed=1)
    cfg = BPTTConfig(truncation=trunc, clip_grad_norm=0)
    g0, m0 = bptt_gradient(net, theta, x, y, 2, cfg, torch.Generator().manual_seed(2))
    cfg_ck = BPTTConfig(truncation=trunc, checkpoint_chunk=chunk, clip_grad_norm=0)
    g1, m1 = bptt_gradient(net, theta, x, y, 2, cfg_ck, torch.Generator().manual_seed(2))
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-9)
    assert m1["loss"] == pytest.approx(m0["loss"]) and m1["accuracy"] == m0["accuracy"]


def test_truncation_differs_but_correlates():
    net = _net()
    theta = _theta(net, 2)
    x, y = _data(e=4, t=24, seed=2)
    full, _ = bptt_gradient(net, theta, x, y, 2, BPTTConfig(truncation=0, clip_grad_norm=0),
                            torch.Generator().manual_seed(3))
    tr, m = bptt_gradient(net, theta, x, y, 2, BPTTConfig(truncation=8, clip_grad_norm=0),
                          torch.Generator().manual_seed(3))
    assert m["truncations"] == 3
    assert not torch.allclose(tr, full, rtol=1e-3, atol=1e-6)
    assert _cos(tr, full) > 0.5
    # the loss itself does not depend on truncation (same forward computation)
    _, m_full = bptt_gradient(net, theta, x, y, 2, BPTTConfig(truncation=0), torch.Generator().manual_seed(3))
    assert m["loss"] == pytest.approx(m_full["loss"])


def test_clipping_and_unclipped_norm():
    net = _net()
    theta = _theta(net, 3)
    x, y = _data(seed=3)
    g, _ = bptt_gradient(net, theta, x, y, 2, BPTTConfig(truncation=0, clip_grad_norm=0),
                         torch.Generator().manual_seed(0))
    norm = float(g.norm())
    gc, mc = bptt_gradient(net, theta, x, y, 2, BPTTConfig(truncation=0, clip_grad_norm=norm / 4),
                           torch.Generator().manual_seed(0))
    assert mc["clipped"] == 1 and mc["grad_norm"] == pytest.approx(norm)
    assert float(gc.norm()) == pytest.approx(norm / 4, rel=1e-6)
    assert _cos(gc, g) == pytest.approx(1.0)


class _NaNLearner:
    """Wraps a learner and poisons its loss after tick 3."""

    def __init__(self, net):
        self.net = net

    def init_theta(self, *a, **k):
        return self.net.init_theta(*a, **k)

    def init_state(self, *a, **k):
        return self.net.init_state(*a, **k)

    def unroll(self, theta, x, y, num_classes=None, state=None, generator=None):
        out = self.net.unroll(theta, x, y, num_classes, state, generator)
        out.loss = out.loss * torch.where(torch.arange(x.shape[1]) < 3, 1.0, float("nan")).to(out.loss)
        return out


def test_nonfinite_loss_gives_zero_gradient():
    net = _net()
    theta = _theta(net)
    x, y = _data()
    g, m = bptt_gradient(_NaNLearner(net), theta, x, y, 2, BPTTConfig(truncation=4),
                         torch.Generator().manual_seed(0))
    assert torch.equal(g, torch.zeros_like(theta)) and m["nonfinite"] == 1


def test_bptt_estimator_reproducible_per_step():
    net = _net()
    theta = _theta(net)
    x, y = _data()
    est = BPTTEstimator(net, BPTTConfig(truncation=6, checkpoint_chunk=3), seed=4)
    assert isinstance(est, Estimator) and isinstance(ESEstimator(net, ESConfig(pairs=2)), Estimator)
    g1, m1 = est.estimate(theta, x, y, 2, step=7)
    g2, _ = est.estimate(theta, x, y, 2, step=7)
    g3, _ = est.estimate(theta, x, y, 2, step=8)
    torch.testing.assert_close(g1, g2)
    assert not torch.allclose(g1, g3)                                         # new initial states
    assert all(isinstance(v, float) for v in m1.values())
    with pytest.raises(ValueError, match="meta-trainable"):
        BPTTEstimator(OnlineSGD(), BPTTConfig())


def test_bptt_descends():
    """A few clipped-BPTT + Adam steps on fixed data and states reduce the loss."""
    from vsml.estimators.core import make_optimizer
    net = _net()
    x, y = _data(e=4, t=16, seed=9)
    theta = torch.nn.Parameter(_theta(net, 9))
    opt = make_optimizer(theta, lr=1e-2)
    cfg = BPTTConfig(truncation=0, clip_grad_norm=25.0)
    losses = []
    for _ in range(5):
        g, m = bptt_gradient(net, theta.detach(), x, y, 2, cfg, torch.Generator().manual_seed(0))
        losses.append(m["loss"])
        theta.grad = g
        opt.step()
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------
# state helpers


@dataclass
class _DC:
    a: torch.Tensor
    rest: dict


class _NT(NamedTuple):
    p: torch.Tensor
    q: list


def test_state_helpers_are_generic():
    t = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    s = (_DC(t * 1, {"k": t * 2, "n": 5}), _NT(t * 3, [t * 4, None]))
    leaves, rebuild = tree_flatten(s)
    assert len(leaves) == 4
    s2 = rebuild([x + 1 for x in leaves])
    assert isinstance(s2[0], _DC) and isinstance(s2[1], _NT) and s2[0].rest["n"] == 5 and s2[1].q[1] is None
    torch.testing.assert_close(s2[1].q[0], t * 4 + 1)
    d = state_detach(s)
    assert all(not x.requires_grad for x in tree_flatten(d)[0])
    assert all(x.requires_grad for x in tree_flatten(s)[0])                    # original untouched
    r = state_repeat_interleave(s, 2)
    assert r[1].p.shape == (6, 2) and torch.equal(r[1].p[0], r[1].p[1])
    i = state_index(r, slice(2, 4))
    torch.testing.assert_close(i[0].a, torch.stack([t[1], t[1]]))
    c = state_cat([s, s])
    assert c[0].rest["k"].shape == (6, 2)
    # VSMLState goes through its own methods and through the generic path identically
    net = _net((2,))
    st = net.init_state(2, 3, 2, torch.Generator().manual_seed(0))
    assert isinstance(state_repeat_interleave(st, 2), VSMLState)
    lv, rb = tree_flatten(st)
    assert len(lv) == 3 * 2 and isinstance(rb(lv), VSMLState)
    torch.testing.assert_close(state_index(state_repeat_interleave(st, 2), slice(0, 1)).c[0], st.c[0][:1])
    # a saved state comes back into its template's structure; a misfit is one clear error
    back = state_from_leaves(st, [x + 1 for x in lv])
    assert isinstance(back, VSMLState) and torch.equal(back.c[0], st.c[0] + 1)
    with pytest.raises(ValueError, match="the carried state does not fit"):
        state_from_leaves(st, lv[:-1], "the carried state")
    with pytest.raises(ValueError, match="does not fit"):
        state_from_leaves(st, [x[:1] for x in lv])


def test_learner_protocol():
    net = _net()
    assert isinstance(net, Learner) and is_meta_trainable(net)
    assert isinstance(OnlineSGD(), Learner) and not is_meta_trainable(OnlineSGD())
