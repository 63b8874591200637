"""The convolutional VSML layer (vsml/engine/conv.py, vsml.md §1.9) against naive loops, in float64.

Run: python -m pytest tests/test_conv.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

import train as train_cli
from vsml import ConfigError, SubLSTMConfig, VSMLConfig, VSMLNetwork
from vsml.engine.config import ConvGeometry, ConvSpec
from vsml.engine.conv import backward_counts, conv_layer_update, gather_patches, scatter_patches
from vsml.engine.params import unflatten

from .naive_vsml import layer_update as naive_dense_update
from .naive_vsml import readouts, split_theta, sub_lstm_step

DT = torch.float64
N, M = 16, 8


def _geom(h, w, ic, oc, k, s):
    return ConvGeometry(h, w, ic, math.ceil(h / s), math.ceil(w / s), oc, k, s)


def _theta(gen, ln=False, e=None, scale=0.5):
    cfg = VSMLConfig(cell=SubLSTMConfig(layer_norm=ln))
    th = VSMLNetwork(cfg).init_theta(gen, dtype=DT)                    # [1, P]
    th = th + scale * torch.randn(th.shape, generator=gen, dtype=DT)     # biases and LN params non-trivial
    if e is not None:
        th = th[None].repeat(e, 1, 1) + 0.1 * torch.randn((e, *th.shape), generator=gen, dtype=DT)
    return th


def naive_conv(theta_vec, spec, g, fwd, bwd, H, C, micro=2, ln=False):
    """One conv-layer update written from vsml.md §1.9, one sub-LSTM call at a time.

    theta_vec [P]; fwd [H, W, IC, M]; bwd [Ho, Wo, OC, M]; H, C [k, k, IC, OC, N].
    Returns h', c', fwd_out [Ho, Wo, OC, M], bwd_out [H, W, IC, M].
    """
    P = split_theta(theta_vec, N, M, ln)
    k, s, pad, left = g.kernel, g.stride, g.pads[0], g.pads[2]
    ic_n, oc_n = g.in_channels, g.out_channels
    n_pos = g.out_height * g.out_width
    h_new, c_new = torch.zeros_like(H), torch.zeros_like(C)
    fwd_out = torch.zeros(g.out_height, g.out_width, oc_n, M, dtype=DT)
    bwd_sum = torch.zeros(g.height, g.width, ic_n, M, dtype=DT)
    cnt = torch.zeros(g.height, g.width, dtype=DT)
    for p in range(g.out_height):
        for q in range(g.out_width):
            for i in range(k):
                for j in range(k):
                    r, cc = p * s + i - pad, q * s + j - left
                    inside = 0 <= r < g.height and 0 <= cc < g.width
                    if inside:
                        cnt[r, cc] += 1
                    for ic in range(ic_n):
                        f = fwd[r, cc, ic] if inside else torch.zeros(M, dtype=DT)
                        psi_mean = torch.zeros(M, dtype=DT)
                        for oc in range(oc_n):
                            h, c = H[i, j, ic, oc], C[i, j, ic, oc]
                            for _ in range(micro):
                                h, c = sub_lstm_step(P, f, bwd[p, q, oc], h, c, N)
                            phi, psi = readouts(P, h, ln)
                            h_new[i, j, ic, oc] += h / n_pos
                            c_new[i, j, ic, oc] += c / n_pos
                            fwd_out[p, q, oc] += phi / (k * k * ic_n)
                            psi_mean += psi / oc_n
                        if inside:
                            bwd_sum[r, cc, ic] += psi_mean
    if spec.bwd_norm == "kernel":
        bwd_out = bwd_sum / (k * k)
    else:
        bwd_out = bwd_sum / cnt.clamp(min=1)[:, :, None, None]
    return h_new, c_new, fwd_out, bwd_out


CASES = [(1, 1), (1, 2), (3, 1), (3, 2), (3, 3), (5, 1), (5, 2), (5, 3)]


@pytest.mark.parametrize("k,s", CASES)
def test_conv_layer_matches_naive_loop(k, s):
    gen = torch.Generator().manual_seed(10 * k + s)
    hgt, wid, ic, oc = 5, 7, 2, 2                                         # odd, non-square image
    g = _geom(hgt, wid, ic, oc, k, s)
    ln = (k == 3)                                                          # LayerNorm on some cases
    spec = ConvSpec(oc, k, s, bwd_norm="kernel" if s == 2 else "connected")
    theta = _theta(gen, ln)
    fwd = torch.randn(hgt, wid, ic, M, generator=gen, dtype=DT)
    bwd = torch.randn(g.out_height, g.out_width, oc, M, generator=gen, dtype=DT)
    H = 0.5 * torch.randn(k, k, ic, oc, N, generator=gen, dtype=DT)
    C = torch.randn(k, k, ic, oc, N, generator=gen, dtype=DT)
    want = naive_conv(theta[0], spec, g, fwd, bwd, H, C, ln=ln)
    p = unflatten(theta[0], SubLSTMConfig(layer_norm=ln))
    got = conv_layer_update(p, spec, g, fwd.reshape(1, -1, M), bwd.reshape(1, -1, M), H[None], C[None], 2, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-10, atol=1e-12)


def test_conv_layer_per_episode_theta_equals_separate_runs():
    gen = torch.Generator().manual_seed(3)
    g, spec = _geom(7, 5, 1, 3, 3, 2), ConvSpec(3, 3, 2)
    theta = _theta(gen, e=2)                                              # [2, 1, P]
    fwd = torch.randn(2, g.in_dim, M, generator=gen, dtype=DT)
    bwd = torch.randn(2, g.out_dim, M, generator=gen, dtype=DT)
    H = torch.randn(2, 3, 3, 1, 3, N, generator=gen, dtype=DT)
    C = torch.randn(2, 3, 3, 1, 3, N, generator=gen, dtype=DT)
    cell = SubLSTMConfig()
    both = conv_layer_update(unflatten(theta[:, 0], cell), spec, g, fwd, bwd, H, C, 2, 1e-5)
    for e in range(2):
        one = conv_layer_update(unflatten(theta[e, 0], cell), spec, g, fwd[e:e + 1], bwd[e:e + 1], H[e:e + 1],
                                C[e:e + 1], 2, 1e-5)
        for a, b in zip(both, one):
            torch.testing.assert_close(a[e:e + 1], b)


@pytest.mark.parametrize("hw", [(5, 7), (14, 14), (9, 8)])
@pytest.mark.parametrize("k,s", [(1, 1), (1, 2), (3, 1), (3, 2), (3, 3), (5, 2), (5, 3), (3, 4), (5, 5), (5, 6)])
def test_every_input_position_receives_its_backward_message(hw, k, s):
    """With ψ ≡ 1 the 'connected' back-projection must deliver exactly 1 to every input position that lies
    in some receptive field, and 0 elsewhere (only possible when s > k); the counts equal a naive loop.
    (The reference's stride-2 mask silently dropped the second half of the rows and columns.)"""
    hgt, wid = hw
    g = _geom(hgt, wid, 2, 3, k, s)
    pad, left = g.pads[0], g.pads[2]
    want_cnt = torch.zeros(hgt, wid, dtype=DT)
    for p in range(g.out_height):
        for i in range(k):
            for q in range(g.out_width):
                for j in range(k):
                    r, c = p * s + i - pad, q * s + j - left
                    if 0 <= r < hgt and 0 <= c < wid:
                        want_cnt[r, c] += 1
    torch.testing.assert_close(backward_counts(g, DT), want_cnt)
    if s <= k:
        assert (want_cnt > 0).all()
    gen = torch.Generator().manual_seed(0)
    theta = _theta(gen)
    with torch.no_grad():
        theta[0, 2048 + 64 + 128 + 8: 2048 + 64 + 128 + 8 + 128] = 0.0        # W_bwd = 0
        theta[0, 2048 + 64 + 256 + 8:] = 1.0                                 # b_bwd = 1  ->  ψ ≡ 1
    p = unflatten(theta[0], SubLSTMConfig())
    fwd = torch.randn(1, g.in_dim, M, generator=gen, dtype=DT)
    bwd = torch.randn(1, g.out_dim, M, generator=gen, dtype=DT)
    H = torch.randn(1, k, k, 2, 3, N, generator=gen, dtype=DT)
    C = torch.randn(1, k, k, 2, 3, N, generator=gen, dtype=DT)
    out = conv_layer_update(p, ConvSpec(3, k, s), g, fwd, bwd, H, C, 2, 1e-5)[3]
    got = out.reshape(hgt, wid, 2, M)
    expect = (want_cnt > 0).to(DT)[:, :, None, None].expand(hgt, wid, 2, M)
    torch.testing.assert_close(got, expect)
    ref = conv_layer_update(p, ConvSpec(3, k, s, bwd_norm="kernel"), g, fwd, bwd, H, C, 2, 1e-5)[3]
    torch.testing.assert_close(ref.reshape(hgt, wid, 2, M), (want_cnt / (k * k))[:, :, None, None].expand(hgt, wid, 2, M))


def test_gather_and_scatter_are_adjoint():
    """<gather(x), y> = <x, scatter(y)> for every stride: the back-projection is the transpose of the
    patch gathering, whatever k and s."""
    gen = torch.Generator().manual_seed(1)
    for k, s in CASES + [(3, 4)]:
        g = _geom(9, 6, 2, 1, k, s)
        x = torch.randn(2, g.in_dim, 3, generator=gen, dtype=DT)
        y = torch.randn(2, g.out_height * g.out_width, k, k, 2, 3, generator=gen, dtype=DT)
        lhs = (gather_patches(x, g) * y).sum()
        rhs = (x * scatter_patches(y, g)).sum()
        torch.testing.assert_close(lhs, rhs)


def _naive_conv_dense_episode(theta, cfg, x, y, num_classes, st):
    """A conv -> dense network episode with the naive layers and the §1.5 schedules (one episode)."""
    ln, bp = cfg.cell.layer_norm, cfg.backward_pass
    geo = cfg.conv_geometry(x.shape[1])
    n_conv = len(geo)
    sets = [theta[min(k, theta.shape[0] - 1)] for k in range(cfg.num_layers)]
    H = [s.clone() for s in st.h]
    C = [s.clone() for s in st.c]
    K = cfg.num_layers
    dense_HC = {}
    for k in range(n_conv, K):
        a, b = H[k].shape[0], H[k].shape[1]
        dense_HC[k] = ([[H[k][i, j].clone() for j in range(b)] for i in range(a)],
                       [[C[k][i, j].clone() for j in range(b)] for i in range(a)])
    bwd = [st.bwd[k].clone() for k in range(K)]                              # flat [X, M]

    def run(k, fwd, bwd_in):
        if k < n_conv:
            g = geo[k]
            h2, c2, fo, bo = naive_conv(sets[k], cfg.conv[k], g, fwd.reshape(g.height, g.width, g.in_channels, M),
                                        bwd_in.reshape(g.out_height, g.out_width, g.out_channels, M), H[k], C[k],
                                        cfg.micro_ticks, ln)
            H[k], C[k] = h2, c2
            return fo.reshape(-1, M), bo.reshape(-1, M)
        hh, cc = dense_HC[k]
        fo, bo = naive_dense_update(split_theta(sets[k], N, M, ln), list(fwd), list(bwd_in), hh, cc,
                                    cfg.micro_ticks, ln, N, M)
        return torch.stack(fo), torch.stack(bo)

    logits_all = []
    for t in range(x.shape[0]):
        fwd = torch.zeros(x.shape[1], M, dtype=DT)
        fwd[:, 0] = x[t]
        ins = []
        for k in range(K):
            ins.append(fwd)
            fwd, bo = run(k, fwd, bwd[k])
            if not bp and k > 0:
                bwd[k - 1] = bo
        logits = 100 * torch.tanh(fwd[:, 1] / 100)
        logits_all.append(logits)
        err = torch.zeros(num_classes, M, dtype=DT)
        err[:, 0] = torch.softmax(logits, 0) - torch.nn.functional.one_hot(y[t], num_classes).to(DT)
        if cfg.feed_label:
            err[:, 1] = torch.nn.functional.one_hot(y[t], num_classes).to(DT)
        if not bp:
            bwd[K - 1] = err
        else:
            msg = err
            for k in range(K - 1, -1, -1):
                _, bo = run(k, ins[k], msg)
                if k > 0:
                    bwd[k - 1] = msg = bo
            bwd[K - 1] = torch.zeros_like(bwd[K - 1])
    return torch.stack(logits_all)


@pytest.mark.parametrize("bp,ln,label,layerwise", [(False, False, False, False), (True, True, True, True)])
def test_conv_dense_network_matches_naive_episode(bp, ln, label, layerwise):
    gen = torch.Generator().manual_seed(5)
    cfg = VSMLConfig(cell=SubLSTMConfig(layer_norm=ln), conv=("c2k3s2",), backward_pass=bp, feed_label=label,
                     layerwise=layerwise)
    net = VSMLNetwork(cfg)
    theta = net.init_theta(gen, dtype=DT)
    theta = theta + 0.3 * torch.randn(theta.shape, generator=gen, dtype=DT)
    x, y = torch.randn(1, 3, 25, generator=gen, dtype=DT), torch.randint(0, 3, (1, 3), generator=gen)
    st = net.init_state(1, 25, 3, gen, dtype=DT)
    assert st.h[0].shape == (1, 3, 3, 1, 2, N) and st.h[1].shape == (1, 18, 3, N)
    out = net.unroll(theta, x, y, state=st.clone())
    want = _naive_conv_dense_episode(theta, cfg, x[0], y[0], 3, st.index(0))
    torch.testing.assert_close(out.logits[0], want, rtol=1e-9, atol=1e-10)


def test_conv_gradients_flow_to_the_conv_theta():
    """BPTT through a conv -> dense episode: the conv layer's own θ set (layerwise) gets a finite, non-zero
    gradient that matches central finite differences."""
    gen = torch.Generator().manual_seed(2)
    cfg = VSMLConfig(conv=("c2k3s1",), layerwise=True, backward_pass=True)
    net = VSMLNetwork(cfg)
    theta = (net.init_theta(gen, dtype=DT) + 0.2 * torch.randn(2, 2384, generator=gen, dtype=DT)).requires_grad_(True)
    x, y = torch.randn(2, 3, 9, generator=gen, dtype=DT), torch.randint(0, 2, (2, 3), generator=gen)
    st = net.init_state(2, 9, 2, gen, dtype=DT)

    def f(th):
        return net.unroll(th, x, y, state=st.clone()).loss.mean()

    (g,) = torch.autograd.grad(f(theta), theta)
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    d = torch.randn(theta.shape, generator=gen, dtype=DT)
    d[1] = 0                                                               # only the conv layer's θ
    eps = 1e-6
    with torch.no_grad():
        fd = (f(theta + eps * d) - f(theta - eps * d)) / (2 * eps)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-5, atol=1e-9)


