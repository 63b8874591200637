"""The hand-built online-SGD θ (vsml/engine/analytic.py): the VSML network with it *is* online SGD on a
linear softmax classifier (eager PyTorch and the C++ kernel), its config errors, and the product paths
``eval.py --checkpoint analytic:sgd`` and ``train.py --init_from analytic:sgd``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as eval_cli
import train as train_cli
from vsml.engine.analytic import (
    BACKPROP_CONFIG,
    DEFAULT_CONFIG,
    analytic_theta,
    backprop_initial_weights,
    backprop_theta,
    parse_spec,
    sgd_theta,
)
from vsml.engine.config import ConfigError, VSMLConfig
from vsml.engine.network import VSMLNetwork
from vsml.estimators.cloning_deep import analytic_teacher
from vsml.training.checkpoint import load_checkpoint


def _online_sgd(x, y, c_num, alpha, kappa, bound, schedule=lambda t: 1.0):
    """Reference: w ← w − α s(t) x_t e_t from w = 0, logits bound·tanh(κ·mean_a x_a w_ab / bound).  x [E, T, D]."""
    e_num, t_len, d = x.shape
    w = torch.zeros(e_num, d, c_num, dtype=torch.float64)
    out = []
    for t in range(t_len):
        xt = x[:, t].double()
        z = bound * torch.tanh(kappa * (xt[:, :, None] * w).mean(1) / bound)           # [E, C]
        out.append(z)
        e = torch.softmax(z, -1) - F.one_hot(y[:, t], c_num).double()
        w = w - alpha * schedule(t) * xt[:, :, None] * e[:, None, :]
    return torch.stack(out, 1)                                                       # [E, T, C]


def _episode(seed=0, e_num=3, t_len=40, d=7, c_num=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(e_num, t_len, d, generator=g)
    y = torch.randint(0, c_num, (e_num, t_len), generator=g)
    return x, y, c_num


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sgd_theta_is_online_sgd(backend):
    if backend == "cpu":
        from kernels.backend import _cpu_why_not
        if _cpu_why_not(DEFAULT_CONFIG, torch.device("cpu"), build=True):
            pytest.skip("the C++ kernel cannot be built here")
    x, y, c_num = _episode()
    alpha, eps = 0.7, 1e-3                      # small ε: tanh(ε w)/ε = w to ~1e-5 at these weights
    net = VSMLNetwork(DEFAULT_CONFIG, backend=backend)
    theta = sgd_theta(DEFAULT_CONFIG, alpha=alpha, eps=eps)
    with torch.no_grad():
        out = net.unroll(theta, x, y, c_num, generator=torch.Generator().manual_seed(1))
    ref = _online_sgd(x, y, c_num, alpha, DEFAULT_CONFIG.logit_scale, DEFAULT_CONFIG.tanh_bound)
    assert ref[:, -1].abs().max() > 1.0                      # the classifier has learned something
    torch.testing.assert_close(out.logits.double(), ref, rtol=2e-3, atol=2e-3)
    # the forward-only schedule feeds e_{t-1} next to x_t: the same θ is no learner there
    fwd_only = dataclasses.replace(DEFAULT_CONFIG, backward_pass=False)
    with pytest.raises(ConfigError, match="backward-pass schedule"):
        sgd_theta(fwd_only)


def test_alpha_is_the_sgd_step_and_eps_only_the_tanh_range():
    x, y, c_num = _episode(seed=3, t_len=25)
    net = VSMLNetwork(DEFAULT_CONFIG, backend="torch")
    with torch.no_grad():
        a = net.unroll(sgd_theta(DEFAULT_CONFIG, 2.0, 1e-3), x, y, c_num).logits
        b = net.unroll(sgd_theta(DEFAULT_CONFIG, 2.0, 3e-3), x, y, c_num).logits
        c = net.unroll(sgd_theta(DEFAULT_CONFIG, 1.0, 1e-3), x, y, c_num).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert (a - c).abs().max() > 0.1


def test_boost_and_tau_make_a_step_that_decays_from_alpha_boost_to_alpha():
    """analytic:sgd[boost=B,tau=τ] is online SGD with step α·B·σ(4 + w·tanh(t/τ))/σ(4), w = logit(σ(4)/B) − 4:
    α·B at the start, α once t ≫ τ (the clock h_j = tanh(t/τ) is read half-way through example t's sweeps)."""
    import math
    x, y, c_num = _episode(seed=5, t_len=60)
    alpha, boost, tau = 0.7, 3.0, 15.0
    s0 = 1 / (1 + math.exp(-4.0))
    w = math.log((s0 / boost) / (1 - s0 / boost)) - 4.0

    def schedule(t):
        return boost / s0 / (1 + math.exp(-(4.0 + w * math.tanh((t + 0.5) / tau))))

    assert schedule(-0.5) == pytest.approx(boost) and schedule(1e9) == pytest.approx(1.0)
    net = VSMLNetwork(DEFAULT_CONFIG, backend="torch")
    with torch.no_grad():
        out = net.unroll(analytic_theta(f"analytic:sgd[alpha={alpha},eps=0.001,boost={boost},tau={tau}]",
                                        DEFAULT_CONFIG), x, y, c_num).logits.double()
    ref = _online_sgd(x, y, c_num, alpha, DEFAULT_CONFIG.logit_scale, DEFAULT_CONFIG.tanh_bound, schedule)
    plain = _online_sgd(x, y, c_num, alpha, DEFAULT_CONFIG.logit_scale, DEFAULT_CONFIG.tanh_bound)
    err = (out - ref).abs().max()
    assert err < 0.01 * (ref - plain).abs().max()          # the clock read at t + 0 or t + 1 misses by 2-3x more
    with pytest.raises(ConfigError, match="two state elements"):
        sgd_theta(dataclasses.replace(DEFAULT_CONFIG, cell=dataclasses.replace(DEFAULT_CONFIG.cell,
                                                                                 init_rand_proportion=15 / 16)), boost=2)
    with pytest.raises(ConfigError, match="boost >= 1"):
        analytic_theta("analytic:sgd[boost=0.5]", DEFAULT_CONFIG)


def test_config_and_spec_errors():
    with pytest.raises(ConfigError, match="bilinear cell.*|backward-pass schedule"):
        sgd_theta(VSMLConfig())
    with pytest.raises(ConfigError, match="one dense layer"):
        sgd_theta(dataclasses.replace(DEFAULT_CONFIG, hidden_sizes=(8,)))
    with pytest.raises(ConfigError, match="unknown analytic learner"):
        parse_spec("analytic:adam")
    with pytest.raises(ConfigError, match="unknown option 'lr'.*alpha, eps, boost and tau"):
        parse_spec("analytic:sgd[lr=1]")
    with pytest.raises(ConfigError, match="not a number"):
        parse_spec("analytic:sgd[alpha=x]")
    with pytest.raises(ConfigError, match="alpha > 0"):
        analytic_theta("analytic:sgd[alpha=0]", DEFAULT_CONFIG)
    assert parse_spec("analytic:sgd[alpha=2, eps=0.005]") == ("sgd", {"alpha": 2.0, "eps": 0.005})


def test_eval_cli_evaluates_analytic_sgd(tmp_path):
    out = tmp_path / "ev"
    rc = eval_cli.main(["--checkpoint", "analytic:sgd", "--tasks", "digits+resize4", "--episodes", "4",
                        "--length", "120", "--baselines", "", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["digits+resize4"]
    (row,) = res.values()
    acc = row["online_accuracy"]
    assert 0.3 < acc <= 1.0                                   # it learns (chance is 0.1)
    assert eval_cli.main(["--checkpoint", "analytic:adam", "--episodes", "1", "--length", "2"]) == 2


TINY = ["--preset", "tiny", "--log.progress", "false", "--eval.every", "0", "--clone.steps", "0"]
NEEDS = ["--vsml.backward_pass", "true", "--vsml.cell.bilinear", "true", "--vsml.logit_scale", "2"]


@pytest.mark.parametrize("spec,kw", [("analytic:sgd[alpha=1.5]", {"alpha": 1.5}),
                                     ("analytic:sgd[alpha=0.5,boost=6,tau=500]", {"alpha": 0.5, "boost": 6, "tau": 500})])
def test_train_cli_starts_from_analytic_sgd(tmp_path, spec, kw):
    """train.py meta-trains from the spec (with staggered tbptt streams), eval.py evaluates the spec itself."""
    rc = train_cli.main([*TINY, *NEEDS, "--out_dir", str(tmp_path), "--name", "a", "--init_from", spec,
                         "--estimator", "tbptt", "--meta_batch", "2", "--bptt.streams", "2",
                         "--episode_length", "6", "--bptt.truncation", "3", "--steps", "2", "--lr", "1e-12"])
    assert rc == 0
    theta = load_checkpoint(tmp_path / "a")["theta"]
    want = sgd_theta(DEFAULT_CONFIG, **kw)
    torch.testing.assert_close(theta, want, rtol=0, atol=1e-9)     # lr 1e-12: θ is still the analytic one
    assert eval_cli.main(["--checkpoint", spec, "--tasks", "digits+resize4", "--episodes", "2", "--length", "20",
                          "--baselines", "", "--out", str(tmp_path / "ev")]) == 0


def test_train_cli_analytic_needs_its_schedule(tmp_path, capsys):
    rc = train_cli.main([*TINY, "--out_dir", str(tmp_path), "--name", "b", "--init_from", "analytic:sgd"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "backward-pass schedule (--vsml.backward_pass true)" in err and "bilinear" in err
    assert not (tmp_path / "b").exists()


def test_drift_script_shows_the_weight_element_growing(tmp_path):
    """experiments/issue15_drift.py (the ninth session's diagnosis of the collapse after the horizon) runs on the
    package-shipped digits: analytic:sgd learns (accuracy above chance) and only its weight element k moves."""
    res = subprocess.run([sys.executable, "experiments/issue15_drift.py", "--checkpoints", "analytic:sgd",
                          "--task", "digits", "--episodes", "2", "--length", "400", "--every", "200"],
                         check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith("examples")]
    assert len(rows) == 2
    k = DEFAULT_CONFIG.cell.num_rand
    for r in rows:
        acc, mean_c = float(r[3]), [float(v) for v in r[5:5 + DEFAULT_CONFIG.cell.hidden]]
        assert acc > 0.3                                                  # chance is 0.1
        assert mean_c[k] > 0 and all(v < 1e-6 for i, v in enumerate(mean_c) if i > k)


# --------------------------------------------------------------------------------------------
# analytic:backprop: online backprop on a one-hidden-layer MLP written into a two-layer θ


BP_SMALL = dataclasses.replace(BACKPROP_CONFIG, hidden_sizes=(5,))


def _learnable_episode(seed=0, t_len=60):
    """x ~ N(0, 1) in D = 9 dims, labels y = argmax_c (x V)_c of a fixed random V (3 classes), 3 episodes."""
    x, _, c_num = _episode(seed=seed, e_num=3, t_len=t_len, d=9, c_num=3)
    v = torch.randn(9, c_num, generator=torch.Generator().manual_seed(seed + 7))
    return x, (x @ v).argmax(-1), c_num


def _backprop_pair(spec="analytic:backprop", cfg=BP_SMALL, backend="torch", seed=0, t_len=60, dtype=torch.float64):
    """Logits of the VSML network with the spec's θ and of the MLP it implements, on one stream
    (:func:`_learnable_episode`) from the same initial state."""
    x, y, c_num = _learnable_episode(seed, t_len)
    x = x.to(dtype)
    net = VSMLNetwork(cfg, backend=backend)
    st = net.init_state(3, 9, c_num, torch.Generator().manual_seed(seed + 1), dtype)
    with torch.no_grad():
        out = net.unroll(analytic_theta(spec, cfg).to(dtype), x, y, state=st)
        ref = analytic_teacher(spec, cfg).unroll(None, x.double(), y, state=st.map(torch.Tensor.double))
    return out.logits.double(), ref.logits, st


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backprop_theta_is_online_backprop_on_the_mlp(backend):
    """The VSML network with analytic:backprop is online backprop on the MLP of backprop_theta's docstring: the
    same logits as cloning_deep's teacher (mlp_sgd_step) from w_0 = tanh(c_0), w_1 = 0, in eager PyTorch
    (float64: the hand-built gates and finite differences only) and in the C++ kernel (float32)."""
    if backend == "cpu":
        from kernels.backend import _cpu_why_not
        if _cpu_why_not(BP_SMALL, torch.device("cpu"), build=True):
            pytest.skip("the C++ kernel cannot be built here")
    spec = "analytic:backprop[alpha=2,hidden_alpha=0.3,gain=2]"
    if backend == "torch":                   # small ε and η: the curvature and finite-difference terms vanish
        got, ref, _ = _backprop_pair(spec[:-1] + ",eps=0.001,eta=0.01]", dtype=torch.float64)
    else:                                    # the defaults, float32
        got, ref, _ = _backprop_pair(spec, backend="cpu", dtype=torch.float32)
    assert ref[:, -1].abs().max() > 1.0                               # the MLP has learned something
    tol = 2e-4 if backend == "torch" else 3e-3
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # both layers learn: without the hidden layer's updates (or with the output's update before the backward
    # read-out) the logits differ from the network's by far more than the tolerance
    frozen_hidden = analytic_teacher("analytic:backprop[alpha=2,hidden_alpha=1e-9,gain=2]", BP_SMALL)
    x, y, _ = _learnable_episode()
    _, _, st = _backprop_pair(spec)
    other = frozen_hidden.unroll(None, x.double(), y, state=st.map(torch.Tensor.double)).logits
    assert (other - ref).abs().max() > 50 * tol * ref.abs().max()


def test_backprop_uses_the_output_weights_before_their_update():
    """δ_0 is computed with w_1 before the example's update (backprop), not after: the update reaches the
    weight copies only in the next forward sweep.  A teacher that propagates through the updated w_1 differs."""
    from vsml.estimators.cloning_deep import mlp_sgd_step
    spec = "analytic:backprop[alpha=2,hidden_alpha=0.3,gain=2]"
    got, ref, st = _backprop_pair(spec, t_len=40)
    x, y, c_num = _learnable_episode(t_len=40)
    ws = [w.double() for w in backprop_initial_weights(st)]
    late = []
    for t in range(40):                                  # propagate through w_1 after its update
        tt = mlp_sgd_step(ws, x[:, t].double(), y[:, t], c_num, [0.3, 2.0], gain=2.0)
        late.append(tt.logits)
        a = torch.tanh(2.0 * (ws[0] * x[:, t].double()[:, :, None]).mean(1))          # [E, H]
        delta0 = (2.0 * (1 - a.square())[:, :, None] * tt.new_w[1] * tt.error[:, None, :]).mean(2)
        ws = [ws[0] - 0.3 * x[:, t].double()[:, :, None] * delta0[:, None, :], tt.new_w[1]]
    late = torch.stack(late, 1)
    err_bp, err_late = (got - ref).abs().max(), (got - late).abs().max()
    assert err_late > 20 * err_bp


def test_backprop_config_errors():
    with pytest.raises(ConfigError, match="one hidden dense layer"):
        backprop_theta(DEFAULT_CONFIG)
    with pytest.raises(ConfigError, match="micro-step"):
        backprop_theta(dataclasses.replace(BACKPROP_CONFIG, micro_ticks=2))
    with pytest.raises(ConfigError, match="bwd_reset"):
        backprop_theta(dataclasses.replace(BACKPROP_CONFIG, bwd_reset=False))
    with pytest.raises(ConfigError, match="unknown option 'boost'.*alpha, hidden_alpha, gain, eps and eta"):
        parse_spec("analytic:backprop[boost=2]")
    with pytest.raises(ConfigError, match="hidden_alpha"):
        analytic_theta("analytic:backprop[hidden_alpha=0]", BACKPROP_CONFIG)
    assert parse_spec("analytic:backprop[alpha=2,gain=7]") == ("backprop", {"alpha": 2.0, "gain": 7.0})
    with pytest.raises(ConfigError, match="boost > 1"):
        analytic_teacher("analytic:sgd[boost=2]", DEFAULT_CONFIG)


BP_FLAGS = ["--vsml.hidden_sizes", "5", "--vsml.micro_ticks", "1", "--vsml.backward_pass", "true",
            "--vsml.bwd_reset", "true", "--vsml.layerwise", "true", "--vsml.cell.bilinear", "true",
            "--vsml.tanh_bound", "1000"]


def test_eval_and_train_cli_use_analytic_backprop(tmp_path, capsys):
    """eval.py evaluates analytic:backprop in its own config (196→16→10 style), train.py meta-trains from it
    with the flags the config needs, and without them exits 2 naming what is missing."""
    out = tmp_path / "ev"
    assert eval_cli.main(["--checkpoint", "analytic:backprop", "--tasks", "digits+resize4", "--episodes", "4",
                          "--length", "150", "--baselines", "", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["digits+resize4"].values()
    assert 0.2 < row["online_accuracy"] <= 1.0                         # it learns (chance is 0.1)
    rc = train_cli.main([*TINY, *BP_FLAGS, "--out_dir", str(tmp_path), "--name", "a", "--init_from", "analytic:backprop",
                         "--estimator", "tbptt", "--meta_batch", "2", "--bptt.streams", "2", "--episode_length", "6",
                         "--bptt.truncation", "3", "--steps", "2", "--lr", "1e-12"])
    assert rc == 0
    cfg = dataclasses.replace(BACKPROP_CONFIG, hidden_sizes=(5,))
    torch.testing.assert_close(load_checkpoint(tmp_path / "a")["theta"], backprop_theta(cfg), rtol=0, atol=1e-6)
    capsys.readouterr()
    assert train_cli.main([*TINY, "--out_dir", str(tmp_path), "--name", "b", "--init_from", "analytic:backprop"]) == 2
    assert "one hidden dense layer" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("spec", ["analytic:backprop", "analytic:sgd[alpha=0.5]"])
def test_drift_cli_compares_analytic_learners_with_what_they_implement(tmp_path, spec):
    """``python -m vsml.estimators.cloning_deep --drift --checkpoint analytic:backprop`` (item 1's report) runs
    it on its own errors next to the MLP (analytic:sgd next to online SGD): the same predictions in every window."""
    from vsml.estimators.cloning_deep import main
    out = tmp_path / "d.json"
    assert main(["--drift", "--checkpoint", spec, "--tasks", "digits", "--episodes", "2",
                 "--length", "120", "--split", "train", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["window"][-1] == "[100, 120)"
    # near-ties of the tiny early logits may flip an argmax, so a few disagreements are allowed
    assert min(r["agree"]) >= 0.95 and max(r["rel_err"]) < 0.01
    assert max(abs(s - t) for s, t in zip(r["student_acc"], r["teacher_acc"])) <= 0.05 and r["teacher_acc"][-1] > 0.2
    # the side-by-side meta-test (no --drift) also pairs it with what it implements, not the default teacher
    assert main(["--checkpoint", spec, "--tasks", "digits", "--episodes", "2", "--length", "60",
                 "--out_dir", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["digits"]
    (teacher,) = [v for k, v in rows.items() if k.startswith("teacher")]
    clone = rows["vsml-clone"]
    assert abs(clone["online_accuracy"] - teacher["online_accuracy"]) <= 0.03



def test_drift_cli_bad_spec_is_one_line_and_exit_2(capsys):
    from vsml.estimators.cloning_deep import main
    for spec, msg in (("analytic:sgd[boost=2]", "no gradient-descent teacher"), ("analytic:foo", "unknown analytic")):
        assert main(["--drift", "--checkpoint", spec, "--tasks", "digits", "--episodes", "1", "--length", "5"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err
