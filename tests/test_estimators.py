"""The estimator protocol and registry (vsml/estimators/base.py, registry.py): every registered estimator
runs behind one signature, its state round-trips through a checkpoint, a new estimator trains without
touching the trainer, sharded parts combine to the one-process estimate, and checkpoints written by the
code before the protocol (tests/data/ckpt_v1, from 94109d8) still resume to the same θ."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import train as train_cli
from tasks import make_family
from vsml.engine.config import SubLSTMConfig, VSMLConfig
from vsml.engine.network import VSMLNetwork
from vsml.estimators import base
from vsml.estimators.base import MetaGradientEstimator, Problem
from vsml.estimators.bptt import BPTTConfig
from vsml.estimators.core import BPTTEstimator, ESEstimator
from vsml.estimators.es import ESConfig
from vsml.estimators.registry import build, names
from vsml.training.checkpoint import load_checkpoint, load_theta
from vsml.training.config import TrainConfig
from vsml.training.presets import get
from vsml.training.trainer import train

V1 = Path(__file__).resolve().parent / "data" / "ckpt_v1"


def _cfg(**kw) -> TrainConfig:
    """The tiny preset on 4x4 digits: every estimator's section small enough to run in a second."""
    base_cfg = get("tiny")
    kw.setdefault("bptt", dataclasses.replace(base_cfg.bptt, truncation=3))
    kw = {"task": "digits+resize4+proj", "meta_batch": 2, "episode_length": 8, **kw}
    return dataclasses.replace(
        base_cfg,
        clone=dataclasses.replace(base_cfg.clone, steps=0),
        pes=dataclasses.replace(base_cfg.pes, particles=2, truncation=3, horizon=5),
        bmg=dataclasses.replace(base_cfg.bmg, k_steps=2, l_steps=2, probe=2),
        eval=dataclasses.replace(base_cfg.eval, every=0, tasks="digits+resize4"), **kw)


def _problem(cfg: TrainConfig) -> Problem:
    fam = make_family(cfg.task)
    fam.prepare(("train",))
    return Problem(VSMLNetwork(cfg.vsml, compile=False), fam, seed=cfg.seed)


def test_registry_names_are_the_configs_estimator_choices():
    import typing
    choices = typing.get_args(typing.get_type_hints(TrainConfig)["estimator"])
    assert set(names()) == set(choices) == {"es", "pes", "tes", "bptt", "tbptt", "bmg", "clone"}
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        build("nope", _cfg(), None)


@pytest.mark.parametrize("name", ["es", "pes", "tes", "bptt", "tbptt", "bmg", "clone"])
def test_every_estimator_runs_behind_the_protocol_and_its_state_round_trips(tmp_path, name):
    cfg = _cfg()
    problem = _problem(cfg)
    est = build(name, cfg, problem)
    assert isinstance(est, MetaGradientEstimator)
    theta = problem.learner.init_theta(torch.Generator().manual_seed(0))
    state = est.init(theta)
    grad, metrics, state = est.step(theta, state, 0)
    assert grad.shape == theta.shape and torch.isfinite(grad).all()
    assert est.loss_metric in metrics
    # through a checkpoint-like round trip (plain tensors), the next step is bit-identical
    saved = est.state_dict(state)
    torch.save(saved, tmp_path / "state.pt")
    restored = est.load_state_dict(theta, torch.load(tmp_path / "state.pt", weights_only=True))
    g1, m1, _ = est.step(theta, state, 1)
    g2, m2, _ = est.step(theta, restored, 1)
    assert torch.equal(g1, g2) and m1 == m2
    if name in ("pes", "tes"):
        assert saved["has_inner"] and saved["t"] == 3
    elif name == "tbptt":
        assert saved["streams"][0]["pos"] == 3 and m1["window_start"] == 3.0
        # a checkpoint from before streams (the one stream's dict itself) resumes the same way
        g3, m3, _ = est.step(theta, est.load_state_dict(theta, saved["streams"][0]), 1)
        assert torch.equal(g1, g3) and m1 == m3
    else:
        assert saved == {} and state is None


