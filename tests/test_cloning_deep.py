"""Deep learning-algorithm cloning (vsml/estimators/cloning_deep.py), the bwd_reset schedule, and meta-training of
deep dense stacks (layer-wise / shared θ, both schedules, with / without label feeding) by ES and BPTT.

Run: python -m pytest tests/test_cloning_deep.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vsml import ConfigError, SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.estimators.bptt import BPTTConfig
from vsml.estimators.cloning import CloneConfig, CloneEstimator, sgd_teacher
from vsml.estimators.cloning_deep import DeepCloneEstimator, TeacherLearner, make_clone_estimator, mlp_sgd_step
from vsml.estimators.es import ESConfig, pair_seed
from vsml.estimators.core import BPTTEstimator, ESEstimator, make_optimizer

DT = torch.float64
DEEP = VSMLConfig(hidden_sizes=(4,), backward_pass=True, bwd_reset=True, layerwise=True)


def test_teacher_is_backprop_with_per_layer_learning_rates():
    """Δw_k / A_k = −η_k ∇_{W_k} CE for the MLP z_k = W_kᵀ a_k (W_k = w_k / A_k, hidden units tanh(√A_k z_k)), with
    η_k = (α_k / A_k) Π_{j>k} A_j / B_j: the mean over b instead of the sum only rescales each layer's rate."""
    g = torch.Generator().manual_seed(0)
    dims = [(7, 5), (5, 4), (4, 3)]
    alphas = [0.7, 1.3, 0.9]
    ws = [torch.randn(2, a, b, generator=g, dtype=DT) for a, b in dims]
    x, y = torch.randn(2, 7, generator=g, dtype=DT), torch.tensor([1, 2])
    st = mlp_sgd_step(ws, x, y, 3, alphas)
    for e in range(2):
        Ws = [(w[e] / w.shape[1]).clone().requires_grad_(True) for w in ws]
        a = x[e]
        for k, W in enumerate(Ws):
            z = a @ W
            a = torch.tanh(math.sqrt(dims[k][0]) * z) if k < len(Ws) - 1 else z      # gain √A_k
        torch.testing.assert_close(st.logits[e], z.detach())
        loss = F.cross_entropy(z[None], y[e:e + 1])
        grads = torch.autograd.grad(loss, Ws)
        for k, (a_k, b_k) in enumerate(dims):  # noqa: B007
            eta = alphas[k] / a_k * math.prod(aj / bj for aj, bj in dims[k + 1:])
            torch.testing.assert_close((st.new_w[k][e] - ws[k][e]) / a_k, -eta * grads[k])


def test_student_unroll_is_the_network_schedule():
    """Without teacher forcing, the estimator's own unroll is exactly VSMLNetwork.unroll (backward-pass
    schedule with bwd_reset), so the cloned θ is meta-tested on the schedule it was trained on."""
    net = VSMLNetwork(DEEP)
    est = DeepCloneEstimator(net, CloneConfig(steps=1))
    g = torch.Generator().manual_seed(1)
    theta = net.init_theta(g, dtype=DT) + 0.2 * torch.randn(2, 2384, generator=g, dtype=DT)
    x, y = torch.randn(2, 5, 6, generator=g, dtype=DT), torch.randint(0, 3, (2, 5), generator=g)
    _, logits = est.loss(theta, x, y, 3, torch.Generator().manual_seed(7), teacher_forcing=False, return_logits=True)
    out = net.unroll(theta, x, y, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits, out.logits, rtol=1e-12, atol=1e-12)


def test_bwd_reset_zeroes_every_stored_message():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 3, 5, generator=g), torch.randint(0, 3, (2, 3), generator=g)
    plain = VSMLNetwork(VSMLConfig(hidden_sizes=(4,), backward_pass=True))
    reset = VSMLNetwork(VSMLConfig(hidden_sizes=(4,), backward_pass=True, bwd_reset=True))
    theta = plain.init_theta(g)
    a = plain.unroll(theta, x[:, :1], y[:, :1], 3, generator=torch.Generator().manual_seed(0))
    b = reset.unroll(theta, x[:, :1], y[:, :1], 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.logits, b.logits)                     # the first forward sweep is the same
    assert a.state.bwd[0].abs().sum() > 0 and all((t == 0).all() for t in b.state.bwd)
    a2 = plain.unroll(theta, x[:, 1:], y[:, 1:], state=a.state)
    b2 = reset.unroll(theta, x[:, 1:], y[:, 1:], state=b.state)
    assert not torch.allclose(a2.logits, b2.logits)                     # ... and then they differ


