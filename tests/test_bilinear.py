"""The bilinear cell (``SubLSTMConfig.bilinear``, issue 15): gates += w_xe·x_a e_b, φ += x_a(W_xφ h + b_xφ).

Checked against the naive per-pair loop (tests/naive_vsml.py, written from the equations), on every no-grad
path (eager, compiled chunks, the C++ kernel in tests/kernels/test_cpu_kernel.py), through cloning's
gradients, and through train.py / eval.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import eval as eval_cli
import train as train_cli
from tests.naive_vsml import naive_episode
from vsml import ConfigError, SubLSTMConfig, VSMLConfig, VSMLNetwork, theta_size
from vsml.engine.params import extend_theta, unflatten

DT = torch.float64


def _cfg(**kw):
    ln = kw.pop("ln", False)
    return VSMLConfig(cell=SubLSTMConfig(layer_norm=ln, bilinear=True), **kw)


def _theta(net, gen, e=None, dtype=DT):
    th = net.init_theta(gen, dtype=dtype)
    th = th + 0.5 * torch.randn(th.shape, generator=gen, dtype=dtype)
    if e is not None:
        th = th[None] + 0.3 * torch.randn((e, *th.shape), generator=gen, dtype=dtype)
    return th


def test_layout_and_init():
    cell = SubLSTMConfig(bilinear=True)
    assert theta_size(cell) == 2384 + 64 + 128 + 8
    th = VSMLNetwork(VSMLConfig(cell=cell)).init_theta(torch.Generator().manual_seed(0))
    p = unflatten(th[0], cell)
    assert p.bilinear and p.W_xe.shape == (64,) and p.W_xphi.shape == (8, 16) and p.b_xphi.shape == (8,)
    assert p.W_xe.abs().max() > 0 and p.W_xphi.abs().max() > 0 and p.b_xphi.abs().max() == 0
    assert not unflatten(th[0, :2384], SubLSTMConfig()).bilinear


CASES = [
    # (hidden, D, C, layer_norm, backward_pass, per_episode_theta)
    ((), 3, 2, False, False, False),
    ((), 4, 3, True, False, True),
    ((3,), 3, 2, False, False, True),
    ((2,), 3, 3, True, True, False),
]


@pytest.mark.parametrize("hidden,d,c,ln,bp,per_ep", CASES, ids=lambda v: str(v))
def test_matches_naive_loop(hidden, d, c, ln, bp, per_ep):
    gen = torch.Generator().manual_seed(hash((hidden, d, c, ln, bp, per_ep)) % 2**31)
    e, t = 2, 4
    cfg = _cfg(hidden_sizes=hidden, ln=ln, backward_pass=bp)
    net = VSMLNetwork(cfg)
    theta = _theta(net, gen, e if per_ep else None)
    x = torch.randn(e, t, d, generator=gen, dtype=DT)
    y = torch.randint(0, c, (e, t), generator=gen)
    state = net.init_state(e, d, c, gen, dtype=DT)
    state.h = [torch.randn(h.shape, generator=gen, dtype=DT) * 0.5 for h in state.h]
    out = net.unroll(theta, x, y, c, state=state.clone())
    for i in range(e):
        th = theta[i] if per_ep else theta
        ref = naive_episode([th[0]] * cfg.num_layers, x[i], y[i], c, [h[i] for h in state.h],
                            [cc[i] for cc in state.c], backward_pass=bp, layer_norm=ln, bilinear=True)
        torch.testing.assert_close(out.logits[i], ref, rtol=1e-9, atol=1e-9)
    # the bilinear paths matter: the plain cell with the same leading θ values gives other logits
    plain = VSMLNetwork(dataclasses.replace(cfg, cell=dataclasses.replace(cfg.cell, bilinear=False)))
    other = plain.unroll(theta[..., :theta_size(plain.cfg.cell)].contiguous(), x, y, c, state=state.clone())
    assert not torch.allclose(other.logits, out.logits)


def test_zero_bilinear_parameters_are_the_plain_learner():
    """extend_theta pads a plain θ with zeros: the bilinear network then computes exactly the plain one."""
    gen = torch.Generator().manual_seed(1)
    plain = VSMLNetwork(VSMLConfig(hidden_sizes=(3,)))
    bil = VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(bilinear=True), hidden_sizes=(3,)))
    th = _theta(plain, gen)
    th2 = extend_theta(th, bil.cfg.cell)
    assert th2.shape[-1] == theta_size(bil.cfg.cell) and torch.equal(th2[..., :th.shape[-1]], th)
    assert extend_theta(th2, bil.cfg.cell) is th2
    x, y = torch.randn(2, 5, 6, generator=gen, dtype=DT), torch.randint(0, 3, (2, 5), generator=gen)
    st = plain.init_state(2, 6, 3, gen, dtype=DT)
    a = plain.unroll(th, x, y, state=st.clone())
    b = bil.unroll(th2, x, y, state=st.clone())
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="bilinear cell needs"):
        extend_theta(th[..., :-1], bil.cfg.cell)


@pytest.mark.parametrize("ln,per_ep", [(False, False), (False, True), (True, False)])
def test_compiled_chunks_match_eager(monkeypatch, ln, per_ep):
    """The torch.compile'd no-grad path (chunked over inputs a) equals the eager one to float32 rounding."""
    from vsml.engine import network
    monkeypatch.setenv("VSML_CPU_KERNEL", "off")
    monkeypatch.setattr(network, "CHUNK_PAIRS", 2 * 3 * 2)       # E·B = 6 -> chunks of 2 inputs of 5
    gen = torch.Generator().manual_seed(2)
    cfg = _cfg(ln=ln)
    eager, comp = VSMLNetwork(cfg, backend="torch"), VSMLNetwork(cfg, backend="compile")
    th = _theta(eager, gen, 2 if per_ep else None, torch.float32)
    x, y = torch.randn(2, 4, 5, generator=gen), torch.randint(0, 3, (2, 4), generator=gen)
    st = eager.init_state(2, 5, 3, gen)
    with torch.no_grad():
        a = eager.unroll(th, x, y, state=st.clone())
        b = comp.unroll(th, x, y, state=st.clone())
    assert comp.no_grad_backend(th) == "compile"
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.state.h[0], a.state.h[0], rtol=1e-4, atol=1e-5)