def test_a_new_estimator_trains_without_touching_the_trainer(tmp_path, monkeypatch):
    """A registered estimator with its own state (a step counter) runs, checkpoints and resumes."""

    @dataclasses.dataclass
    class CountingZero:
        loss_metric: str = "loss"

        def init(self, theta):
            return {"n": 0}

        def step(self, theta, state, step):
            return torch.zeros_like(theta), {"loss": float(state["n"])}, {"n": state["n"] + 1}

        def state_dict(self, state):
            return dict(state)

        def load_state_dict(self, theta, d):
            return dict(d)

    monkeypatch.setitem(base.REGISTRY, "counting-zero", lambda cfg, problem: CountingZero())
    cfg = _cfg(estimator="counting-zero", steps=2, out_dir=str(tmp_path), name="z")
    rd = train(cfg)
    assert load_checkpoint(rd)["extra"]["estimator"]["meta"] == {"n": 2}
    train(dataclasses.replace(cfg, steps=3), resume=str(rd))
    assert load_checkpoint(rd)["extra"]["estimator"]["meta"] == {"n": 3}


def test_sharded_parts_combine_to_the_one_process_estimate():
    """partial over a partition of the parts, combined as ShardedEstimator does, == estimate."""
    net = VSMLNetwork(VSMLConfig(cell=SubLSTMConfig(hidden=4, msg=2)), compile=False)
    theta = net.init_theta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 5, 4, generator=g), torch.randint(0, 2, (3, 5), generator=g)
    es = ESEstimator(net, ESConfig(pairs=3, sigma=0.1, seed=2))
    rows = torch.cat([es.partial(theta, x, y, 2, 7, range(0, 1)), es.partial(theta, x, y, 2, 7, range(1, 3))])
    g_sh, m_sh = es.reduce(theta, rows, 7)
    g_one, m_one = es.estimate(theta, x, y, 2, 7)
    assert torch.equal(g_sh, g_one) and m_sh == m_one                      # ES: bit-identical
    bp = BPTTEstimator(net, BPTTConfig(truncation=2, clip_grad_norm=1e-3), seed=3)
    total = bp.partial(theta, x, y, 2, 7, range(0, 2)) + bp.partial(theta, x, y, 2, 7, range(2, 3))
    g_sh, m_sh = bp.reduce(theta, total, 7)
    g_one, m_one = bp.estimate(theta, x, y, 2, 7)
    torch.testing.assert_close(g_sh, g_one, rtol=1e-5, atol=1e-9)          # BPTT: summation order
    assert m_sh["clipped"] == m_one["clipped"] == 1.0 and m_sh["truncations"] == m_one["truncations"] == 3.0


@pytest.mark.parametrize("name,steps", [("es", 5), ("pes", 5)])
def test_v1_checkpoint_resumes_to_the_theta_of_the_old_code(tmp_path, name, steps):
    """tests/data/ckpt_v1/{es,pes}.pt: written by 94109d8 (tiny preset on digits+resize4+proj; ES after 2
    cloning steps, PES mid-episode with its inner states in extra["pes"]); {name}_step*.safetensors: the θ
    the old code reached when it resumed them.  The new code must reach the same θ, bit for bit."""
    rd = tmp_path / name
    (rd / "checkpoints").mkdir(parents=True)
    shutil.copy(V1 / f"{name}.pt", rd / "checkpoints" / "last.pt")
    assert train_cli.main(["--resume", str(rd), "--steps", str(steps), "--log.progress", "false",
                           "--eval.every", "0"]) == 0
    expected = next(V1.glob(f"{name}_step*.safetensors"))
    want, _, want_step = load_theta(expected)
    ck = load_checkpoint(rd)
    assert ck["step"] == int(want_step["step"])
    assert torch.equal(ck["theta"], want)
    if name == "pes":                              # the v1 extra["pes"] became the meta phase's state
        assert set(ck["extra"]["estimator"]["meta"]) == {"t", "episode", "accum", "has_inner", "inner_leaves"}


