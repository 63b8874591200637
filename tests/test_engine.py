"""Engine tests: the batched VSML network against a naive loop, timing, symmetries, shapes, gradients.

Run: python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.naive_vsml import naive_episode
from vsml import ConfigError, SubLSTMConfig, VSMLConfig, VSMLNetwork, init_state, theta_size

DT = torch.float64


def _cfg(hidden=(), ln=False, bp=False, label=False, layerwise=False, micro=2):
    return VSMLConfig(cell=SubLSTMConfig(layer_norm=ln), hidden_sizes=hidden, backward_pass=bp,
                      feed_label=label, layerwise=layerwise, micro_ticks=micro)


def _random_theta(net, gen, e=None, scale=0.5):
    """A θ with non-trivial biases/LN params too (the reference init has zero biases)."""
    th = net.init_theta(gen, dtype=DT)
    th = th + scale * torch.randn(th.shape, generator=gen, dtype=DT)
    if e is not None:
        th = th[None] + 0.3 * torch.randn((e, *th.shape), generator=gen, dtype=DT)
    return th


CASES = [
    # (hidden, D, C, layer_norm, backward_pass, feed_label, layerwise, per_episode_theta)
    ((), 3, 2, False, False, False, False, False),
    ((), 5, 3, True, False, True, False, True),
    ((4,), 3, 2, False, False, False, False, True),
    ((3,), 5, 3, True, False, True, True, False),
    ((3,), 4, 2, False, True, False, False, False),
    ((2,), 3, 3, True, True, True, True, True),
    ((2, 3), 3, 2, False, False, True, False, False),
    ((2, 3), 3, 2, True, True, False, True, True),
]


@pytest.mark.parametrize("hidden,d,c,ln,bp,label,layerwise,per_ep", CASES,
                         ids=lambda v: str(v))
def test_matches_naive_loop(hidden, d, c, ln, bp, label, layerwise, per_ep):
    gen = torch.Generator().manual_seed(hash((hidden, d, c, ln, bp, label, layerwise, per_ep)) % 2**31)
    e, t = 2, 4
    cfg = _cfg(hidden, ln, bp, label, layerwise)
    net = VSMLNetwork(cfg)
    theta = _random_theta(net, gen, e if per_ep else None)
    x = torch.randn(e, t, d, generator=gen, dtype=DT)
    y = torch.randint(0, c, (e, t), generator=gen)
    state = net.init_state(e, d, c, gen, dtype=DT)
    # random h too, so the h-term of the gates is exercised from the first step
    state.h = [torch.randn(h.shape, generator=gen, dtype=DT) * 0.5 for h in state.h]
    out = net.unroll(theta, x, y, c, state=state.clone())
    K = cfg.num_layers
    for i in range(e):
        th = theta[i] if per_ep else theta
        sets = [th[min(k, th.shape[0] - 1)] for k in range(K)]
        ref = naive_episode(sets, x[i], y[i], c, [h[i] for h in state.h], [cc[i] for cc in state.c],
                            backward_pass=bp, feed_label=label, layer_norm=ln)
        torch.testing.assert_close(out.logits[i], ref, rtol=1e-9, atol=1e-9)


def test_matches_naive_loop_float32():
    """Same check in float32: agreement to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    cfg = _cfg((3,), ln=True, label=True)
    net = VSMLNetwork(cfg)
    theta = _random_theta(net, gen).float()
    x, y = torch.randn(1, 5, 7, generator=gen), torch.randint(0, 4, (1, 5), generator=gen)
    state = net.init_state(1, 7, 4, gen)
    out = net.unroll(theta, x, y, 4, state=state.clone())
    sets = [theta[0]] * 2
    ref = naive_episode([s.double() for s in sets], x[0].double(), y[0], 4,
                        [h[0].double() for h in state.h], [c[0].double() for c in state.c],
                        feed_label=True, layer_norm=True)
    torch.testing.assert_close(out.logits[0].double(), ref, rtol=1e-4, atol=1e-5)


def test_theta_size_matches_reference():
    assert theta_size(SubLSTMConfig()) == 2384
    assert theta_size(SubLSTMConfig(layer_norm=True)) == 2416
    net = VSMLNetwork(_cfg((32,), layerwise=True))
    assert net.init_theta().shape == (2, 2384)