def test_deep_cloning_steps_reduce_the_loss():
    torch.manual_seed(0)
    net = VSMLNetwork(DEEP)
    est = make_clone_estimator(net, CloneConfig(steps=1, length=6, episodes=4, random_frac=0.5), seed=0)
    assert isinstance(est, DeepCloneEstimator)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, 8, generator=g), torch.randint(0, 3, (4, 6), generator=g)
    theta = torch.nn.Parameter(net.init_theta(g))
    opt = torch.optim.Adam([theta], lr=2e-2)

    def loss_now():
        return est.loss(theta.detach(), x, y, 3, torch.Generator().manual_seed(5)).item()

    before = loss_now()
    for step in range(15):
        grad, m = est.estimate(theta.detach(), x, y, 3, step)
        assert torch.isfinite(grad).all() and m["grad_norm"] > 0
        assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0      # both layers' θ sets learn
        theta.grad = grad
        opt.step()
    assert loss_now() < 0.85 * before, (loss_now(), before)          # measured 0.79 (gain teacher)


def test_clone_estimator_dispatch_and_rejections():
    assert type(make_clone_estimator(VSMLNetwork(VSMLConfig()), CloneConfig(steps=1))) is CloneEstimator
    for cfg in (VSMLConfig(hidden_sizes=(4,), backward_pass=True),
                VSMLConfig(hidden_sizes=(4,)),
                VSMLConfig(hidden_sizes=(4,), backward_pass=True, bwd_reset=True, cell=SubLSTMConfig(layer_norm=True)),
                VSMLConfig(conv=("c2",), backward_pass=True, bwd_reset=True)):
        with pytest.raises(ConfigError, match="cloning"):
            make_clone_estimator(VSMLNetwork(cfg), CloneConfig(steps=1))