def test_conv_shapes_strides_and_state_reuse():
    """Deep conv stacks at any odd kernel / stride run, the state is the same size for any image, and a carried
    state continues the episode exactly."""
    cfg = VSMLConfig(conv=("c3k5s2", "c2k1s3", "c4k3s1"), hidden_sizes=(5,))
    net = VSMLNetwork(cfg)
    gen = torch.Generator().manual_seed(0)
    theta = net.init_theta(gen)
    geo = cfg.conv_geometry(13 * 13)
    assert [(g.out_height, g.out_channels) for g in geo] == [(7, 3), (3, 2), (3, 4)]
    x, y = torch.rand(2, 6, 169, generator=gen), torch.randint(0, 4, (2, 6), generator=gen)
    st = net.init_state(2, 169, 4, torch.Generator().manual_seed(1))
    full = net.unroll(theta, x, y, state=st)
    half = net.unroll(theta, x[:, :3], y[:, :3], state=st)
    rest = net.unroll(theta, x[:, 3:], y[:, 3:], state=half.state)
    torch.testing.assert_close(torch.cat([half.logits, rest.logits], 1), full.logits)
    s2 = net.init_state(2, 12 * 12, 4, torch.Generator().manual_seed(1))   # 12x12 -> same geometry
    assert [t.shape for t in s2.h[:3]] == [t.shape for t in st.h[:3]]
    assert torch.isfinite(net.unroll(theta, torch.rand(2, 2, 144), y[:, :2], state=s2).logits).all()


