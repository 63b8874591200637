"""Micro-Badger (vsml/learners/badger.py), the Guessing Game (tasks/guessing.py) and their train/eval integration."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import make_family
from tasks.guessing import GuessingFamily, SinusoidFamily, is_guessing_spec
from vsml.learners.badger import BadgerConfig, MicroBadger, meta_loss_weights, parse_edges, sample_topology
from vsml.estimators.bptt import BPTTConfig, bptt_gradient
from vsml.engine.config import ConfigError


def _gen(s=0):
    return torch.Generator().manual_seed(s)


# ------------------------------------------------------------------------------------ tasks

def test_guessing_family_encoding_and_chance_level():
    fam = make_family("guessing[n=2-5]")
    b = fam.sample(4000, 7, seed=3)
    assert b.x.shape == (4000, 7, 5) and b.y.shape == (4000, 7) and b.num_classes == 5
    n = b.y[:, 0] + 1
    assert int(n.min()) == 2 and int(n.max()) == 5
    assert torch.equal(b.x[:, 0], b.x[:, -1])                                # targets fixed over the episode
    pad = torch.arange(5)[None] >= n[:, None]
    assert (b.x[:, 0][pad] == 0).all() and b.x.abs().max() <= 1
    # chance: guessing 0 costs c·mean y² = 3·E[y²] = 1 for U[-1, 1]
    ms = ((b.x[:, 0] ** 2).sum(1) / n).mean()
    assert 3 * float(ms) == pytest.approx(1.0, abs=0.03)
    # deterministic in (seed, split); train and test differ
    assert torch.equal(fam.sample(3, 2, seed=1).x, fam.sample(3, 2, seed=1).x)
    assert not torch.equal(fam.sample(3, 2, seed=1).x, fam.sample(3, 2, seed=1, split="test").x)


def test_sinusoid_family_spectrum_and_variance():
    fam = make_family("sinusoid[n=41,k=1-5]")
    assert isinstance(fam, SinusoidFamily) and fam.freqs == (1, 2, 3, 4, 5)
    b = fam.sample(3000, 2, seed=0)
    y = b.x[:, 0].double()
    assert 3 * float((y ** 2).mean()) == pytest.approx(1.0, abs=0.03)     # E[y²] = 1/3: chance 1 with c=3
    spec = np.abs(np.fft.rfft(y.numpy(), axis=1))                           # [E, 21]
    on = spec[:, 1:6]
    assert np.allclose(on, on[0, 0], rtol=1e-4)                             # equal amplitudes, exact DFT bins
    assert spec[:, [0, *range(6, 21)]].max() < 1e-4
    dec = make_family("sinusoid[k=1:3:5,decay=1]")
    assert dec.freqs == (1, 3, 5) and dec.amplitudes[0] / dec.amplitudes[2] == pytest.approx(5.0)


def test_guessing_specs_and_errors():
    assert is_guessing_spec("guessing") and is_guessing_spec("sinusoid[n=41]") and not is_guessing_spec("digits")
    assert isinstance(make_family("guessing"), GuessingFamily)
    with pytest.raises(ValueError, match="unknown parameter"):
        make_family("guessing[m=3]")
    with pytest.raises(ValueError, match="Nyquist"):
        make_family("sinusoid[n=9,k=1-5]")


# ------------------------------------------------------------------------------------ topology

def test_topology_samplers():
    e, n = 50, 9
    a = sample_topology("kout", e, n, k=3, generator=_gen())
    assert (a.sum(1) == 3).all()                                            # every sender has out-degree k
    assert (torch.diagonal(a, dim1=1, dim2=2) == 0).all()
    er = sample_topology("er", 400, n, p=0.3, generator=_gen(1))
    assert float(er.sum() / (400 * n * (n - 1))) == pytest.approx(0.3, abs=0.02)
    ring = sample_topology("ring", 1, n, k=1)[0]
    assert torch.equal(ring, ring.T) and (ring.sum(0) == 2).all() and ring[0, 1] == 1 and ring[0, n - 1] == 1
    comp = sample_topology("complete", 2, 4)
    assert torch.equal(comp[0], torch.ones(4, 4) - torch.eye(4))
    fixed = sample_topology("fixed", 2, 3, edges="0>1, 1>2")
    assert fixed[0, 1, 0] == 1 and fixed[0, 2, 1] == 1 and fixed.sum() == 4
    # dead experts (alive mask) neither send nor receive; kout picks among the alive only
    alive = torch.arange(n)[None] < torch.tensor([4, 9])[:, None]
    ak = sample_topology("kout", 2, n, k=5, alive=alive, generator=_gen(2))
    assert ak[0, 4:].sum() == 0 and ak[0, :, 4:].sum() == 0 and (ak[0, :, :4].sum(0) == 3).all()


def test_config_validation():
    with pytest.raises(ConfigError, match="sender>receiver"):
        BadgerConfig(topology="fixed", n_experts=3)
    with pytest.raises(ConfigError, match="self-loop"):
        parse_edges("1>1", 3)
    with pytest.raises(ConfigError, match="outside"):
        BadgerConfig(topology="fixed", n_experts=3, edges="0>5")
    with pytest.raises(ConfigError, match="n_experts_max"):
        BadgerConfig(n_experts=5, n_experts_max=3)
    with pytest.raises(ConfigError, match="meta_loss"):
        BadgerConfig(meta_loss="median")


# ------------------------------------------------------------------------------------ the learner

def _naive_unroll(lrn: MicroBadger, theta, x, y, st):
    """Per-episode, per-expert Python loops over the module-docstring equations (pooled readout, mean
    aggregation, GRU or exp update): the reference the batched implementation must match."""
    c, p = lrn.cfg, lrn.params(theta)
    e, t_len, n_out = x.shape
    n, hd = st.h.shape[1], c.hidden
    errs = torch.zeros(e, t_len, dtype=x.dtype)
    for b in range(e):
        h = [p["h0"] + c.init_noise * st.eps[b, i] for i in range(n)]
        h0 = [hi.clone() for hi in h]
        g = torch.zeros(n_out, dtype=x.dtype)
        nact = int(y[b, 0]) + 1
        for t in range(t_len):
            tgt = x[b, t, :nact]
            fb = c.feedback_scale * ((g[:nact] - tgt) ** 2).mean()
            m = [torch.tanh(p["W_m"] @ h[j] + p["b_m"]) for j in range(n)]
            new = []
            for i in range(n):
                senders = [j for j in range(n) if st.adj[b, i, j] > 0]
                a = sum((m[j] for j in senders), torch.zeros(c.msg, dtype=x.dtype)) / max(1, len(senders))
                xi = torch.cat([fb.view(1), torch.log(fb + 1e-4).view(1), a, st.ids[b, i]])
                gx = p["W_x"] @ xi + p["b"]
                z = torch.sigmoid(gx[:hd] + p["U_g"][:hd] @ h[i])
                r = torch.sigmoid(gx[hd:2 * hd] + p["U_g"][hd:2 * hd] @ h[i])
                v = torch.tanh(gx[2 * hd:] + p["U_v"] @ (r * h[i]))
                hn = z * h[i] + (1 - z) * v
                if c.update == "exp":
                    hn = c.exp_a * h0[i] + c.exp_b * hn
                new.append(hn)
            h = new
            g = torch.zeros(n_out, dtype=x.dtype)
            g[:nact] = (p["W_o"] @ (sum(h) / n) + p["b_o"])[:nact]
            errs[b, t] = c.feedback_scale * ((g[:nact] - x[b, t, :nact]) ** 2).mean()
    return errs


@pytest.mark.parametrize("update", ["gru", "exp"])
def test_batched_unroll_matches_per_expert_loops(update):
    cfg = BadgerConfig(n_experts=5, hidden=6, msg=3, id_dim=2, init_noise=0.3, topology="er", p=0.4,
                       update=update)
    lrn = MicroBadger(cfg)
    theta = lrn.init_theta(_gen(1), dtype=torch.float64)
    b = make_family("guessing[n=1-3]").sample(3, 6, seed=2)
    x = b.x.double()
    st = lrn.init_state(3, 3, 3, _gen(4), dtype=torch.float64)
    out = lrn.unroll(theta, x, b.y, 3, state=st)
    ref = _naive_unroll(lrn, theta, x, b.y, st)
    assert torch.allclose(out.error, ref, atol=1e-10)
    # logits are the guesses: the error is c·mean over the active coordinates of (g - y)²
    n = (b.y[:, 0] + 1).double()
    mask = torch.arange(3)[None] < n[:, None]
    recomputed = 3 * (((out.logits - x) ** 2) * mask[:, None]).sum(-1) / n[:, None]
    assert torch.allclose(recomputed, out.error, atol=1e-12)


@pytest.mark.parametrize("readout,agg", [("pooled", "attention"), ("designated", "sum"), ("attention", "mean")])
def test_per_episode_theta_equals_shared(readout, agg):
    lrn = MicroBadger(BadgerConfig(n_experts=4, n_experts_max=6, readout=readout, aggregation=agg, id_dim=3,
                                   feed_own_output=True, hidden=8))
    theta = lrn.init_theta(_gen(0), dtype=torch.float64)
    b = make_family("guessing[n=2-4]").sample(5, 4, seed=1)
    x = b.x.double()
    a = lrn.unroll(theta, x, b.y, 4, generator=_gen(7))
    pop = theta[None].repeat(5, 1)
    pop[2] += 0.1                                                           # a different member changes only row 2
    c = lrn.unroll(pop, x, b.y, 4, generator=_gen(7))
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.allclose(a.error[keep], c.error[keep], atol=1e-12)
    assert not torch.allclose(a.error[2], c.error[2])


def test_symmetry_and_symmetry_breakers():
    b = make_family("guessing[n=3]").sample(4, 5, seed=0)

    def spread(**kw):
        lrn = MicroBadger(BadgerConfig(n_experts=6, **kw), record_states=True)
        out = lrn.unroll(lrn.init_theta(_gen(0)), b.x, b.y, 3, generator=_gen(1))
        return float((out.hidden - out.hidden.mean(2, keepdim=True)).abs().max())   # across experts

    assert spread(topology="complete") < 1e-6                               # perfectly symmetric
    # mean aggregation over any graph where everyone receives something keeps the symmetry ...
    assert spread(topology="ring", k=1) < 1e-6
    # ... sum aggregation over unequal in-degrees breaks it, and so do the explicit breakers
    assert spread(topology="kout", k=2, aggregation="sum") > 1e-3
    assert spread(topology="complete", id_dim=4) > 1e-3
    assert spread(topology="complete", init_noise=0.5) > 1e-3


def test_exponential_update_is_a_bounded_contraction():
    cfg = BadgerConfig(n_experts=4, update="exp", init_gain=3.0, init_noise=2.0)
    lrn = MicroBadger(cfg, record_states=True)
    theta = lrn.init_theta(_gen(0))
    b = make_family("guessing[n=3]").sample(8, 300, seed=0)
    st = lrn.init_state(8, 3, 3, _gen(1))
    out = lrn.unroll(theta, b.x, b.y, 3, state=st)
    h0 = (lrn.params(theta)["h0"] + cfg.init_noise * st.eps).abs().amax(-1)          # [E, n]
    bound = (cfg.exp_a * h0 + cfg.exp_b * 1.0) / (1 - cfg.exp_b)            # |v| <= 1 (tanh candidate)
    assert (out.hidden.abs().amax(-1) <= bound[:, None] + 1e-5).all()
    assert torch.isfinite(out.error).all()


def test_meta_loss_weighting():
    w = meta_loss_weights("exp", 6, base=2.0, window=3)
    assert torch.allclose(w, torch.tensor([0, 0, 0, 1 / 7, 2 / 7, 4 / 7]))
    b = make_family("guessing[n=2]").sample(3, 5, seed=0)
    for kind in ("last", "mean", "exp"):
        lrn = MicroBadger(BadgerConfig(meta_loss=kind, exp_window=2))
        out = lrn.unroll(lrn.init_theta(_gen(0)), b.x, b.y, 2, generator=_gen(0))
        want = {"last": out.error[:, -1], "mean": out.error.mean(1),
                "exp": (out.error[:, -2] + 2 * out.error[:, -1]) / 3}[kind]
        assert torch.allclose(out.loss.mean(1), want, atol=1e-6)            # what every estimator reads


def test_padding_experts_do_not_change_the_result():
    b = make_family("guessing[n=2]").sample(3, 5, seed=0)
    small = MicroBadger(BadgerConfig(n_experts=4, topology="complete"))
    big = MicroBadger(BadgerConfig(n_experts=4, n_experts_max=7, topology="complete"))
    theta = small.init_theta(_gen(0))
    st = big.init_state(3, 2, 2, _gen(3))
    st.alive[:] = 0
    st.alive[:, :4] = 1
    st.adj = sample_topology("complete", 3, 7, alive=st.alive.bool())
    a = small.unroll(theta, b.x, b.y, 2, generator=_gen(1))
    c = big.unroll(theta, b.x, b.y, 2, state=st)
    assert torch.allclose(a.error, c.error, atol=1e-6)


def test_bptt_gradient_matches_finite_differences():
    lrn = MicroBadger(BadgerConfig(n_experts=3, hidden=4, msg=2, id_dim=1, init_noise=0.2, aggregation="attention",
                                   readout="attention", update="exp", meta_loss="last"))
    theta = lrn.init_theta(_gen(0), dtype=torch.float64)
    b = make_family("guessing[n=2]").sample(4, 5, seed=0)
    x = b.x.double()
    st = lrn.init_state(4, 2, 2, _gen(1), dtype=torch.float64)
    g, m = bptt_gradient(lrn, theta, x, b.y, 2, BPTTConfig(truncation=0, clip_grad_norm=0), state=st)
    d = torch.randn(theta.shape, generator=_gen(2), dtype=torch.float64)
    f = lambda th: float(lrn.unroll(th, x, b.y, 2, state=st).loss.mean())
    eps = 1e-6
    fd = (f(theta + eps * d) - f(theta - eps * d)) / (2 * eps)
    assert float(g @ d) == pytest.approx(fd, rel=1e-5)
    assert m["loss"] == pytest.approx(f(theta))


def test_attention_aggregation_without_in_neighbours_has_finite_gradients():
    lrn = MicroBadger(BadgerConfig(n_experts=4, aggregation="attention", topology="er", p=0.0))
    b = make_family("guessing[n=2]").sample(3, 4, seed=0)
    g, m = bptt_gradient(lrn, lrn.init_theta(_gen(0)), b.x, b.y, 2, BPTTConfig(truncation=0), _gen(1))
    assert m["nonfinite"] == 0 and torch.isfinite(g).all()


def test_es_estimator_drives_the_badger():
    from vsml.estimators.es import ESConfig
    from vsml.estimators.core import ESEstimator
    lrn = MicroBadger(BadgerConfig(n_experts=4))
    est = ESEstimator(lrn, ESConfig(pairs=4, sigma=0.05))
    b = make_family("guessing[n=2]").sample(4, 6, seed=0)
    grad, m = est.estimate(lrn.init_theta(_gen(0)), b.x, b.y, 2, step=0)
    assert grad.shape == (lrn.num_params,) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_meta_training_escapes_chance_on_one_number():
    """BPTT + Adam learns the 1-number game far below chance within 150 meta-steps (~5 s), while the
    first guess stays at chance: it is made knowing only |y| (e_1 = 3y²), so no learner can beat 1 there
    without seeing the hidden target."""
    lrn = MicroBadger(BadgerConfig(n_experts=1, hidden=16, meta_loss="mean"))
    theta = torch.nn.Parameter(lrn.init_theta(_gen(0)))
    opt = torch.optim.Adam([theta], lr=1e-2)
    fam = make_family("guessing[n=1]")
    cfg = BPTTConfig(truncation=0, clip_grad_norm=1.0)
    for s in range(150):
        b = fam.sample(16, 6, seed=s)
        g, _ = bptt_gradient(lrn, theta.detach(), b.x, b.y, 1, cfg, _gen(s))
        theta.grad = g
        opt.step()
    b = fam.sample(512, 6, seed=0, split="test")
    with torch.no_grad():
        out = lrn.unroll(theta.detach(), b.x, b.y, 1, generator=_gen(9))
    assert float(out.error[:, -1].mean()) < 0.1            # measured 0.003-0.009 over three seeds
    assert float(out.error[:, 0].mean()) > 0.9


# ------------------------------------------------------------------------------------ train.py / eval.py

def test_train_config_checks():
    from vsml.training.config import TrainConfig
    with pytest.raises(ConfigError, match="Guessing-Game task"):
        TrainConfig(learner="badger", task="digits")
    with pytest.raises(ConfigError, match="--learner badger"):
        TrainConfig(learner="vsml", task="guessing")


def test_train_and_eval_end_to_end(tmp_path):
    import eval as eval_cli
    import train as train_cli
    args = ["--preset", "badger", "--steps", "4", "--eval.every", "2", "--eval.episodes", "48", "--log.every", "1",
            "--ckpt_every", "2", "--badger.n_experts", "3", "--badger.hidden", "4", "--meta_batch", "4",
            "--episode_length", "5", "--eval.length", "5", "--out_dir", str(tmp_path), "--name", "b",
            "--log.progress", "false"]
    assert train_cli.main(args) == 0
    rd = tmp_path / "b"
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert any("meta_train/loss" in r for r in rows)
    assert any(any(k.startswith("meta_test/") and k.endswith("/error_last") for k in r) for r in rows)
    ana = [json.loads(line) for line in (rd / "badger_analysis.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ana] == [2, 4] and "mi_by_t" in ana[0] and len(ana[0]["error_curve"]) == 5
    res = json.loads((rd / "meta_test" / "results.json").read_text())
    (task,) = res
    assert res[task]["badger"]["length"] == 5 and (rd / "meta_test").glob("badger_*.png")
    # exact resume continues from the checkpoint
    assert train_cli.main(["--resume", str(rd), "--steps", "6", "--log.progress", "false"]) == 0
    steps = [json.loads(line)["step"] for line in (rd / "metrics.jsonl").read_text().splitlines()
             if "meta_train/loss" in line]
    assert steps[-1] == 6 and 5 in steps
    # eval.py on the run directory: meta-test + the run's plots
    assert eval_cli.main(["--checkpoint", str(rd), "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "badger_train_loss.png").exists()
    assert list((tmp_path / "ev").glob("badger_info_*.png")) and (tmp_path / "ev" / "results.json").exists()


def test_experiment_run_is_train_resumed_per_segment(tmp_path):
    """experiments/badger.py meta-trains through train() (resumed after each analysis step): one loss per
    meta-step, analyses at 0, every eval_every steps and the inner-info steps."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("badger_exp", Path(__file__).resolve().parents[1] / "experiments"
                                                  / "badger.py")
    bx = importlib.util.module_from_spec(spec)
    sys.modules["badger_exp"] = bx
    spec.loader.exec_module(bx)
    assert bx.segment_ends(7, 3, (5, 9)) == [3, 5, 6, 7]
    cfg = BadgerConfig(n_experts=3, hidden=4)
    r = bx.train_run("r", cfg, "guessing[n=2]", 4, 0, tmp_path, batch=4, length=5, eval_every=2, eval_episodes=8,
                     inner_info_at=(1,))
    assert len(r["loss"]) == 4 and all(math.isfinite(v) for v in r["loss"])
    assert [e["step"] for e in r["evals"]] == [0, 1, 2, 4]
    assert "binding_inner" in r["evals"][1] and "binding_inner" not in r["evals"][2]
    assert len((tmp_path / "r" / "analyses.jsonl").read_text().splitlines()) == 4