def test_cloning_trains_the_bilinear_parameters():
    """Both cloning losses (short and long-horizon) send gradient into w_xe, W_xφ and b_xφ."""
    from vsml.estimators.cloning import CloneConfig, CloneEstimator
    gen = torch.Generator().manual_seed(3)
    net = VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(bilinear=True)))
    p0 = theta_size(SubLSTMConfig())
    x, y = torch.randn(4, 6, 5, generator=gen), torch.randint(0, 3, (4, 6), generator=gen)
    for cc in (CloneConfig(steps=1), CloneConfig(steps=1, length=6, truncation=3, own_error_max=1.0, ce_weight=1.0)):
        est = CloneEstimator(net, cc, seed=0)
        th = net.init_theta(torch.Generator().manual_seed(0)).requires_grad_(True)
        if cc.long:
            est._start_block(x, y, 3, 0, th.dtype)
            loss, _ = est.loss_long(th, 0)
        else:
            loss = est.loss(th, x, y, 3, torch.Generator().manual_seed(0))
        (g,) = torch.autograd.grad(loss, th)
        assert torch.isfinite(g).all()
        assert g[0, p0:p0 + 64].abs().sum() > 0 and g[0, p0 + 64:].abs().sum() > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="dense VSML layers only"):
        VSMLConfig(cell=SubLSTMConfig(bilinear=True), conv=("c4k3s1",))
    with pytest.raises(ConfigError, match="input_idx=0"):
        VSMLConfig(cell=SubLSTMConfig(bilinear=True), input_idx=2)


def test_fused_kernels_accept_the_bilinear_cell():
    """Both fused kernels implement the bilinear cell (tests/kernels/test_fused*.py check them against the torch
    path), so the dispatch no longer refuses it for dense configs."""
    from kernels.backend import _fused_why_not
    assert _fused_why_not(VSMLConfig(cell=SubLSTMConfig(bilinear=True))) is None
    assert _fused_why_not(VSMLConfig(cell=SubLSTMConfig(bilinear=True, layer_norm=True), hidden_sizes=(3,),
                                     backward_pass=True, layerwise=True)) is None


def test_bilinear_through_train_and_eval(tmp_path, capsys):
    """--vsml.cell.bilinear from a plain shipped θ: the θ is extended with zeros (the same learner at step 0),
    the config travels into config.json and the checkpoint, cloning changes the bilinear values, and eval.py
    meta-tests the run with the bilinear network."""
    from vsml.evaluation.load import load_learner
    from vsml.training.checkpoint import load_checkpoint, load_theta
    rc = train_cli.main(["--preset", "tiny", "--log.progress", "false", "--out_dir", str(tmp_path), "--name", "b",
                         "--vsml.cell.bilinear", "true", "--init_from", "pretrained:mnist14-clone-k2",
                         "--vsml.logit_scale", "2", "--eval.every", "0", "--steps", "0", "--clone.steps", "2"])
    assert rc == 0
    assert "start at zero" in capsys.readouterr().err          # the extension of a plain θ is announced
    rd = tmp_path / "b"
    assert json.loads((rd / "config.json").read_text())["vsml"]["cell"]["bilinear"] is True
    ck = load_checkpoint(rd)
    assert ck["config"]["vsml"]["cell"]["bilinear"] is True
    theta = ck["theta"]
    p0 = theta_size(SubLSTMConfig())
    assert theta.shape[-1] == theta_size(SubLSTMConfig(bilinear=True))
    assert theta[0, p0:].abs().sum() > 0                     # started at zero, moved by cloning
    start = load_theta(__import__("vsml.pretrained", fromlist=["path"]).path("mnist14-clone-k2"))[0]
    assert (theta[0, :p0] - start[0]).abs().max() < 0.05     # two small Adam steps from the shipped θ
    _, net, th, _ = load_learner(str(rd))
    assert net.cfg.cell.bilinear and th.shape == theta.shape
    assert eval_cli.main(["--checkpoint", str(rd), "--tasks", "digits", "--episodes", "2", "--length", "10"]) == 0