def test_evaluate_takes_pluggable_correctness_metrics():
    """vsml.evaluation.evaluate.evaluate(metrics=[...]): acc@s over the window (0.8 s, s] of the same episodes."""
    from vsml.evaluation.evaluate import FrozenLearner, acc_at_steps, evaluate, log_binned_curve
    from vsml.learners import registry
    sgd = registry.build("sgd")
    fl = FrozenLearner("sgd", sgd, sgd.init_theta())
    res = evaluate([fl], ["digits"], 3, 50, seed=22, metrics=[acc_at_steps([10, 50, 99]), log_binned_curve(5)])
    r = res["digits"]["sgd"]
    assert set(r) >= {"online_accuracy", "acc@10", "ci@10", "acc@50", "curve_x", "curve_y"} and "acc@99" not in r
    from tasks.base import derive_seed                # the protocol's one batch of 3 episodes
    batch = make_family("digits").sample(3, 50, derive_seed(22, "eval-batch", 0), "test")
    correct = fl.run(batch)["correct"].double()       # [3, 50]
    assert r["acc@50"] == pytest.approx(float(correct[:, 40:50].mean()))
    assert r["acc@10"] == pytest.approx(float(correct[:, 8:10].mean()))
    assert len(r["curve_x"]) == len(r["curve_y"])


def test_distribute_estimator_shards_replicates_or_refuses():
    """Under several processes: ES / BPTT / shallow cloning get the ShardedEstimator wrapper, deep cloning
    stays replicated, PES (per-particle states across steps) is refused; one process: unchanged."""
    from vsml.engine.config import ConfigError
    from vsml.training.distributed import DistContext, ShardedEstimator, distribute_estimator
    two = DistContext(rank=0, world_size=2, launched=True, backend="gloo")
    cfg = _cfg()
    problem = _problem(cfg)
    for name in ("es", "bptt", "clone"):
        est = build(name, cfg, problem)
        assert distribute_estimator(est, DistContext()) is est
        sharded = distribute_estimator(est, two)
        assert isinstance(sharded.inner, ShardedEstimator) and sharded.inner.inner is est.inner
    deep_cfg = _cfg(vsml=dataclasses.replace(cfg.vsml, backward_pass=True, bwd_reset=True))
    deep = build("clone", deep_cfg, _problem(deep_cfg))
    assert distribute_estimator(deep, two) is deep
    with pytest.raises(ConfigError, match="no multi-process version"):
        distribute_estimator(build("pes", cfg, problem), two)
    assert not hasattr(deep.inner, "partial")          # deep cloning is not a CloneEstimator with a broken partial
    from vsml.estimators.base import capabilities
    assert {n: capabilities(n).distributed for n in ("es", "bptt", "clone", "pes", "tes", "bmg", "tbptt")} == {
        "es": "shard", "bptt": "shard", "clone": "shard", "pes": "refuse", "tes": "refuse", "bmg": "refuse",
        "tbptt": "refuse"}


def test_tbptt_windows_add_up_to_truncated_bptt():
    """One episode of 8 ticks in windows of 3: the tbptt steps' gradients at a fixed θ, weighted by their
    window's share of the episode, sum to truncated BPTT's gradient of the whole episode; then new episodes."""
    cfg = _cfg(bptt=BPTTConfig(truncation=3, clip_grad_norm=0.0))
    problem = _problem(cfg)
    theta = problem.learner.init_theta(torch.Generator().manual_seed(0))
    want, m_bptt, _ = build("bptt", cfg, problem).step(theta, None, 0)
    est = build("tbptt", cfg, problem)
    state, total, starts, loss = None, torch.zeros_like(theta), [], 0.0
    for s, k in zip(range(3), (3, 3, 2)):
        g, m, state = est.step(theta, state, s)
        total += g * k / 8
        loss += m["loss"] * k / 8
        starts.append(m["window_start"])
    assert starts == [0.0, 3.0, 6.0]
    torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(m_bptt["loss"], rel=1e-5)
    _, m, state = est.step(theta, state, 3)                 # used up: step 3's batch starts
    assert m["window_start"] == 0.0 and state[0]["pos"] == 3
    b3 = problem.batch(cfg.meta_batch, cfg.episode_length, 3)
    assert torch.equal(state[0]["x"], b3.x.reshape(state[0]["x"].shape))


