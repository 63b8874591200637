"""Aggregate several meta-training seeds of the long-horizon study (issue 8) into one table and plot.

``experiments/horizon_study.py`` runs one meta-training seed per output folder (``--seed S --out DIR``);
every arm writes ``DIR/arms/<learner>-<arm>.json`` with its meta-test curves.  This script reads several
such folders (same arms, budget and meta-test episodes, different ``--seed``) and reports, per learner,
arm and meta-test task:

* online accuracy and acc@s (s = 50, 500, 2000, 5000, 10000; acc@s = mean accuracy over steps
  (0.8 s, s], read by ``horizon_study.acc_at``: from the many short meta-test episodes when they cover s)
  as mean ± standard deviation **over meta-training seeds**;
* the goal statistic d = acc(10H) − acc(H) (or acc(5H) for H = 2000, the meta-test being 10 000 steps
  long) per seed, with the per-seed verdict of the study ("yes" when d exceeds the 95% interval over
  meta-test episodes, "no" when it is below minus that interval, else "n.s."), the number of seeds with
  "yes", and the mean of d over seeds with its 95% Student-t interval over seeds.  An arm **meets the
  goal on a task** when d > 0 with a seed-level interval that excludes 0 *and* every seed says "yes".

Usage::

    python experiments/horizon_aggregate.py --runs /tmp/horizon/r3_s0,/tmp/horizon/r3_s1,/tmp/horizon/r3_s2 \\
        --out docs/horizon/round3 --wandb offline

Writes ``<out>.md`` (tables), ``<out>.json`` (every per-seed number + the aggregates, floats rounded to
5 decimals) and ``<out>_<task>.png`` (accuracy vs meta-test step on a log axis: mean over seeds, band =
min..max); with ``--wandb offline`` also a wandb summary run (tables as summary keys, the plots as images)
under ``--wandb_dir``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.horizon_study import ARMS, STEPS_REPORTED, acc_at, curve_style  # noqa: E402
from vsml.evaluation.plotting import LogCurve, plot_log_curves  # noqa: E402
from vsml.evaluation.report import markdown_table  # noqa: E402

# two-sided 97.5% Student-t quantiles for n - 1 degrees of freedom (n = number of seeds)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


class AggregateError(ValueError):
    """The run folders cannot be aggregated (missing, or run with different settings)."""


def load_runs(runs: list[Path]) -> tuple[list[dict], dict[tuple[str, str], list[dict]]]:
    """Read every ``<run>/arms/*.json``; returns (the runs' study configs, {(learner, arm): [result per run]}).

    Raises AggregateError when a folder has no arms, or when the runs differ in a setting that makes their
    numbers incomparable (budget, meta-test tasks / episodes / length / seed, training family, learning
    rates) -- only ``seed`` (and ``out``) may differ.
    """
    configs, grouped = [], {}
    for run in runs:
        arms_dir = run / "arms"
        files = sorted(arms_dir.glob("*.json")) if arms_dir.is_dir() else []
        if not files:
            raise AggregateError(f"{run}: no arms/*.json -- is this an output folder of experiments/horizon_study.py?")
        study = run / "study.json"
        cfg = json.loads(study.read_text())["config"] if study.exists() else {}
        configs.append(cfg)
        for f in files:
            r = json.loads(f.read_text())
            if "error" in r:
                print(f"[aggregate] skipping {f}: the arm failed ({r['error']})", file=sys.stderr)
                continue
            grouped.setdefault((r["learner"], r["arm"]), []).append({**r, "_run": str(run), "_seed": cfg.get("seed")})
    must_match = ("budget", "pairs", "es_lr", "grad_lr", "train_task", "test_tasks", "eval_episodes",
                  "eval_length", "eval_seed")
    for key in must_match:
        vals = {json.dumps(c.get(key)) for c in configs if c}
        if len(vals) > 1:
            raise AggregateError(f"the runs differ in {key!r} ({sorted(vals)}); only --seed may differ between "
                                 f"the folders given to --runs")
    seeds = [c.get("seed") for c in configs if c]
    if len(set(seeds)) < len(seeds):
        raise AggregateError(f"two run folders have the same meta-training seed ({seeds}); give one folder per seed")
    return configs, grouped


def _goal_steps(h: int | None, mt: dict) -> tuple[int, int] | None:
    """(H, 10H), 10H capped at the last reported step (5H for H = 2000 over 10 000 steps)."""
    if not h or acc_at(mt, h) is None:
        return None
    last = max(s for s in STEPS_REPORTED if f"acc@{s}" in mt)
    t10 = min(10 * h, last)
    return (h, t10) if t10 > h else None


def aggregate_arm(results: list[dict], task: str) -> dict | None:
    """Mean / sd over seeds of online acc and acc@s, and the goal statistic (see the module docstring)."""
    mts = [r["meta_test"][task] for r in results if task in r.get("meta_test", {})]
    if not mts:
        return None
    out: dict = {"n_seeds": len(mts), "seeds": [r.get("_seed") for r in results if task in r.get("meta_test", {})]}
    for s in ["online_acc", *STEPS_REPORTED]:
        key = s if s == "online_acc" else f"acc@{s}"
        vals = [m[key] if s == "online_acc" else (acc_at(m, s) or (None,))[0] for m in mts]
        vals = [v for v in vals if v is not None]
        if len(vals) == len(mts):
            out[key] = {"per_seed": vals, "mean": float(np.mean(vals)),
                        "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    steps = _goal_steps(results[0].get("horizon"), mts[0])
    if steps is not None:
        h, t10 = steps
        ds, verdicts = [], []
        for m in mts:
            (a10, c10), (a1, c1) = acc_at(m, t10), acc_at(m, h)
            d = a10 - a1
            ci = math.hypot(c10, c1)
            ds.append(d)
            verdicts.append("yes" if d > ci else ("no" if d < -ci else "n.s."))
        n = len(ds)
        mean = float(np.mean(ds))
        half = _T975.get(n - 1, 1.96) * float(np.std(ds, ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
        out["goal"] = {"H": h, "at": t10, "d_per_seed": ds, "verdicts": verdicts, "yes": verdicts.count("yes"),
                       "d_mean": mean, "d_ci95_over_seeds": half,
                       "met": bool(n > 1 and mean - half > 0 and verdicts.count("yes") == n)}
    return out


def _ms(a: dict | None, key: str) -> str:
    if a is None or key not in a:
        return "–"
    v = a[key]
    return f"{v['mean']:.3f}±{v['sd']:.3f}" if a["n_seeds"] > 1 else f"{v['mean']:.3f}"


def _goal_cell(a: dict | None) -> str:
    if a is None or "goal" not in a:
        return "–"
    g = a["goal"]
    tag = "10H" if g["at"] == 10 * g["H"] else f"{g['at'] // g['H']}H"
    ci = f" ±{g['d_ci95_over_seeds']:.3f}" if math.isfinite(g["d_ci95_over_seeds"]) else ""
    met = " **met**" if g["met"] else ""
    return f"{g['d_mean']:+.3f}{ci} ({tag}; yes in {g['yes']}/{len(g['verdicts'])}){met}"


def _arm_order(key: tuple[str, str]) -> tuple[int, int]:
    ln, arm = key
    lorder = {"vsml": 0, "metarnn": 1, "sgd": 2, "adam": 3}
    aorder = {a: i for i, a in enumerate(["start", *ARMS, "baseline"])}
    return lorder.get(ln, 9), aorder.get(arm, 99)


def build_report(configs: list[dict], grouped: dict) -> tuple[str, dict]:
    tasks = [t.strip() for t in (configs[0].get("test_tasks") or "").split(";") if t.strip()]
    if not tasks:
        tasks = sorted({t for rs in grouped.values() for r in rs for t in r.get("meta_test", {})})
    seeds = [c.get("seed") for c in configs]
    c0 = configs[0]
    lines = [f"Meta-training seeds {seeds}; budget {c0.get('budget')} compute units per arm; meta-test "
             f"{c0.get('eval_episodes')} episodes x {c0.get('eval_length')} examples (seed {c0.get('eval_seed')}); "
             f"mean ± sd over seeds; goal column: mean over seeds of acc(10H) − acc(H) ± 95% t-interval over "
             f"seeds, and in how many seeds the difference exceeded its 95% interval over meta-test episodes."]
    agg: dict = {"seeds": seeds, "config": c0, "arms": {}}
    for task in tasks:
        rows = []
        for key in sorted(grouped, key=_arm_order):
            a = aggregate_arm(grouped[key], task)
            if a is None:
                continue
            agg["arms"].setdefault(f"{key[0]}/{key[1]}", {})[task] = a
            rows.append([key[0], grouped[key][0].get("label", key[1]), a["n_seeds"], _ms(a, "online_acc"),
                         *(_ms(a, f"acc@{s}") for s in STEPS_REPORTED), _goal_cell(a)])
        lines += [f"\n### {task}\n", *markdown_table(
            ["learner", "arm", "seeds", "online acc", *(f"acc@{s}" for s in STEPS_REPORTED), "acc(10H) − acc(H)"],
            rows, "ll" + "r" * (2 + len(STEPS_REPORTED)) + "l")]
    objective_rows = []
    for key in sorted(grouped, key=_arm_order):
        objs = [r["objective"] for r in grouped[key] if r.get("objective")]
        if objs:
            f = {k: (float(np.mean([o[k] for o in objs])), float(np.std([o[k] for o in objs], ddof=1))
                     if len(objs) > 1 else 0.0) for k in ("loss@50", "loss@500")}
            objective_rows.append([key[0], grouped[key][0].get("label", key[1]), len(objs),
                                   f"{f['loss@50'][0]:.3f}±{f['loss@50'][1]:.3f}",
                                   f"{f['loss@500'][0]:.3f}±{f['loss@500'][1]:.3f}"])
    if objective_rows:
        lines += ["\n### meta-training objective (online CE on 32 fixed meta-training episodes), mean ± sd over seeds\n",
                  *markdown_table(["learner", "arm", "seeds", "CE over steps 1-50", "CE over steps 1-500"],
                                  objective_rows, "llrrr")]
    return "\n".join(lines) + "\n", agg


def plot(grouped: dict, tasks: list[str], prefix: Path) -> list[Path]:
    """One PNG per task (vsml.evaluation.plotting.plot_log_curves): a panel per learner, each arm's mean curve
    over seeds with its min..max band."""
    paths = []
    learners = [ln for ln in ("vsml", "metarnn") if any(k[0] == ln for k in grouped)]
    for task in tasks:
        panels = {}
        for ln in learners:
            curves = []
            for key in sorted(grouped, key=_arm_order):
                if key[0] not in (ln, "sgd", "adam"):
                    continue
                rs = [r for r in grouped[key] if task in r.get("meta_test", {})]
                if not rs:
                    continue
                x = np.asarray(rs[0]["meta_test"][task]["curve_x"])
                ys = np.asarray([r["meta_test"][task]["curve_y"] for r in rs])          # [seeds, bins]
                style, color = curve_style(*key)
                label = rs[0].get("label", key[1]).replace("θ0", "theta0")      # no θ glyph in every font
                curves.append(LogCurve(f"{label} (n={len(rs)})", x, ys.mean(0), style, color,
                                       band=(ys.min(0), ys.max(0)) if len(rs) > 1 else None))
            panels[f"{ln} on {task}: mean over seeds, band min..max"] = curves
        safe = "".join(c if c.isalnum() else "_" for c in task).strip("_")
        p = plot_log_curves(panels, prefix.parent / f"{prefix.name}_{safe}.png", fontsize=6.5, width=6.4, height=4.4)
        if p is None:
            return []
        paths.append(p)
    return paths


def _rounded(obj, digits: int = 5):
    """Floats rounded to ``digits`` decimals (accuracies are means of <= 320k 0/1 values: 5 digits keep
    every measured digit and make the JSON small enough to keep next to the tables)."""
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


@dataclass(frozen=True)
class AggregateArgs:
    runs: str                         # comma-separated output folders of horizon_study.py, one per seed
    out: str                          # output prefix: writes <out>.md, <out>.json, <out>_<task>.png
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_dir: str = "runs/horizon_aggregate"   # run folder of the wandb summary run


def main(argv: list[str] | None = None) -> int:
    from vsml.training.cli import fail, parse
    a = parse(AggregateArgs, argv, prog="horizon_aggregate.py", description=__doc__.split("\n\n")[0])
    runs = [Path(p.strip()) for p in a.runs.split(",") if p.strip()]
    try:
        configs, grouped = load_runs(runs)
    except AggregateError as e:
        fail("horizon_aggregate.py", str(e))
    text, agg = build_report(configs, grouped)
    prefix = Path(a.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(text)
    per_seed = {f"{k[0]}/{k[1]}": [{kk: v for kk, v in r.items() if kk not in ("first_train_row", "last_train_row")}
                                   for r in rs] for k, rs in grouped.items()}
    prefix.with_suffix(".json").write_text(json.dumps(_rounded({"aggregate": agg, "per_seed": per_seed}),
                                                      separators=(",", ":")))
    tasks = [t.strip() for t in (configs[0].get("test_tasks") or "").split(";") if t.strip()]
    pngs = plot(grouped, tasks, prefix)
    if a.wandb != "disabled":
        from vsml.training.loggers import RunLogger
        lg = RunLogger(Path(a.wandb_dir) / prefix.name, {"runs": [str(r) for r in runs]}, a.wandb,
                       project="vsml-horizon", name=f"horizon-{prefix.name}", job_type="aggregate")
        summ = {}
        for arm, per_task in agg["arms"].items():
            for task, v in per_task.items():
                for k in ["online_acc", *[f"acc@{s}" for s in STEPS_REPORTED]]:
                    if k in v:
                        summ[f"{arm}/{task}/{k}"] = v[k]["mean"]
                if "goal" in v:
                    summ[f"{arm}/{task}/goal_d"] = v["goal"]["d_mean"]
        lg.summary(summ)
        for p in pngs:
            lg.log_image(f"aggregate/{p.stem}", p, 0)
        lg.close()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
