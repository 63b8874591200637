"""Tests of the bootstrapped meta-gradient estimator (vsml/estimators/bmg.py; badger-bmg-es.md §C).

The central check (§C.1 "Special case", §F): with L = 1, grounding "gradient" (s̃ = s_K − α∇_s f(s_K))
and L2 matching, the BMG gradient equals α times the K-step meta-gradient of the probe loss f
through the learner state, ∇_θ f(s_K(θ); θ̄) (θ's direct use in the probe prediction held fixed):

* on a toy learner with explicit weights (state W, prediction x·W uses no θ) this is the plain
  K-step meta-gradient ∇_θ f(W_K(θ)), also checked by central finite differences;
* on VSML (prediction runs θ) against autograd of f(s_K(θ); stop_grad θ).

Run: python -m pytest tests/test_bmg.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import train as train_cli
from vsml.estimators.bmg import BMGConfig, BMGEstimator, bmg_gradient, match_l2, probe_logits
from vsml.training.checkpoint import load_checkpoint
from vsml.engine.config import ConfigError, SubLSTMConfig, VSMLConfig
from vsml.learners.base import EpisodeOutput
from vsml.engine.network import VSMLNetwork

# --------------------------------------------------------------------------------------------
# a learner with explicit weights: online softmax regression with a meta-learned preconditioner


@dataclass
class _LinState:
    w: torch.Tensor          # [E, D, C]


class _PreconditionedSGD:
    """State W [E, D, C]; ŷ_t = x_t W; W ← W − exp(θ) ⊙ (x_t ⊗ (softmax(ŷ_t) − onehot(y_t))).
    θ [D, C] is a per-weight log learning rate; the prediction does not use θ."""

    meta_trainable = True

    def __init__(self, d: int, c: int):
        self.d, self.c = d, c

    def init_theta(self, generator=None, dtype=torch.float64, device=None):
        return torch.full((self.d, self.c), -1.0, dtype=dtype, device=device) + 0.3 * torch.randn(
            self.d, self.c, generator=generator, dtype=dtype)

    def init_state(self, num_episodes, in_dim, num_classes, generator=None, dtype=torch.float64, device=None):
        return _LinState(0.1 * torch.randn(num_episodes, in_dim, num_classes, generator=generator, dtype=dtype))

    def unroll(self, theta, x, y, num_classes=None, state=None, generator=None):
        e, t_len, d = x.shape
        c = num_classes or self.c
        if state is None:
            state = self.init_state(e, d, c, generator, x.dtype)
        w = state.w
        logits = []
        for t in range(t_len):
            lg = torch.einsum("ed,edc->ec", x[:, t], w)                               # [E, C]
            logits.append(lg)
            err = torch.softmax(lg, -1) - F.one_hot(y[:, t], c).to(lg.dtype)
            w = w - theta.exp() * torch.einsum("ed,ec->edc", x[:, t], err)
        lg_t = torch.stack(logits, 1) if logits else x.new_zeros(e, 0, c)             # [E, T, C]
        loss = F.cross_entropy(lg_t.reshape(-1, c), y.reshape(-1), reduction="none").reshape(e, t_len)
        return EpisodeOutput(lg_t, loss, lg_t.argmax(-1) == y, _LinState(w))


def _data(e, t, d, c, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(e, t, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (e, t), generator=g)
    return x, y


def _probe_loss(learner, theta_state, theta_readout, x, y, c, k, lb, q, state0):
    """f(s_K(θ_state); θ_readout): mean over episodes and probes of the probe CE at s_K."""
    s_k = learner.unroll(theta_state, x[:, :k], y[:, :k], c, state=state0).state
    lg = probe_logits(learner, theta_readout, s_k, x[:, k + lb:k + lb + q], c)
    return F.cross_entropy(lg.reshape(-1, c), y[:, k + lb:k + lb + q].reshape(-1))


def _cos(a, b):
    return float(F.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


def test_l1_l2_gradient_grounding_is_alpha_times_k_step_metagradient_explicit_weights():
    d, c, e, k, q, alpha = 5, 3, 4, 6, 5, 0.3
    learner = _PreconditionedSGD(d, c)
    theta = learner.init_theta(torch.Generator().manual_seed(1))
    x, y = _data(e, k + 1 + q, d, c, seed=2)
    s0 = learner.init_state(e, d, c, torch.Generator().manual_seed(3))
    cfg = BMGConfig(k_steps=k, l_steps=1, matching="l2", grounding="gradient", probe=q, alpha=alpha,
                    clip_grad_norm=0.0)
    g_bmg, m = bmg_gradient(learner, theta, x, y, c, cfg, state=s0)
    th = theta.clone().requires_grad_(True)
    (g_meta,) = torch.autograd.grad(_probe_loss(learner, th, th, x, y, c, k, 1, q, s0), th)
    assert _cos(g_bmg, g_meta) > 1 - 1e-10
    torch.testing.assert_close(g_bmg, alpha * g_meta, rtol=1e-8, atol=1e-12)
    # finite differences of the K-step objective f(W_K(θ)) in random directions
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        v = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        h = 1e-5
        with torch.no_grad():
            fp = _probe_loss(learner, theta + h * v, theta + h * v, x, y, c, k, 1, q, s0)
            fm = _probe_loss(learner, theta - h * v, theta - h * v, x, y, c, k, 1, q, s0)
        fd = float((fp - fm) / (2 * h))
        assert abs(float((g_bmg / alpha * v).sum()) - fd) < 1e-6 * max(1.0, abs(fd))
    assert m["matching"] > 0 and m["probe_loss_k"] == pytest.approx(m["probe_loss_target"])   # L−1 = 0 steps


def _tiny_vsml(dtype=torch.float64):
    cfg = VSMLConfig(cell=SubLSTMConfig(hidden=4, msg=4))
    net = VSMLNetwork(cfg)
    theta = net.init_theta(torch.Generator().manual_seed(0), dtype=dtype)
    return net, theta


def test_l1_l2_gradient_grounding_reduces_to_state_path_metagradient_vsml():
    """VSML: BMG(L=1, l2, gradient) = α ∇_θ f(s_K(θ); θ̄); the full ∇_θ f(s_K(θ); θ) has an extra
    direct term (θ runs the probe prediction) and is a different direction."""
    net, theta = _tiny_vsml()
    d, c, e, k, q, alpha = 5, 3, 3, 5, 4, 0.5
    x, y = _data(e, k + 1 + q, d, c, seed=5)
    s0 = net.init_state(e, d, c, torch.Generator().manual_seed(6), dtype=theta.dtype)
    cfg = BMGConfig(k_steps=k, l_steps=1, matching="l2", grounding="gradient", probe=q, alpha=alpha,
                    clip_grad_norm=0.0)
    g_bmg, _ = bmg_gradient(net, theta, x, y, c, cfg, state=s0)
    th = theta.clone().requires_grad_(True)
    (g_state,) = torch.autograd.grad(_probe_loss(net, th, th.detach(), x, y, c, k, 1, q, s0), th)
    assert float(g_state.norm()) > 0
    assert _cos(g_bmg, g_state) > 1 - 1e-8
    torch.testing.assert_close(g_bmg, alpha * g_state, rtol=1e-6, atol=1e-10)
    th2 = theta.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(_probe_loss(net, th2, th2, x, y, c, k, 1, q, s0), th2)
    assert _cos(g_bmg, g_full) < 0.999          # the direct term is not negligible


def test_target_is_a_constant_matching_gradient_is_descent_for_fixed_target():
    """KL matching: ĝ is ∇_θ of KL(p_target ‖ p_K(θ)) with the target frozen (a small step along −ĝ
    lowers that KL), and the target receives no gradient (detaching it changes nothing)."""
    net, theta = _tiny_vsml()
    d, c, e, k, lb, q = 5, 3, 3, 4, 3, 4
    x, y = _data(e, k + lb + q, d, c, seed=7)
    s0 = net.init_state(e, d, c, torch.Generator().manual_seed(8), dtype=theta.dtype)
    cfg = BMGConfig(k_steps=k, l_steps=lb, matching="kl", grounding="data", probe=q, clip_grad_norm=0.0)
    g, m = bmg_gradient(net, theta, x, y, c, cfg, state=s0)
    with torch.no_grad():
        s_t = net.unroll(theta, x[:, :k + lb], y[:, :k + lb], c, state=s0).state
        p_t = torch.softmax(probe_logits(net, theta, s_t, x[:, k + lb:], c), -1)

    def kl_fixed(th):
        with torch.no_grad():
            s_k = net.unroll(th, x[:, :k], y[:, :k], c, state=s0).state
            lp = torch.log_softmax(probe_logits(net, th, s_k, x[:, k + lb:], c), -1)
        return float((p_t * (p_t.log() - lp)).sum(-1).mean())

    assert kl_fixed(theta) == pytest.approx(m["matching"], rel=1e-9)
    assert m["matching"] > 0
    v = g / g.norm()
    h = 1e-5
    fd = (kl_fixed(theta + h * v) - kl_fixed(theta - h * v)) / (2 * h)
    assert fd == pytest.approx(float(g.norm()), rel=1e-4)


def test_l2_matching_of_identical_states_is_zero_and_positive_otherwise():
    net, theta = _tiny_vsml()
    s = net.init_state(2, 4, 3, torch.Generator().manual_seed(0), dtype=theta.dtype)
    assert float(match_l2(s, s)) == 0.0
    s2 = s.map(lambda t: t + 1.0)
    n_elem = sum(t[0].numel() for t in [*s.h, *s.c, *s.bwd])
    assert float(match_l2(s2, s)) == pytest.approx(0.5 * n_elem)


@pytest.mark.parametrize("matching,grounding", [("kl", "data"), ("kl", "gradient"), ("l2", "data")])
def test_shapes_metrics_and_metarnn(matching, grounding):
    from vsml.learners.registry import build
    learner = build("metarnn", hidden=8, max_in_dim=6, max_classes=4)
    theta = learner.init_theta(torch.Generator().manual_seed(0))
    x, y = _data(3, 4 + 2 + 3 + 2, 6, 4, seed=1, dtype=torch.float32)       # 2 unused examples at the end
    est = BMGEstimator(learner, BMGConfig(k_steps=4, l_steps=2, probe=3, matching=matching, grounding=grounding))
    g1, m = est.estimate(theta, x, y, 4, step=3)
    g2, _ = est.estimate(theta, x, y, 4, step=3)
    assert g1.shape == theta.shape and torch.isfinite(g1).all() and float(g1.norm()) > 0
    assert torch.equal(g1, g2)                                                 # deterministic in (seed, step)
    for key in ("loss", "accuracy", "matching", "meta_loss", "probe_loss_k", "probe_acc_target", "grad_norm"):
        assert key in m and isinstance(m[key], float)
    assert m["matching"] >= 0 and m["nonfinite"] == 0.0


def test_task_weight_adds_the_online_ce_gradient():
    net, theta = _tiny_vsml()
    x, y = _data(2, 4 + 2 + 2, 5, 3, seed=9)
    s0 = net.init_state(2, 5, 3, torch.Generator().manual_seed(1), dtype=theta.dtype)
    base = {"k_steps": 4, "l_steps": 2, "probe": 2, "clip_grad_norm": 0.0}
    g0, _ = bmg_gradient(net, theta, x, y, 3, BMGConfig(**base), state=s0)
    g1, m = bmg_gradient(net, theta, x, y, 3, BMGConfig(**base, task_weight=0.5), state=s0)
    th = theta.clone().requires_grad_(True)
    ce = net.unroll(th, x[:, :4], y[:, :4], 3, state=s0).loss.mean()
    (g_ce,) = torch.autograd.grad(ce, th)
    torch.testing.assert_close(g1, g0 + 0.5 * g_ce, rtol=1e-7, atol=1e-10)
    assert m["meta_loss"] == pytest.approx(m["matching"] + 0.5 * m["loss"])


def test_clipping_and_errors():
    net, theta = _tiny_vsml()
    x, y = _data(2, 8, 5, 3, seed=2)
    g, m = bmg_gradient(net, theta, x, y, 3, BMGConfig(k_steps=3, l_steps=2, probe=3, clip_grad_norm=1e-6),
                        torch.Generator().manual_seed(0))
    assert m["clipped"] == 1.0 and float(g.norm()) == pytest.approx(1e-6, rel=1e-4)
    with pytest.raises(ValueError, match="K \\+ L \\+ Q"):
        bmg_gradient(net, theta, x, y, 3, BMGConfig(k_steps=4, l_steps=4, probe=3))
    with pytest.raises(ValueError, match="y has shape"):
        bmg_gradient(net, theta, x, y[:, :5], 3, BMGConfig(k_steps=2, l_steps=2, probe=2))
    with pytest.raises(TypeError, match="BMGConfig"):
        BMGEstimator(net, {"k_steps": 2})
    from vsml.learners.registry import build
    with pytest.raises(ValueError, match="not meta-trainable"):
        BMGEstimator(build("sgd"), BMGConfig())


@pytest.mark.parametrize("kw,msg", [
    ({"k_steps": 0}, "k_steps"), ({"l_steps": 0}, "l_steps"), ({"probe": 0}, "probe"),
    ({"k_steps": 2.5}, "k_steps"), ({"matching": "cos"}, "matching"), ({"grounding": "sgd"}, "grounding"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"task_weight": -1.0}, "task_weight"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"), ({"checkpoint_chunk": -1}, "checkpoint_chunk"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        BMGConfig(**kw)


def test_checkpointed_k_unroll_gives_the_same_gradient():
    net, theta = _tiny_vsml()
    x, y = _data(2, 6 + 2 + 2, 5, 3, seed=3)
    base = {"k_steps": 6, "l_steps": 2, "probe": 2, "clip_grad_norm": 0.0}
    g0, _ = bmg_gradient(net, theta, x, y, 3, BMGConfig(**base), torch.Generator().manual_seed(0))
    g1, _ = bmg_gradient(net, theta, x, y, 3, BMGConfig(**base, checkpoint_chunk=2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(g0, g1, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# train.py


BMG_TINY = ["--preset", "tiny", "--log.progress", "false", "--estimator", "bmg", "--meta_batch", "2",
            "--bmg.k_steps", "2", "--bmg.l_steps", "2", "--bmg.probe", "2", "--eval.every", "0"]


def test_train_cli_bmg_runs_and_resumes_exactly(tmp_path):
    rc = train_cli.main([*BMG_TINY, "--out_dir", str(tmp_path), "--name", "full", "--steps", "4"])
    assert rc == 0
    rc = train_cli.main([*BMG_TINY, "--out_dir", str(tmp_path), "--name", "part", "--steps", "2"])
    assert rc == 0
    assert train_cli.main(["--resume", str(tmp_path / "part"), "--steps", "4", "--log.progress", "false"]) == 0
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 6                          # 2 cloning + 4 BMG steps
    assert a["config"]["resolved_lr"] == 1e-3 and a["config"]["bmg"]["k_steps"] == 2
    assert torch.equal(a["theta"], b["theta"])
    assert torch.equal(a["optimizer"]["meta"]["state"][0]["exp_avg"], b["optimizer"]["meta"]["state"][0]["exp_avg"])
    import json
    rows = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("meta_train/matching" in r for r in rows)


def test_train_cli_bmg_episode_too_short_is_a_config_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main([*BMG_TINY, "--out_dir", str(tmp_path), "--bmg.l_steps", "5"])
    assert exc.value.code == 2
    assert "needs episode_length >= bmg.k_steps + bmg.l_steps + bmg.probe = 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main([*BMG_TINY, "--out_dir", str(tmp_path), "--bmg.matching", "cos"])