def test_tbptt_streams_mix_staggered_windows_of_independent_episodes():
    """Two streams of one episode of 9 ticks in windows of 3: stream 1 is burned in (forward only) to tick 3,
    so one meta-step's gradient is the mean of a window [0, 3) of stream 0's episode and a window [3, 6) of
    stream 1's, each from its own initial state; a used-up stream draws its own new episode, the other goes on."""
    from tasks.base import derive_seed
    from vsml.estimators.es import pair_seed
    from vsml.learners.base import state_detach, state_generator
    cfg = _cfg(estimator="tbptt", episode_length=9, bptt=BPTTConfig(truncation=3, clip_grad_norm=0.0, streams=2))
    problem = _problem(cfg)
    est = build("tbptt", cfg, problem)
    assert est.offsets == [0, 3]
    theta = problem.learner.init_theta(torch.Generator().manual_seed(0))
    net = problem.learner

    def window(g, step, t0, state=None):   # stream g's episode drawn at `step`, its window [t0, t0 + 3)
        b = problem.sample(1, 9, derive_seed(problem.seed, "meta-train-data", step, "stream", g))
        if state is None:
            gen = state_generator(net, pair_seed(cfg.seed, step, -1 - g))
            state = net.init_state(1, b.x.shape[2], b.num_classes, gen, theta.dtype, theta.device)
            if t0:
                with torch.no_grad():
                    state = net.unroll(theta, b.x[:, :t0], b.y[:, :t0], b.num_classes, state=state).state
        th = theta.clone().requires_grad_(True)
        out = net.unroll(th, b.x[:, t0:t0 + 3], b.y[:, t0:t0 + 3], b.num_classes, state=state_detach(state))
        (g_,) = torch.autograd.grad(out.loss.sum(), th)
        return g_, float(out.loss.sum().detach()), out.state

    g0, l0, s0 = window(0, 0, 0)
    g1, l1, _ = window(1, 0, 3)
    grad, m, state = est.step(theta, None, 0)
    torch.testing.assert_close(grad, (g0 + g1) / 6, rtol=1e-4, atol=1e-7)
    assert m["loss"] == pytest.approx((l0 + l1) / 6, rel=1e-5)
    assert (m["window_start_s0"], m["window_start_s1"]) == (0.0, 3.0)
    assert m["loss_s0"] == pytest.approx(l0 / 3, rel=1e-5) and m["loss_s1"] == pytest.approx(l1 / 3, rel=1e-5)
    assert [s["pos"] for s in state] == [3, 6]
    _, m, state = est.step(theta, state, 1)
    assert (m["window_start_s0"], m["window_start_s1"]) == (3.0, 6.0) and [s["pos"] for s in state] == [6, 9]
    # step 2: stream 1 is used up and draws step 2's episode from tick 0; stream 0 finishes its first one
    g0, l0, _ = window(0, 0, 6, state=state[0]["state"])
    g1, l1, _ = window(1, 2, 0)
    grad, m, state = est.step(theta, state, 2)
    assert (m["window_start_s0"], m["window_start_s1"]) == (6.0, 0.0)
    torch.testing.assert_close(grad, (g0 + g1) / 6, rtol=1e-4, atol=1e-7)
    b2 = problem.sample(1, 9, derive_seed(problem.seed, "meta-train-data", 2, "stream", 1))
    assert torch.equal(state[1]["x"], b2.x.reshape(state[1]["x"].shape))