def test_reference_initialisation():
    net = VSMLNetwork(VSMLConfig())
    th = net.init_theta(torch.Generator().manual_seed(0))[0]
    W = th[:64 * 32]
    s = 1 / 32 ** 0.5
    assert W.abs().max() <= 2 * s + 1e-6
    assert 0.80 * s < W.std() < 0.95 * s          # truncation without variance correction: ~0.88
    assert torch.all(th[64 * 32:64 * 32 + 64] == 0)   # β = 0
    st = init_state(VSMLConfig(), 3, 100, 10, torch.Generator().manual_seed(1))
    c = st.c[0]
    assert torch.all(st.h[0] == 0) and torch.all(c[..., 8:] == 0)
    assert c[..., :8].abs().max() <= 2 / 10 + 1e-6
    assert 0.08 < c[..., :8].std() < 0.095
    assert not torch.equal(c[0], c[1])            # one draw per episode


@pytest.mark.parametrize("bp", [False, True])
@pytest.mark.parametrize("hidden", [(), (3,)])
def test_prediction_does_not_see_own_label(bp, hidden):
    gen = torch.Generator().manual_seed(0)
    net = VSMLNetwork(_cfg(hidden, bp=bp, label=True))
    theta = _random_theta(net, gen)
    x = torch.randn(1, 6, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (1, 6), generator=gen)
    st = net.init_state(1, 5, 3, gen, dtype=DT)
    base = net.unroll(theta, x, y, 3, state=st.clone()).logits
    y2 = y.clone()
    y2[0, 3] = (y[0, 3] + 1) % 3
    alt = net.unroll(theta, x, y2, 3, state=st.clone()).logits
    torch.testing.assert_close(base[:, :4], alt[:, :4], rtol=0, atol=0)    # ŷ_0..ŷ_3 unchanged
    assert (base[:, 4] - alt[:, 4]).abs().max() > 1e-9                     # ŷ_4 depends on y_3


def test_permutation_symmetries():
    gen = torch.Generator().manual_seed(5)
    net = VSMLNetwork(_cfg((3,), label=True))
    theta = _random_theta(net, gen)
    d, c = 6, 4
    x = torch.randn(1, 5, d, generator=gen, dtype=DT)
    y = torch.randint(0, c, (1, 5), generator=gen)
    st = net.init_state(1, d, c, gen, dtype=DT)
    base = net.unroll(theta, x, y, c, state=st.clone()).logits
    # permute input pixels together with their rows of the first layer's state
    pi = torch.randperm(d, generator=gen)
    st_p = st.clone()
    st_p.h[0], st_p.c[0] = st.h[0][:, pi], st.c[0][:, pi]
    out = net.unroll(theta, x[..., pi], y, c, state=st_p).logits
    torch.testing.assert_close(out, base, rtol=1e-10, atol=1e-10)
    # permute classes: labels and the output columns of the last layer's state
    sigma = torch.randperm(c, generator=gen)       # new class j is old class sigma[j]
    inv = torch.argsort(sigma)
    st_c = st.clone()
    st_c.h[1], st_c.c[1] = st.h[1][:, :, sigma], st.c[1][:, :, sigma]
    out = net.unroll(theta, x, inv[y], c, state=st_c).logits
    torch.testing.assert_close(out, base[..., sigma], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [64, 196, 784])
def test_one_theta_any_input_size(d):
    net = VSMLNetwork(VSMLConfig())
    theta = net.init_theta(torch.Generator().manual_seed(0))
    x, y = torch.randn(2, 2, d), torch.randint(0, 10, (2, 2))
    out = net.unroll(theta, x, y, 10, generator=torch.Generator().manual_seed(1))
    assert out.logits.shape == (2, 2, 10) and torch.isfinite(out.loss).all()


@pytest.mark.parametrize("c", [2, 3, 10, 47, 62])
def test_one_theta_any_class_count(c):
    net = VSMLNetwork(_cfg((5,)))
    theta = net.init_theta(torch.Generator().manual_seed(0))
    x, y = torch.randn(2, 3, 20), torch.randint(0, c, (2, 3))
    out = net.unroll(theta, x, y, c, generator=torch.Generator().manual_seed(1))
    assert out.logits.shape == (2, 3, c) and out.state.num_classes == c


