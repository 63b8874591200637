"""The Meta-RNN side of the long-horizon study (experiments/horizon_study.py): the study's Meta-RNN
architecture reaches θ0 and every arm, the warm-start curriculum is parsed / validated and run stage by
stage from the previous θ, and the VSML runs keep the default Meta-RNN config.

Run: python -m pytest tests/test_horizon_metarnn.py -q
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vsml.learners.baselines import MetaRNN, MetaRNNConfig
from vsml.training.checkpoint import load_theta
from vsml.engine.config import ConfigError
from vsml.training.config import config_from_dict
from vsml.learners.registry import build_learner

_spec = importlib.util.spec_from_file_location(
    "horizon_study", Path(__file__).resolve().parents[1] / "experiments" / "horizon_study.py")
hs = importlib.util.module_from_spec(_spec)
sys.modules["horizon_study"] = hs            # dataclasses look the module up
_spec.loader.exec_module(hs)

SMALL = {"metarnn_hidden": 8, "metarnn_max_in_dim": 64, "metarnn_max_classes": 10, "metarnn_forget_bias": 3.0,
         "metarnn_micro_ticks": 1}


def test_curriculum_parses_into_stages_then_the_training_family():
    sc = hs.StudyConfig(metarnn_curriculum=" random[n=4,c=2,side=8]+proj+labelperm@150 ; digits+proj@7;",
                        metarnn_pretrain_steps=9)
    assert sc.metarnn_stages == [("random[n=4,c=2,side=8]+proj+labelperm", 150), ("digits+proj", 7),
                                 (sc.train_task, 9)]
    assert hs.StudyConfig(metarnn_curriculum="", metarnn_pretrain_steps=5).metarnn_stages == [(sc.train_task, 5)]


@pytest.mark.parametrize("kw", [{"metarnn_curriculum": "digits"}, {"metarnn_curriculum": "digits@0"},
                                {"metarnn_curriculum": "@5"}, {"metarnn_curriculum": "digits@x"},
                                {"metarnn_hidden": 0}, {"metarnn_max_classes": 1}, {"metarnn_pretrain_batch": 0},
                                {"metarnn_pretrain_lr": 0.0}, {"metarnn_pretrain_clip": -1.0},
                                {"metarnn_forget_bias": float("nan")}])
def test_bad_metarnn_study_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        hs.StudyConfig(**kw)


def test_every_metarnn_arm_uses_the_study_architecture():
    sc = hs.StudyConfig(**SMALL)
    want = MetaRNNConfig(hidden=8, micro_ticks=1, max_in_dim=64, max_classes=10, forget_bias=3.0)
    assert sc.metarnn_config == want
    for arm in hs.ARMS:
        _label, _h, overrides, _units = hs._arm(arm, sc)
        cfg = hs._base_cfg(sc, "metarnn", arm, **overrides)
        assert cfg.metarnn == want
        net = build_learner(cfg)
        assert isinstance(net, MetaRNN) and net.theta_size == want.build().theta_size
        assert config_from_dict(cfg.to_dict()).metarnn == want
    assert hs._base_cfg(sc, "vsml", "v").metarnn == MetaRNNConfig()       # VSML runs: untouched default


def test_warm_start_runs_the_curriculum_and_saves_the_architecture(tmp_path):
    sc = hs.StudyConfig(out=str(tmp_path), data_dir="", train_task="digits+proj", wandb="disabled",
                        metarnn_curriculum="digits+proj+classes2@2", metarnn_pretrain_steps=1,
                        metarnn_pretrain_length=4, metarnn_pretrain_batch=2, **SMALL)
    path, info = hs.warm_start(sc, "metarnn")
    theta, cfg_d, meta = load_theta(path)
    cfg = config_from_dict(cfg_d)
    assert cfg.metarnn == sc.metarnn_config and cfg.task == "digits+proj"
    assert theta.numel() == sc.metarnn_config.build().theta_size
    assert cfg.meta_batch == 2 and cfg.episode_length == 4 and cfg.bptt.truncation == 0
    stage0, final = (Path(p) for p in info["stage_run_dirs"])
    s0 = json.loads((stage0 / "config.json").read_text())
    assert s0["task"] == "digits+proj+classes2" and s0["steps"] == 2 and s0["init_from"] is None
    assert cfg.init_from == str(stage0 / "theta.safetensors") and Path(info["run_dir"]) == final
    assert "2 on digits+proj+classes2, then 1 on digits+proj" in info["how"]
    again, info2 = hs.warm_start(sc, "metarnn")                          # cached
    assert again == path and info2 == json.loads(path.with_suffix(".json").read_text())
    other = dataclasses.replace(sc, metarnn_hidden=16)                  # a cached θ0 of another architecture
    with pytest.raises(ConfigError, match="another --out"):
        hs.warm_start(other, "metarnn")


def test_study_defaults_are_the_compact_metarnn_recipe():
    sc = hs.StudyConfig()
    assert sc.metarnn_config == MetaRNNConfig(hidden=128, micro_ticks=1, max_in_dim=64, max_classes=10)
    assert (sc.metarnn_pretrain_batch, sc.metarnn_pretrain_length, sc.metarnn_pretrain_lr) == (64, 100, 3e-3)
    assert sc.metarnn_stages == [(sc.train_task, sc.metarnn_pretrain_steps)]
