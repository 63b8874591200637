"""Learning-algorithm cloning: the SGD teacher, the cloning loss and its gradient steps.

Run: python -m pytest tests/test_cloning.py -q
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vsml import ConfigError, SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.estimators.cloning import CloneConfig, CloneEstimator, sgd_teacher


def test_teacher_is_online_sgd_on_a_linear_model():
    """ŷ = mean_a w x with w -= α x e equals SGD on W = w/A with lr α/A, predicting before updating."""
    g = torch.Generator().manual_seed(0)
    e, t, d, c, alpha = 2, 7, 5, 3, 0.7
    x, y = torch.randn(e, t, d, generator=g, dtype=torch.float64), torch.randint(0, c, (e, t), generator=g)
    w0 = torch.randn(e, d, c, generator=g, dtype=torch.float64)
    _, errs, logits = sgd_teacher(x, y, c, w0, alpha)
    for i in range(e):
        W = (w0[i] / d).clone().requires_grad_(True)
        for s in range(t):
            z = x[i, s] @ W
            torch.testing.assert_close(logits[i, s], z.detach())
            loss = torch.nn.functional.cross_entropy(z[None], y[i, s:s + 1])
            (gW,) = torch.autograd.grad(loss, W)
            torch.testing.assert_close(errs[i, s], torch.softmax(z, -1).detach() - torch.nn.functional.one_hot(y[i, s], c))
            W = (W - alpha / d * gW).detach().requires_grad_(True)


def test_cloning_steps_reduce_the_loss():
    torch.manual_seed(0)
    net = VSMLNetwork(VSMLConfig())
    est = CloneEstimator(net, CloneConfig(steps=1, length=6, episodes=4, lr=1e-2), seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, 12, generator=g), torch.randint(0, 3, (4, 6), generator=g)
    theta = torch.nn.Parameter(net.init_theta(g))
    opt = torch.optim.Adam([theta], lr=2e-2)

    def loss_now():
        return est.loss(theta.detach(), x, y, 3, torch.Generator().manual_seed(5)).item()

    before = loss_now()
    for step in range(40):
        grad, m = est.estimate(theta.detach(), x, y, 3, step)
        assert torch.isfinite(grad).all() and m["grad_norm"] > 0
        theta.grad = grad
        opt.step()
    assert loss_now() < 0.97 * before, (loss_now(), before)


@pytest.mark.parametrize("cfg", [VSMLConfig(hidden_sizes=(4,)), VSMLConfig(cell=SubLSTMConfig(layer_norm=True)),
                                 VSMLConfig(backward_pass=True)])
def test_uncloneable_configs_are_rejected(cfg):
    with pytest.raises(ConfigError, match="cloning supports one dense layer"):
        CloneEstimator(VSMLNetwork(cfg), CloneConfig(steps=1))


def test_bad_clone_config():
    with pytest.raises(ConfigError):
        CloneConfig(alpha=0)
    with pytest.raises(ConfigError):
        CloneConfig(random_frac=2)


# -- long-horizon cloning (issue 15) ---------------------------------------------------------------


def _long_setup(e=3, t=12, d=5, c=3, **kw):
    torch.manual_seed(0)
    net = VSMLNetwork(VSMLConfig())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(e, t, d, generator=g), torch.randint(0, c, (e, t), generator=g)
    theta = net.init_theta(g)
    cfg = CloneConfig(steps=1, length=t, episodes=e, random_frac=0.0, **kw)
    return net, cfg, x, y, theta, c


def test_long_cloning_defaults_keep_the_old_loss():
    assert not CloneConfig().long and CloneConfig().own_error_prob(10) == 0.0
    # one truncation over the whole episode, teacher forcing, plain SGD == the old loss
    net, cfg, x, y, theta, c = _long_setup(truncation=12)
    assert cfg.long
    est = CloneEstimator(net, cfg, seed=0)
    est._start_block(x, y, c, 0, theta.dtype)
    new, _ = est.loss_long(theta, 0)
    old_est = CloneEstimator(net, CloneConfig(steps=1, length=12, episodes=3, random_frac=0.0), seed=0)
    xx, yy, gen = old_est.prepare(x, y, 0)
    old = old_est.loss(theta, xx, yy, c, gen)
    torch.testing.assert_close(new, old)


def test_truncations_carry_the_state_exactly():
    """Cloning 12 ticks in truncations of 4 sees the same per-tick losses as one 12-tick unroll."""
    net, cfg, x, y, theta, c = _long_setup(truncation=12, own_error_max=0.5)
    full = CloneEstimator(net, cfg, seed=0)
    full._start_block(x, y, c, 0, theta.dtype)
    lf, _ = full.loss_long(theta, 0)
    net, cfg4, *_ = _long_setup(truncation=4, own_error_max=0.5)
    part = CloneEstimator(net, cfg4, seed=0)
    part._start_block(x, y, c, 0, theta.dtype)
    parts = [part.loss_long(theta, 0)[0] for _ in range(3)]
    torch.testing.assert_close(torch.stack(parts).mean(), lf)
    for k in ("h", "c", "w", "e"):
        torch.testing.assert_close(part._carry[k], full._carry[k])
    # estimate() starts a new block once the episode is used up
    grad, m = part.estimate(theta, x, y, c, step=3)
    assert m["clone_pos"] == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("logit_scale", [1.0, 3.0])
def test_own_errors_are_the_meta_test_errors(logit_scale):
    """With own_error_max 1 the student is fed exactly its meta-test errors (VSMLNetwork.unroll, with the
    read-out's logit scale κ), and the teacher's weights integrate them: w_T = w_0 − α Σ_t x_t e_t."""
    net, cfg, x, y, theta, c = _long_setup(truncation=12, own_error_max=1.0)
    net = VSMLNetwork(VSMLConfig(logit_scale=logit_scale))
    est = CloneEstimator(net, cfg, seed=0)
    est._start_block(x, y, c, 0, theta.dtype)
    w0 = est._carry["w"].clone()
    h0, c0 = est._carry["h"].clone(), est._carry["c"].clone()
    est.loss_long(theta, 0)
    from vsml.engine.state import VSMLState  # noqa: F401  (the unroll's state type)
    st = net.init_state(3, 5, c, torch.Generator().manual_seed(0))
    st.h[0].copy_(h0)
    st.c[0].copy_(c0)
    out = net.unroll(theta, x, y, state=st)
    e = torch.softmax(out.logits, -1) - torch.nn.functional.one_hot(y, c)
    torch.testing.assert_close(est._carry["e"], e[:, -1], atol=1e-5, rtol=1e-4)
    w = w0 - cfg.alpha * torch.einsum("etd,etc->edc", x, e)
    torch.testing.assert_close(est._carry["w"], w, atol=1e-4, rtol=1e-4)


def test_teacher_can_integrate_its_own_errors():
    """teacher_errors "own": the student is still fed its own (meta-test) errors, but the target is the
    trajectory of online SGD on the same stream (sgd_teacher from the same w_0), whatever the student does."""
    net, cfg, x, y, theta, c = _long_setup(truncation=12, own_error_max=1.0, teacher_errors="own")
    net = VSMLNetwork(VSMLConfig(logit_scale=2.0))
    est = CloneEstimator(net, cfg, seed=0)
    est._start_block(x, y, c, 0, theta.dtype)
    w0 = est._carry["w"].clone()
    est.loss_long(theta, 0)
    ws, es, _ = sgd_teacher(x, y, c, w0, cfg.alpha, logit_scale=2.0)
    w_end = ws[:, -1] - cfg.alpha * x[:, -1, :, None] * es[:, -1, None, :]     # after the last example [E, D, C]
    torch.testing.assert_close(est._carry["w"], w_end, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(est._carry["e"], es[:, -1], atol=1e-3)           # the fed error is the student's
    fed = CloneEstimator(net, replace(cfg, teacher_errors="fed"), seed=0)
    fed._start_block(x, y, c, 0, theta.dtype)
    fed.loss_long(theta, 0)
    torch.testing.assert_close(fed._carry["e"], est._carry["e"])
    assert not torch.allclose(fed._carry["w"], est._carry["w"], atol=1e-3)
    with pytest.raises(ConfigError):
        CloneConfig(teacher_errors="teacher")


def test_bounded_teachers():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 50, 6, generator=g), torch.randint(0, 3, (2, 50), generator=g)
    w0 = torch.randn(2, 6, 3, generator=g)
    ws, _, _ = sgd_teacher(x, y, 3, w0, 1.0, clip=0.5)
    assert ws[:, 1:].abs().max() <= 0.5 + 1e-6      # w0 (the random initial state) is not clipped
    big, _, _ = sgd_teacher(x, y, 3, w0, 1.0)
    small, _, _ = sgd_teacher(x, y, 3, w0, 1.0, decay=0.1)
    assert small[:, -1].norm() < big[:, -1].norm()
    with pytest.raises(ConfigError):
        CloneConfig(length=10, truncation=11)
    with pytest.raises(ConfigError):
        CloneConfig(own_error_max=1.5)
    assert CloneConfig(own_error_max=0.8, own_error_ramp=10).own_error_prob(5) == pytest.approx(0.4)


def test_ce_weight_adds_the_meta_test_loss():
    """clone.ce_weight adds the student's online cross-entropy; with own errors it is the meta-test loss."""
    losses = []
    for w in (0.0, 1.0):
        net, cfg, x, y, theta, c = _long_setup(truncation=12, own_error_max=1.0, ce_weight=w)
        est = CloneEstimator(net, cfg, seed=0)
        est._start_block(x, y, c, 0, theta.dtype)
        h0, c0 = est._carry["h"].clone(), est._carry["c"].clone()
        losses.append(est.loss_long(theta, 0)[0])
    st = net.init_state(3, 5, c, torch.Generator().manual_seed(0))
    st.h[0].copy_(h0)
    st.c[0].copy_(c0)
    out = net.unroll(theta, x, y, state=st)
    torch.testing.assert_close(losses[1] - losses[0], out.loss.mean(), atol=1e-5, rtol=1e-4)


def test_teachers_use_the_students_logit_scale():
    """sgd_teacher(logit_scale=κ): logits κ·mean_a w·x, errors from those; κ = 1 is the old teacher."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 20, 6, generator=g), torch.randint(0, 3, (2, 20), generator=g)
    w0 = torch.randn(2, 6, 3, generator=g)
    ws, es, zs = sgd_teacher(x, y, 3, w0, 1.0, logit_scale=2.0)
    torch.testing.assert_close(zs, 2.0 * torch.einsum("etdc,etd->etc", ws, x) / 6)
    torch.testing.assert_close(es, torch.softmax(zs, -1) - torch.nn.functional.one_hot(y, 3).float())
    w1, e1, z1 = sgd_teacher(x, y, 3, w0, 1.0)
    assert torch.equal(z1[:, 0] * 2.0, zs[:, 0]) and not torch.allclose(ws[:, -1], w1[:, -1])