def test_state_carried_across_calls_equals_one_call():
    gen = torch.Generator().manual_seed(0)
    net = VSMLNetwork(_cfg((3,)))
    theta = _random_theta(net, gen)
    x, y = torch.randn(2, 7, 5, generator=gen, dtype=DT), torch.randint(0, 3, (2, 7), generator=gen)
    st = net.init_state(2, 5, 3, gen, dtype=DT)
    full = net.unroll(theta, x, y, 3, state=st.clone())
    a = net.unroll(theta, x[:, :3], y[:, :3], 3, state=st.clone())
    b = net.unroll(theta, x[:, 3:], y[:, 3:], state=a.state)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.state.c[1], full.state.c[1], rtol=0, atol=0)


def test_per_episode_theta_equals_separate_runs():
    gen = torch.Generator().manual_seed(0)
    net = VSMLNetwork(_cfg(()))
    th = _random_theta(net, gen, e=3)
    x, y = torch.randn(3, 4, 6, generator=gen, dtype=DT), torch.randint(0, 2, (3, 4), generator=gen)
    st = net.init_state(3, 6, 2, gen, dtype=DT)
    out = net.unroll(th, x, y, 2, state=st.clone())
    for i in range(3):
        one = net.unroll(th[i], x[i:i + 1], y[i:i + 1], 2, state=st.index(slice(i, i + 1)))
        torch.testing.assert_close(out.logits[i:i + 1], one.logits, rtol=1e-12, atol=1e-12)


def test_loss_and_accuracy_consistent():
    gen = torch.Generator().manual_seed(0)
    net = VSMLNetwork(VSMLConfig())
    y = torch.randint(0, 3, (2, 5), generator=gen)
    out = net.unroll(net.init_theta(gen), torch.randn(2, 5, 8, generator=gen), y, 3, generator=gen)
    lp = torch.log_softmax(out.logits, -1)
    torch.testing.assert_close(out.loss, -lp.gather(-1, y[..., None]).squeeze(-1))
    assert torch.equal(out.correct, out.logits.argmax(-1) == y)
    torch.testing.assert_close(out.accuracy, out.correct.float().mean(1))


def test_bad_inputs_raise_clear_errors():
    net = VSMLNetwork(VSMLConfig())
    th = net.init_theta()
    x, y = torch.randn(2, 3, 8), torch.randint(0, 3, (2, 3))
    with pytest.raises(ValueError, match=r"\[E, T, D\]"):
        net.unroll(th, torch.randn(3, 8), y, 3)
    with pytest.raises(TypeError, match="floating-point"):
        net.unroll(th, x.long(), y, 3)
    with pytest.raises(TypeError, match="integer"):
        net.unroll(th, x, y.float(), 3)
    with pytest.raises(ValueError, match="y has shape"):
        net.unroll(th, x, y[:, :2], 3)
    with pytest.raises(TypeError, match="dtype"):
        net.unroll(th, x.double(), y, 3)
    with pytest.raises(ValueError, match="labels must lie"):
        net.unroll(th, x, y + 5, 3)
    with pytest.raises(ValueError, match="num_classes is required"):
        net.unroll(th, x, y)
    with pytest.raises(ValueError, match="θ has shape"):
        net.unroll(th[:, :100], x, y, 3)
    with pytest.raises(ValueError, match="θ has shape"):
        net.unroll(th.expand(5, -1, -1), x, y, 3)    # E mismatch
    st = net.init_state(2, 8, 3)
    with pytest.raises(ValueError, match="carried state"):
        net.unroll(th, torch.randn(2, 3, 9), y, state=st)
    with pytest.raises(ConfigError):
        VSMLConfig(micro_ticks=0)
    with pytest.raises(ConfigError):
        VSMLConfig(output_idx=8)
    with pytest.raises(ConfigError):
        SubLSTMConfig(init_rand_proportion=1.5)