def test_conv_initial_state_scale():
    cfg = VSMLConfig(conv=(ConvSpec(8, 3, 1), ConvSpec(8, 3, 1, state_std="kernel")))
    st = VSMLNetwork(cfg).init_state(64, 100, 10, torch.Generator().manual_seed(0))
    s0, s1 = st.c[0][..., :8].std().item(), st.c[1][..., :8].std().item()
    assert abs(s0 - 0.88 / 3) < 0.02 and abs(s1 - 0.88 / math.sqrt(3)) < 0.03      # 1/√(9·1), 1/√3 (TN at ±2σ)
    assert (st.c[0][..., 8:] == 0).all() and (st.h[0] == 0).all()


def test_conv_config_validation_and_round_trip():
    assert ConvSpec.parse("c8k3s2") == ConvSpec(8, 3, 2)
    # TensorFlow SAME padding (top, bottom): k//2 each side at stride 1, every input covered for s <= k
    assert _geom(14, 14, 1, 1, 3, 2).pads[:2] == (0, 1) and _geom(9, 9, 1, 1, 3, 3).pads[:2] == (0, 0)
    assert _geom(5, 5, 1, 1, 5, 1).pads[:2] == (2, 2) and _geom(7, 7, 1, 1, 5, 2).pads[:2] == (2, 2)
    assert ConvSpec.parse("c4") == ConvSpec(4, 3, 1)
    assert str(ConvSpec(8, 5, 2, "kernel", "kernel")) == "c8k5s2-refbwd-refinit"
    assert ConvSpec.parse("c8k5s2-refbwd-refinit") == ConvSpec(8, 5, 2, "kernel", "kernel")
    for bad in ("8k3", "c8k4", "c8k3s0", "c0"):
        with pytest.raises(ConfigError):
            ConvSpec.parse(bad)
    with pytest.raises(ConfigError, match="odd"):
        VSMLConfig(conv=(ConvSpec(4, 2),))
    with pytest.raises(ConfigError, match="image_shape"):
        VSMLConfig(image_shape=(3, 3, 3, 3))
    with pytest.raises(ConfigError, match="bwd_reset"):
        VSMLConfig(bwd_reset=True)
    cfg = VSMLConfig(conv=("c8k3s2", ConvSpec(4, 5, 1, bwd_norm="kernel")), hidden_sizes=(16,), image_shape=(6, 4, 2))
    assert VSMLConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_layers == 4 and cfg.layer_dims(48, 10) == [(3 * 2 * 4, 16), (16, 10)]
    net = VSMLNetwork(VSMLConfig(conv=("c2",)))
    th = net.init_theta()
    with pytest.raises(ValueError, match="not a square"):
        net.unroll(th, torch.rand(1, 2, 10), torch.zeros(1, 2, dtype=torch.long), num_classes=2)
    with pytest.raises(ValueError, match="image_shape"):
        VSMLNetwork(VSMLConfig(conv=("c2",), image_shape=(3, 3))).unroll(
            th, torch.rand(1, 2, 10), torch.zeros(1, 2, dtype=torch.long), num_classes=2)
    st = net.init_state(1, 16, 2)
    with pytest.raises(ValueError, match="carried state"):
        net.unroll(th, torch.rand(2, 2, 16), torch.zeros(2, 2, dtype=torch.long), state=st)


