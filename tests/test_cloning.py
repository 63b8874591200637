"""Learning-algorithm cloning: the SGD teacher, the cloning loss and its gradient steps.

Run: python -m pytest tests/test_cloning.py -q
"""

from __future__ import annotations

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