def test_gradients_flow_finite_difference():
    gen = torch.Generator().manual_seed(0)
    cfg = _cfg((2,), ln=True, label=True)
    net = VSMLNetwork(cfg)
    theta = _random_theta(net, gen, scale=0.3).requires_grad_(True)
    x, y = torch.randn(2, 3, 3, generator=gen, dtype=DT), torch.randint(0, 2, (2, 3), generator=gen)
    st = net.init_state(2, 3, 2, gen, dtype=DT)

    def f(th):
        return net.unroll(th, x, y, 2, state=st.clone()).loss.mean()

    f(theta).backward()
    g = theta.grad.clone()
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    idx = torch.randint(0, theta.numel(), (12,), generator=gen)
    # also include some β and readout entries
    idx = torch.cat([idx, torch.tensor([2048, 2048 + 64 + 3, 2048 + 64 + 128 + 1])])
    eps = 1e-6
    with torch.no_grad():
        for j in idx.tolist():
            d = torch.zeros_like(theta).view(-1)
            d[j] = eps
            d = d.view_as(theta)
            fd = (f(theta + d) - f(theta - d)) / (2 * eps)
            assert abs(fd.item() - g.view(-1)[j].item()) < 1e-6 + 1e-4 * abs(fd.item()), j
    torch.autograd.gradcheck(lambda th: net.unroll(th, x[:, :2], y[:, :2], 2, state=st.clone()).loss.sum(),
                             (theta.detach()[:, :].clone().requires_grad_(True),), eps=1e-6, atol=1e-5,
                             nondet_tol=0, fast_mode=True)


@pytest.mark.parametrize("chunk_pairs", [16384, 7])
def test_compiled_tick_matches_eager(chunk_pairs, monkeypatch):
    """The torch.compile'd no-grad path (fused gates, tanh via σ, chunks of inputs a) equals the eager path
    to float32 rounding, in one chunk and in several (uneven) chunks."""
    import vsml.engine.network
    monkeypatch.setattr(vsml.engine.network, "CHUNK_PAIRS", chunk_pairs)
    gen = torch.Generator().manual_seed(0)
    cfg = _cfg((3,), ln=True, label=True)
    eager, comp = VSMLNetwork(cfg), VSMLNetwork(cfg, compile=True)
    comp.cpu_kernel = False          # this test is about the torch.compile chunks (the C++ kernel: tests/kernels)
    theta = _random_theta(eager, gen, e=2).float()
    x, y = torch.randn(2, 4, 5, generator=gen), torch.randint(0, 3, (2, 4), generator=gen)
    st = eager.init_state(2, 5, 3, gen)
    with torch.no_grad():
        a = eager.unroll(theta, x, y, 3, state=st.clone())
        b = comp.unroll(theta, x, y, 3, state=st.clone())
    assert comp._chunk_fn is not None
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.state.c[0], a.state.c[0], rtol=1e-4, atol=1e-5)


def test_logit_scale_is_the_read_out_temperature():
    """VSMLConfig.logit_scale κ: ŷ = bound·tanh(κ·m / bound).  κ = 1 is bitwise the reference read-out; in a
    shallow net κ is the same function as scaling θ's output row of W_fwd / b_fwd by κ (the probe of
    RESULTS.md "A logit scale"); the compiled no-grad path applies it too; bad values are config errors."""
    from vsml.engine.params import param_shapes
    gen = torch.Generator().manual_seed(0)
    base = VSMLNetwork(_cfg(()))
    theta = _random_theta(base, gen)
    x, y = torch.randn(2, 6, 5, generator=gen, dtype=DT), torch.randint(0, 3, (2, 6), generator=gen)
    st = base.init_state(2, 5, 3, gen, dtype=DT)
    m = torch.randn(4, 3, generator=gen, dtype=DT) * 50
    assert torch.equal(base.logits_from(torch.stack([m] * 8, -1)), 100.0 * torch.tanh(m / 100.0))
    kappa = 2.5
    scaled = VSMLNetwork(VSMLConfig(logit_scale=kappa))
    th_rows = theta.clone()                                 # [1, P]: W_fwd[output_idx] and b_fwd[output_idx] · κ
    off = 0
    for name, shape in param_shapes(base.cfg.cell):
        size = math.prod(shape)
        if name in ("W_fwd", "b_fwd"):
            view = th_rows[0, off:off + size].view(shape)
            view[base.cfg.output_idx] *= kappa
        off += size
    a = scaled.unroll(theta, x, y, 3, state=st.clone())
    b = base.unroll(th_rows, x, y, 3, state=st.clone())
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a.logits, base.unroll(theta, x, y, 3, state=st.clone()).logits)
    c = scaled.unroll(theta.float(), x.float(), y, 3, state=st.map(lambda v: v.float()), backend="compile")
    torch.testing.assert_close(c.logits.double(), a.logits, rtol=1e-4, atol=1e-4)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="logit_scale"):
            VSMLConfig(logit_scale=bad)
