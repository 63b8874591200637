"""Unit tests of the long-horizon study's bookkeeping (experiments/horizon_study.py): compute units
per arm, windowed accuracies, the "accuracy at 10H vs H" verdict, config validation.  The study
itself is an experiment (minutes to an hour), not run here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from vsml.engine.config import ConfigError

_spec = importlib.util.spec_from_file_location(
    "horizon_study", Path(__file__).resolve().parents[1] / "experiments" / "horizon_study.py")
hs = importlib.util.module_from_spec(_spec)
sys.modules["horizon_study"] = hs            # dataclasses look the module up
_spec.loader.exec_module(hs)


def test_every_arm_builds_a_valid_train_config_and_counts_units():
    sc = hs.StudyConfig(pairs=16)
    for arm in hs.ARMS:
        _label, horizon, overrides, units = hs._arm(arm, sc)
        cfg = hs._base_cfg(sc, "vsml", arm, **overrides)          # TrainConfig validates
        assert units > 0 and horizon in (50, 500, 2000)
        if cfg.estimator == "es":
            assert units == 2 * 16 * cfg.episode_length and horizon == cfg.episode_length
        if cfg.estimator in ("pes", "tes"):
            assert units == 2 * 16 * cfg.pes.truncation and horizon == cfg.pes.horizon
        if cfg.estimator == "bptt":
            assert units == 3 * cfg.meta_batch * cfg.episode_length
        if cfg.estimator == "bmg":
            b = cfg.bmg
            assert b.k_steps + b.l_steps == horizon and cfg.episode_length == b.episode_length
            assert units == cfg.meta_batch * (3 * b.k_steps + b.l_steps + 4 * b.probe)


def test_window_accuracy_and_goal_verdict():
    correct = np.zeros((4, 1000))
    correct[:, 400:] = 1.0                                        # learns at step 400
    from vsml.evaluation.evaluate import acc_at_steps, log_binned_curve
    res = {**acc_at_steps(hs.STEPS_REPORTED)(correct), **log_binned_curve()(correct)}
    assert res["acc@500"] == 1.0 and res["ci@500"] == 0.0          # steps (400, 500]
    assert res["acc@50"] == 0.0 and "acc@2000" not in res
    r = {"horizon": 50, "meta_test": {"t": {"acc@50": 0.2, "ci@50": 0.05, "acc@500": 0.6, "ci@500": 0.05}}}
    assert hs._goal(r, "t").endswith("(10H: yes)")
    r["meta_test"]["t"]["acc@500"] = 0.21
    assert "n.s." in hs._goal(r, "t")
    xs, ys = res["curve_x"], res["curve_y"]
    assert len(xs) == len(ys) and xs == sorted(xs) and ys[-1] == 1.0 and ys[0] == 0.0


@pytest.mark.parametrize("kw", [{"arms": "es50,nope"}, {"learners": "hebbian"}, {"budget": 0}])
def test_study_config_validation(kw):
    with pytest.raises(ConfigError):
        hs.StudyConfig(**kw)


def test_acc_at_prefers_the_short_episode_set_and_the_goal_uses_it():
    mt = {"acc@50": 0.40, "ci@50": 0.10, "acc@500": 0.45, "ci@500": 0.05, "acc@5000": 0.5, "ci@5000": 0.01,
          "short": {"acc@50": 0.30, "ci@50": 0.01, "acc@500": 0.44, "ci@500": 0.01}}
    assert hs.acc_at(mt, 50) == (0.30, 0.01) and hs.acc_at(mt, 5000) == (0.5, 0.01)
    assert hs.acc_at(mt, 2000) is None
    assert hs._goal({"horizon": 50, "meta_test": {"t": mt}}, "t") == "+0.140 (10H: yes)"   # 0.44 − 0.30
    del mt["short"]
    assert hs._goal({"horizon": 50, "meta_test": {"t": mt}}, "t") == "+0.050 (10H: n.s.)"  # long set only


def test_short_meta_test_settings_are_validated():
    with pytest.raises(ConfigError, match="eval_short"):
        hs.StudyConfig(eval_short_episodes=1)
    with pytest.raises(ConfigError, match="eval_short"):
        hs.StudyConfig(eval_short_length=20_000)
    hs.StudyConfig(eval_short_episodes=0, eval_short_length=20_000)      # off: length ignored


def test_remeasure_adds_missing_tasks_and_short_sets_to_finished_arms(tmp_path):
    task = "teacher_linear[d=8,c=3]"
    (tmp_path / "arms").mkdir()
    arm = tmp_path / "arms" / "baseline-sgd.json"
    arm.write_text('{"learner": "sgd", "arm": "baseline", "label": "online SGD", "meta_test": {}}')
    args = ["--out", str(tmp_path), "--learners", "vsml", "--remeasure", "true", "--test_tasks", task,
            "--eval_episodes", "2", "--eval_length", "60", "--eval_short_episodes", "3",
            "--eval_short_length", "50", "--wandb", "disabled"]
    assert hs.main(args) == 0
    import json
    mt = json.loads(arm.read_text())["meta_test"][task]
    assert 0.0 <= mt["acc@50"] <= 1.0 and mt["short"]["episodes"] == 3 and "acc@50" in mt["short"]
    before = arm.read_text()
    assert hs.main(args) == 0 and arm.read_text() == before          # complete: nothing re-run


def test_steps_for_budget_is_equal_compute():
    assert hs.steps_for_budget(160_000, 2 * 16 * 50) == 100
    assert hs.steps_for_budget(10, 1000) == 1                       # at least one meta-step


def test_objective_check_runs_through_evaluate(tmp_path, monkeypatch):
    """The meta-training-objective check is evaluate() on cached train-split episodes with loss@s metrics
    (a small Meta-RNN stands in for the arm's learner)."""
    from vsml.learners import registry
    net = registry.build("metarnn", hidden=8, max_in_dim=8, max_classes=3)
    theta = net.init_theta()
    monkeypatch.setattr(hs, "_frozen_theta", lambda sc, r: (net, theta))
    sc = hs.StudyConfig(out=str(tmp_path), train_task="teacher_linear[d=8,c=3]", objective_episodes=2,
                        learners="metarnn", wandb="disabled")
    o = hs.objective_check(sc, {"learner": "metarnn", "arm": "start"})
    assert set(o) == {"loss@50", "loss@500", "acc@500"}
    assert 0.0 < o["loss@50"] and 0.0 < o["loss@500"] and 0.0 <= o["acc@500"] <= 1.0
    assert hs.objective_check(sc, {"learner": "metarnn", "arm": "start"}) == o    # same cached episodes
    assert hs.objective_check(sc, {"learner": "sgd", "arm": "baseline"}) == {}


def test_report_writes_table_json_and_log_axis_plot(tmp_path):
    pytest.importorskip("matplotlib")
    sc = hs.StudyConfig(out=str(tmp_path), learners="vsml", test_tasks="t", wandb="disabled")
    mt = {"t": {"online_acc": 0.5, "acc@50": 0.4, "ci@50": 0.1, "curve_x": [1.0, 10.0, 100.0],
                "curve_y": [0.1, 0.4, 0.6]}}
    results = [{"learner": "vsml", "arm": "es50", "label": "ES H=50", "horizon": 50, "meta_test": mt},
               {"learner": "sgd", "arm": "baseline", "label": "online SGD", "meta_test": mt}]
    hs.report(sc, results, tmp_path)
    assert (tmp_path / "horizon_t.png").stat().st_size > 0 and "ES H=50" in (tmp_path / "table.md").read_text()