@pytest.mark.parametrize("task", ["digits+resize4+proj", "mix:digits+resize4+proj,digits+resize4+proj+classes5"])
def test_tbptt_streams_batched_by_shape_equal_streams_unrolled_one_by_one(task, monkeypatch):
    """Streams with equal shapes share one unroll; the step equals the step with every stream on its own
    (the mix: 10- and 5-class episodes, which cannot share one)."""
    from vsml.estimators.core import CarriedBPTTEstimator
    cfg = _cfg(estimator="tbptt", task=task, meta_batch=4, episode_length=9,
               bptt=BPTTConfig(truncation=3, clip_grad_norm=0.0, streams=4))
    problem = _problem(cfg)
    theta = problem.learner.init_theta(torch.Generator().manual_seed(0))
    runs = []
    for alone in (False, True):
        if alone:
            monkeypatch.setattr(CarriedBPTTEstimator, "_group_key", lambda self, s: id(s))
        est, state, out = build("tbptt", cfg, problem), None, []
        for step in range(4):
            g, m, state = est.step(theta, state, step)
            out.append((g, m, [s["num_classes"] for s in state]))
        runs.append(out)
    for (ga, ma, ca), (gb, mb, cb) in zip(*runs):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
        assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], rel=1e-5) for k in ma) and ca == cb
    if task.startswith("mix"):          # both kinds of episode were drawn, so both kinds of group ran
        assert {c for _, _, cs in runs[0] for c in cs} == {5, 10}


def test_tbptt_streams_need_tbptt_and_a_dividing_meta_batch(tmp_path, capsys):
    from vsml.engine.config import ConfigError
    with pytest.raises(ConfigError, match="bptt.streams=2 .* needs --estimator tbptt"):
        _cfg(estimator="bptt", bptt=BPTTConfig(truncation=3, streams=2))
    with pytest.raises(ConfigError, match="meta_batch divisible"):
        _cfg(estimator="tbptt", meta_batch=3, bptt=BPTTConfig(truncation=3, streams=2))
    with pytest.raises(ValueError, match="BPTTConfig.streams must be an integer >= 1"):
        BPTTConfig(streams=0)
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--preset", "tiny", "--estimator", "bptt", "--bptt.streams", "2", "--out_dir",
                        str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "bptt.streams=2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # a resume with another stream count than the checkpoint carries: exit 2, one line
    base_args = ["--preset", "tiny", "--estimator", "tbptt", "--meta_batch", "2", "--bptt.truncation", "3",
                 "--episode_length", "9", "--bptt.streams", "2", "--steps", "2", "--eval.every", "0",
                 "--log.progress", "false", "--out_dir", str(tmp_path), "--name", "s"]
    assert train_cli.main(base_args) == 0
    capsys.readouterr()
    rc = train_cli.main(["--resume", str(tmp_path / "s"), "--steps", "4", "--bptt.streams", "1"])
    assert rc == 2 and "carries 2 tbptt streams but bptt.streams=1" in capsys.readouterr().err


def test_tbptt_needs_a_window_shorter_than_the_episode(tmp_path, capsys):
    from vsml.engine.config import ConfigError
    with pytest.raises(ConfigError, match="0 < bptt.truncation < episode_length"):
        _cfg(estimator="tbptt", bptt=BPTTConfig(truncation=8))
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--preset", "tiny", "--estimator", "tbptt", "--out_dir", str(tmp_path), "--name", "x"])
    assert exc.value.code == 2 and "0 < bptt.truncation < episode_length" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tbptt_nonfinite_window_is_a_zero_step_reported_and_restarts_the_episodes():
    cfg = _cfg(estimator="tbptt")
    problem = _problem(cfg)
    est = build("tbptt", cfg, problem)
    theta = problem.learner.init_theta(torch.Generator().manual_seed(0))
    _, _, state = est.step(theta, None, 0)
    g, m, state = est.step(torch.full_like(theta, float("nan")), state, 1)
    assert m["nonfinite"] == 1.0 and torch.equal(g, torch.zeros_like(g))
    assert state[0]["pos"] == state[0]["x"].shape[1]              # used up: the next step draws new episodes
    _, m, state = est.step(theta, state, 2)
    assert m["window_start"] == 0.0 and m["nonfinite"] == 0.0
