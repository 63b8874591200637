"""experiments/horizon_aggregate.py: statistics over meta-training seeds of the long-horizon study, the
"goal met" rule, refusal of incomparable run folders, and the files it writes (synthetic arm results)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("horizon_aggregate", _ROOT / "experiments" / "horizon_aggregate.py")
ha = importlib.util.module_from_spec(_spec)
sys.modules["horizon_aggregate"] = ha
_spec.loader.exec_module(ha)

TASK = "teacher_linear[d=64,c=10]"


def _mt(acc: dict[int, float], ci: float = 0.01) -> dict:
    m = {"online_acc": float(np.mean(list(acc.values()))), "curve_x": [1.0, 10.0], "curve_y": [0.1, 0.2]}
    for s, v in acc.items():
        m[f"acc@{s}"], m[f"ci@{s}"] = v, ci
    return m


def _write_run(root: Path, seed: int, arms: dict[str, tuple[int | None, dict]], **cfg_over) -> Path:
    run = root / f"s{seed}"
    (run / "arms").mkdir(parents=True)
    cfg = {"seed": seed, "budget": 640000, "pairs": 16, "es_lr": 0.005, "grad_lr": 2e-4,
           "train_task": "mnist5k+resize8+proj", "test_tasks": TASK, "eval_episodes": 32,
           "eval_length": 10000, "eval_seed": 22, **cfg_over}
    (run / "study.json").write_text(json.dumps({"config": cfg, "results": []}))
    for arm, (h, acc) in arms.items():
        r = {"learner": "vsml", "arm": arm, "label": arm, "horizon": h, "meta_test": {TASK: _mt(acc)}}
        (run / "arms" / f"vsml-{arm}.json").write_text(json.dumps(r))
    return run


def _three_seeds(tmp_path: Path) -> list[Path]:
    runs = []
    for seed, (a500, a5000, b50, b500) in enumerate([(0.30, 0.36, 0.20, 0.21), (0.31, 0.38, 0.22, 0.20),
                                                     (0.29, 0.35, 0.21, 0.22)]):
        runs.append(_write_run(tmp_path, seed, {
            "es500": (500, {50: 0.1, 500: a500, 2000: 0.33, 5000: a5000, 10000: 0.37}),
            "es50": (50, {50: b50, 500: b500, 2000: 0.2, 5000: 0.2, 10000: 0.2}),
            "start": (None, {50: 0.1, 500: 0.2, 2000: 0.2, 5000: 0.2, 10000: 0.2})}))
    return runs


def test_statistics_over_seeds_and_the_goal_rule(tmp_path):
    configs, grouped = ha.load_runs(_three_seeds(tmp_path))
    a = ha.aggregate_arm(grouped[("vsml", "es500")], TASK)
    assert a["n_seeds"] == 3 and a["seeds"] == [0, 1, 2]
    assert a["acc@500"]["mean"] == pytest.approx(0.30)
    assert a["acc@500"]["sd"] == pytest.approx(np.std([0.30, 0.31, 0.29], ddof=1))
    g = a["goal"]
    ds = [0.36 - 0.30, 0.38 - 0.31, 0.35 - 0.29]
    assert (g["H"], g["at"]) == (500, 5000)
    assert g["d_per_seed"] == pytest.approx(ds)
    assert g["verdicts"] == ["yes", "yes", "yes"]          # each d > hypot(0.01, 0.01)
    assert g["d_ci95_over_seeds"] == pytest.approx(4.303 * np.std(ds, ddof=1) / math.sqrt(3))
    assert g["met"] is True
    b = ha.aggregate_arm(grouped[("vsml", "es50")], TASK)["goal"]
    assert b["verdicts"] == ["n.s.", "no", "n.s."] and b["met"] is False and b["yes"] == 0
    assert "goal" not in ha.aggregate_arm(grouped[("vsml", "start")], TASK)   # no horizon: no goal
    text, agg = ha.build_report(configs, grouped)
    assert "**met**" in text and text.count("**met**") == 1
    assert agg["arms"]["vsml/es500"][TASK]["goal"]["met"]


def test_goal_is_not_met_when_one_seed_fails(tmp_path):
    runs = _three_seeds(tmp_path)
    p = runs[1] / "arms" / "vsml-es500.json"
    r = json.loads(p.read_text())
    r["meta_test"][TASK]["acc@5000"] = 0.315                 # d = 0.005 < its interval: n.s.
    p.write_text(json.dumps(r))
    _, grouped = ha.load_runs(runs)
    g = ha.aggregate_arm(grouped[("vsml", "es500")], TASK)["goal"]
    assert g["verdicts"] == ["yes", "n.s.", "yes"] and not g["met"]


def test_h2000_uses_5h_over_a_10000_step_meta_test(tmp_path):
    run = _write_run(tmp_path, 0, {"pes2000": (2000, {50: .1, 500: .2, 2000: .3, 5000: .4, 10000: .5})})
    _, grouped = ha.load_runs([run])
    g = ha.aggregate_arm(grouped[("vsml", "pes2000")], TASK)["goal"]
    assert (g["H"], g["at"]) == (2000, 10000) and g["d_per_seed"] == pytest.approx([0.2])
    assert not g["met"]                                      # one seed never meets the goal


def test_incomparable_or_duplicate_runs_are_refused(tmp_path):
    a = _write_run(tmp_path / "a", 0, {"es500": (500, {500: .3, 5000: .4})})
    b = _write_run(tmp_path / "b", 1, {"es500": (500, {500: .3, 5000: .4})}, budget=160000)
    with pytest.raises(ha.AggregateError, match="budget"):
        ha.load_runs([a, b])
    c = _write_run(tmp_path / "c", 0, {"es500": (500, {500: .3, 5000: .4})})
    with pytest.raises(ha.AggregateError, match="same meta-training seed"):
        ha.load_runs([a, c])
    with pytest.raises(ha.AggregateError, match="no arms"):
        ha.load_runs([tmp_path / "missing"])


def test_main_writes_table_json_and_plot(tmp_path):
    runs = _three_seeds(tmp_path)
    prefix = tmp_path / "out" / "round"
    assert ha.main(["--runs", ",".join(map(str, runs)), "--out", str(prefix)]) == 0
    md = (prefix.parent / "round.md").read_text()
    assert "| vsml | es500 | 3 |" in md and "yes in 3/3" in md
    data = json.loads((prefix.parent / "round.json").read_text())
    assert len(data["per_seed"]["vsml/es500"]) == 3
    pytest.importorskip("matplotlib")
    assert list(prefix.parent.glob("round_*.png"))


def test_short_episode_set_is_used_where_it_covers_s(tmp_path):
    run = _write_run(tmp_path, 0, {"es50": (50, {50: .1, 500: .2, 2000: .3, 5000: .3, 10000: .3})})
    p = run / "arms" / "vsml-es50.json"
    r = json.loads(p.read_text())
    r["meta_test"][TASK]["short"] = {"acc@50": 0.15, "ci@50": 0.02, "acc@500": 0.25, "ci@500": 0.01}
    p.write_text(json.dumps(r))
    _, grouped = ha.load_runs([run])
    a = ha.aggregate_arm(grouped[("vsml", "es50")], TASK)
    assert a["acc@50"]["mean"] == 0.15 and a["acc@2000"]["mean"] == 0.3
    g = a["goal"]
    assert g["d_per_seed"] == pytest.approx([0.10]) and g["verdicts"] == ["yes"]   # 0.1 > hypot(.02, .01)


def test_markdown_table_is_the_studies_table_format():
    from vsml.evaluation.report import markdown_table
    assert markdown_table(["a", "b"], [[1, "x"]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["a", "b"], [[1]], "ll")
