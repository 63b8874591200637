"""The typed Meta-RNN architecture config (``TrainConfig.metarnn``, vsml/learners/baselines.py ``MetaRNNConfig``):
validation, that it reaches the learner, the resolved config and the checkpoint, that eval.py rebuilds
the same learner from a run, and that old configs (no ``metarnn`` key) still build the reference learner.

Run: python -m pytest tests/test_metarnn_config.py -q
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import eval as eval_cli
import train as train_cli
from vsml.learners.baselines import MetaRNN, MetaRNNConfig
from vsml.training.checkpoint import load_checkpoint, load_theta
from vsml.engine.config import ConfigError
from vsml.training.config import TrainConfig, config_from_dict
from vsml.learners.registry import build, build_learner

TINY = ["--preset", "tiny", "--log.progress", "false", "--learner", "metarnn", "--clone.steps", "0",
        "--eval.every", "0", "--steps", "2"]
COMPACT = ["--metarnn.hidden", "16", "--metarnn.max_in_dim", "64", "--metarnn.max_classes", "10"]


@pytest.mark.parametrize("kw", [{"hidden": 0}, {"micro_ticks": 0}, {"max_in_dim": 0}, {"max_classes": 1},
                                {"hidden": 2.5}, {"hidden": True}, {"tanh_bound": 0.0},
                                {"tanh_bound": float("inf")}, {"forget_bias": float("nan")}])
def test_bad_metarnn_config_is_a_config_error(kw):
    name = next(iter(kw))
    with pytest.raises(ConfigError, match=f"metarnn.{name}"):
        MetaRNNConfig(**kw)


def test_default_config_builds_the_reference_learner():
    """MetaRNNConfig() == the MetaRNN constructor defaults, so old runs rebuild bit-identically."""
    a, b = MetaRNNConfig().build(), build("metarnn")
    assert vars(a) == vars(b)
    ta = a.init_theta(torch.Generator().manual_seed(3))
    tb = b.init_theta(torch.Generator().manual_seed(3))
    assert torch.equal(ta, tb) and ta.numel() == 538_942     # 784 + 2·62 inputs, H 128, 62 classes
    # an old resolved config (written before the field existed) loads with the default
    d = TrainConfig(learner="metarnn").to_dict()
    del d["metarnn"]
    cfg = config_from_dict(d)
    assert cfg.metarnn == MetaRNNConfig() and vars(build_learner(cfg)) == vars(b)


def test_metarnn_config_reaches_the_learner_and_round_trips():
    m = MetaRNNConfig(hidden=16, micro_ticks=1, max_in_dim=64, max_classes=10, tanh_bound=50.0, forget_bias=0.5)
    cfg = TrainConfig(learner="metarnn", metarnn=m)
    net = build_learner(cfg)
    assert isinstance(net, MetaRNN)
    assert (net.hidden, net.micro_ticks, net.max_in_dim, net.max_classes, net.tanh_bound, net.forget_bias) == \
        (16, 1, 64, 10, 50.0, 0.5)
    assert net.theta_size == 4 * 16 * (64 + 20) + 4 * 16 * 16 + 4 * 16 + 10 * 16 + 10
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.metarnn == m
    with pytest.raises(ValueError, match="max_in_dim"):              # the padding limit is enforced
        net.unroll(net.init_theta(), torch.zeros(1, 3, 65), torch.zeros(1, 3, dtype=torch.long), 2)


def test_metarnn_config_reaches_checkpoint_theta_and_eval(tmp_path, capsys):
    rc = train_cli.main([*TINY, *COMPACT, "--out_dir", str(tmp_path), "--name", "m"])
    assert rc == 0
    rd = tmp_path / "m"
    want = MetaRNNConfig(hidden=16, max_in_dim=64, max_classes=10)
    ck = load_checkpoint(rd)
    assert ck["config"]["metarnn"] == dataclasses.asdict(want)
    assert json.loads((rd / "config.json").read_text())["metarnn"] == dataclasses.asdict(want)
    theta, cfg_d, _ = load_theta(rd / "theta.safetensors")
    assert theta.numel() == want.build().theta_size == config_from_dict(cfg_d).metarnn.build().theta_size
    # eval.py rebuilds the compact learner from the run (a default-config learner would reject the θ size)
    out = tmp_path / "ev"
    assert eval_cli.main(["--checkpoint", str(rd), "--tasks", "digits", "--episodes", "2", "--length", "8",
                          "--baselines", "", "--no-compile", "--out", str(out)]) == 0
    assert "metarnn" in json.loads((out / "results.json").read_text())["digits"]
    # resuming with another architecture is refused (θ would not fit)
    capsys.readouterr()
    assert train_cli.main(["--resume", str(rd), "--steps", "3", "--metarnn.hidden", "32"]) == 2
    assert "metarnn=" in capsys.readouterr().err