@pytest.mark.parametrize("estimator", ["es", "bptt"])
def test_train_cli_runs_a_conv_network(tmp_path, estimator):
    """train.py meta-trains a conv -> dense VSML net (ES and BPTT) and meta-tests it; θ changes."""
    rc = train_cli.main(["--preset", "tiny", "--log.progress", "false", "--out_dir", str(tmp_path), "--name", "c",
                         "--vsml.conv", "c2k3s2", "--vsml.hidden_sizes", "4", "--clone.steps", "0",
                         "--estimator", estimator, "--steps", "2", "--meta_batch", "2"])
    assert rc == 0
    from vsml.training.checkpoint import load_checkpoint
    ck = load_checkpoint(tmp_path / "c")
    assert ck["config"]["vsml"]["conv"][0]["channels"] == 2 and ck["step"] == 2
    assert torch.isfinite(ck["theta"]).all()


@pytest.mark.slow
def test_compiled_no_grad_path_with_conv_layers():
    """VSMLNetwork(compile=True): conv layers stay on the eager path, the dense layers after them use the
    compiled one; the result equals the eager network."""
    cfg = VSMLConfig(conv=("c4k3s2",), hidden_sizes=(8,))
    eager, comp = VSMLNetwork(cfg), VSMLNetwork(cfg, compile=True)
    theta = eager.init_theta(torch.Generator().manual_seed(0))
    x, y = torch.rand(2, 4, 64), torch.randint(0, 3, (2, 4))
    with torch.no_grad():
        a = eager.unroll(theta, x, y, 3, generator=torch.Generator().manual_seed(1))
        b = comp.unroll(theta, x, y, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