def test_teacher_learner_shares_streams_and_initial_weights():
    """TeacherLearner starts from the VSML net's initial cell element 0 for the same generator and equals
    the shallow teacher (forward-only) or mlp_sgd_step (backward-pass)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 6, 9, generator=g), torch.randint(0, 3, (2, 6), generator=g)
    shallow = TeacherLearner(VSMLConfig(), [1.0])
    out = shallow.unroll(torch.zeros(0), x, y, 3, generator=torch.Generator().manual_seed(4))
    w0 = VSMLNetwork(VSMLConfig()).init_state(2, 9, 3, torch.Generator().manual_seed(4)).c[0][..., 0]
    torch.testing.assert_close(out.logits, sgd_teacher(x, y, 3, w0, 1.0)[2])
    deep = TeacherLearner(DEEP, [1.0, 1.0])
    out = deep.unroll(torch.zeros(0), x, y, 3, generator=torch.Generator().manual_seed(4))
    st = VSMLNetwork(DEEP).init_state(2, 9, 3, torch.Generator().manual_seed(4))
    ws = [c[..., 0] for c in st.c]
    for t in range(6):
        s = mlp_sgd_step(ws, x[:, t], y[:, t], 3, [1.0, 1.0])
        torch.testing.assert_close(out.logits[:, t], s.logits)
        ws = s.new_w


# --------------------------------------------------------------------------------------------
# deep dense stacks meta-train by ES and by BPTT, in every schedule / sharing / label-feeding variant

VARIANTS = [dict(layerwise=lw, backward_pass=bp, feed_label=fl)
            for lw in (False, True) for bp in (False, True) for fl in (False, True)]
FAST = [dict(layerwise=False, backward_pass=False, feed_label=True),   # the reference's deep.yaml schedule
        dict(layerwise=True, backward_pass=True, feed_label=False)]


class _FixedStateES(ESEstimator):
    """ES whose initial inner states are those of step 0 at every step (a fixed meta-batch), while the
    noise still changes with the step."""

    def initial_state(self, num_pairs, in_dim, num_classes, step, dtype=torch.float32, device=None):
        return super().initial_state(num_pairs, in_dim, num_classes, 0, dtype, device)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=() if v in FAST else pytest.mark.slow) for v in VARIANTS],
                         ids=lambda v: "-".join(f"{k}={int(x)}" for k, x in v.items()))
@pytest.mark.parametrize("method", ["bptt", "es"])
def test_deep_stack_meta_trains(variant, method):
    """A 6 -> 3 -> 2 VSML net (random θ) lowers its online meta-loss on a fixed meta-batch in 25 steps
    (BPTT by >= 10%, ES by >= 2.5%; measured 15-25% and 3.5-5%), and with layer-wise θ the first layer's
    θ set receives a gradient: the meta-gradient flows through the whole stack in this schedule.  The
    fast variants run by default, all eight under ``-m slow``."""
    cfg = VSMLConfig(hidden_sizes=(3,), **variant)
    net = VSMLNetwork(cfg)
    g = torch.Generator().manual_seed(0)
    e = 8 if method == "bptt" else 16
    x = torch.randn(e, 8, 6, generator=g)
    y = (x[..., 0] > 0).long()                                           # a learnable rule
    theta = torch.nn.Parameter(net.init_theta(g))
    if method == "bptt":
        est = BPTTEstimator(net, BPTTConfig(truncation=0, clip_grad_norm=10.0), seed=0)
        opt = make_optimizer(theta, 2e-2)
    else:
        est = _FixedStateES(net, ESConfig(pairs=e, sigma=0.1, seed=0))
        opt = make_optimizer(theta, 0.1)
    st = net.init_state(e, 6, 2, torch.Generator().manual_seed(pair_seed(0, 0, -1)))   # the estimators' states

    def meta_loss():
        with torch.no_grad():
            return net.unroll(theta.detach(), x, y, state=st.clone()).loss.mean().item()

    before = meta_loss()
    for step in range(25):
        grad, _ = est.estimate(theta.detach(), x, y, 2, 0 if method == "bptt" else step)
        if cfg.layerwise and step == 0:
            assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
        theta.grad = grad
        opt.step()
    after = meta_loss()
    assert after < (0.9 if method == "bptt" else 0.975) * before, (before, after)


def test_teacher_burn_in_starts_the_student_from_the_teachers_weights():
    """loss(burn_in=B) = loss on x[:, B:] from the fresh state with cell element 0 replaced by the weights
    the teacher reached after B examples; estimate() with clone.window draws B in [0, length − window]."""
    net = VSMLNetwork(DEEP)
    est = DeepCloneEstimator(net, CloneConfig(steps=1, length=9, window=4, episodes=2, random_frac=0.0))
    g = torch.Generator().manual_seed(4)
    theta = net.init_theta(g, dtype=DT) + 0.2 * torch.randn(2, 2384, generator=g, dtype=DT)
    x, y = torch.randn(2, 9, 6, generator=g, dtype=DT), torch.randint(0, 3, (2, 9), generator=g)
    st = net.init_state(2, 6, 3, torch.Generator().manual_seed(1), dtype=DT)
    ws = [c[..., 0] for c in st.c]
    for t in range(5):
        ws = mlp_sgd_step(ws, x[:, t], y[:, t], 3, est.alphas).new_w
    st2 = st.clone()
    for k in range(2):
        st2.c[k][..., 0] = ws[k]
    a = est.loss(theta, x, y, 3, None, state=st.clone(), burn_in=5)
    b = est.loss(theta, x[:, 5:], y[:, 5:], 3, None, state=st2)
    torch.testing.assert_close(a, b)
    burns = {est.estimate(theta.float(), x.float(), y, 3, s)[1]["burn_in"] for s in range(12)}
    assert burns <= set(range(6)) and len(burns) > 1
    with pytest.raises(ConfigError, match="window"):
        CloneConfig(length=5, window=6)


def test_cloning_only_runs_are_valid_configs():
    from vsml.training.config import TrainConfig
    assert TrainConfig(steps=0, clone=CloneConfig(steps=3)).total_steps == 3
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        TrainConfig(steps=0)
