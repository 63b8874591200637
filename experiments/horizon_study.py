"""Long-horizon study (issue 8): meta-train with short horizons, meta-test far beyond them.

Question: does a learner meta-trained on a horizon H keep improving past H at meta-test (accuracy at
10H higher than at H)?  And how do ES, truncated ES, PES, BPTT (full and truncated) and bootstrapped
meta-gradients (BMG) compare at the same compute budget?

Protocol (all numbers in the JSON are measured by this script):

* learners: VSML (``VSMLNetwork``, default config) and the Meta-RNN baseline (``--learner metarnn``).
* shared warm start, so that the comparison starts from a working learner (from a random θ VSML stays
  on the ln C plateau at CPU budgets, RESULTS.md §3): VSML θ0 = ``clone_steps`` steps of SGD cloning
  (vsml/estimators/cloning.py); Meta-RNN θ0 = full BPTT (``metarnn_pretrain_batch`` episodes of
  ``metarnn_pretrain_length`` examples per step): the optional ``metarnn_curriculum`` stages, then
  ``metarnn_pretrain_steps`` steps on ``train_task``.  All Meta-RNN runs (θ0 and every arm) use one
  architecture, ``StudyConfig.metarnn_config`` (``TrainConfig.metarnn``: hidden, micro-ticks, padding
  ``max_in_dim`` / ``max_classes``).  Every arm of a learner starts from the same θ0 and
  the θ0 themselves are evaluated as the "start" arm.
* meta-training family ``train_task`` (train split); every arm gets the same compute budget
  ``budget`` in **compute units = learner example-steps, a forward step counting 1 and its backward
  step 2** (so a backprop example costs 3, an ES/PES example 1); the number of meta-steps of an arm
  is ``budget // units_per_step`` (see ``ARMS``).  Wall time is recorded too.
* meta-test: θ frozen, test split, ``eval_episodes`` episodes of ``eval_length`` examples on each of
  ``test_tasks`` (Fashion-MNIST at 8x8 and a generated task: a random linear teacher per episode),
  online protocol (predict, then see the label).  acc@s = mean accuracy over steps (0.8 s, s] (a
  trailing window of 20% of s), ± 95% interval over episodes.  Online SGD / Adam run on the same
  episodes.

Usage::

    OMP_NUM_THREADS=1 python experiments/horizon_study.py --out /tmp/horizon/study
    python experiments/horizon_study.py --out /tmp/horizon/study --objective true     # + training-CE check
    python experiments/horizon_study.py --out /tmp/horizon/study --report_only true   # plots + table

``--objective true`` adds to every finished arm its own meta-training objective measured one way for all
arms (online CE over the first 50 / 500 examples of 32 fixed meta-training episodes), which separates
"the estimator failed to optimise" from "it optimised a myopic objective".  Results of the runs made for
issue 8: RESULTS.md ("Long horizons") and docs/horizon/.

A thin sweep over the library: every arm and warm start is a ``TrainConfig`` run by
``vsml.training.trainer.train()``; every meta-test (and the ``--objective`` check) is
``vsml.evaluation.evaluate()`` on the study's cached episodes (``batches=``) with the metrics
``acc_at_steps`` / ``log_binned_curve`` / ``loss_over_first``; the curves are drawn by
``vsml.evaluation.plotting.plot_log_curves`` and the tables by ``vsml.evaluation.report.markdown_table``
(both shared with experiments/horizon_aggregate.py).  What is the
study's own: the arms and their compute units (``_arm``), equal compute → meta-steps
(``steps_for_budget``), the warm-start recipes, the table and the 10H-vs-H verdict.

Resumable: each arm writes ``<out>/arms/<learner>-<arm>.json`` and is skipped when it exists.
Outputs: ``<out>/study.json`` (config + every arm), ``<out>/horizon_<task>.png`` (accuracy vs step on
a log axis), ``<out>/table.md``; wandb offline run under ``<out>/wandb``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import make_family
from vsml.estimators.bmg import BMGConfig
from vsml.estimators.bptt import BPTTConfig
from vsml.training.checkpoint import load_theta, save_theta
from vsml.engine.config import ConfigError
from vsml.estimators.es import ESConfig
from vsml.estimators.pes import PESConfig
from vsml.training.config import EvalConfig, LogConfig, TrainConfig
from vsml.learners.registry import build_learner
from vsml.training.trainer import train

STEPS_REPORTED = (50, 500, 2000, 5000, 10000)


@dataclass(frozen=True)
class StudyConfig:
    out: str = "/tmp/horizon/study"
    data_dir: str | None = None         # folder with the dataset files (None: $VSML_DATA_DIR)
    train_task: str = "mnist5k+resize8+proj"
    test_tasks: str = "fashion_mnist+resize8;teacher_linear[d=64,c=10]"
    learners: str = "vsml,metarnn"
    arms: str = "es50,es500,tes500,pes500,bptt50,tbptt500,bmg500,pes2000,bmg2000"
    budget: int = 160_000               # compute units per arm (forward example-step 1, backward 2)
    pairs: int = 16                     # ES / PES / truncated-ES antithetic pairs
    es_lr: float = 0.025
    grad_lr: float = 1e-3               # BPTT / BMG (Adam)
    clone_steps: int = 800
    # Meta-RNN warm start (issue 8 recipe, measured in RESULTS.md "Meta-RNN warm start off the ln C plateau"):
    # 6000 full-BPTT steps of 64 episodes x 100 examples, Adam 3e-3, compact 64-in / 10-class 1-tick LSTM-128
    metarnn_pretrain_steps: int = 6000
    metarnn_pretrain_length: int = 100
    metarnn_pretrain_lr: float = 3e-3
    metarnn_pretrain_batch: int = 64    # episodes per full-BPTT warm-start step
    metarnn_pretrain_clip: float = 25.0  # global grad-norm clip of the warm start (0: off)
    # warm-start curriculum run before the metarnn_pretrain_steps on train_task: "SPEC@STEPS;SPEC@STEPS"
    # (task specs of tasks.make_family, each trained for STEPS full-BPTT steps from the previous θ; "" = none)
    metarnn_curriculum: str = ""
    metarnn_hidden: int = 128           # Meta-RNN architecture (TrainConfig.metarnn, vsml.learners.baselines.MetaRNNConfig)
    metarnn_max_in_dim: int = 64        # the study's tasks are 64-d (8x8 / d=64) with 10 classes
    metarnn_max_classes: int = 10
    metarnn_micro_ticks: int = 1
    metarnn_forget_bias: float = 1.0
    eval_episodes: int = 8
    eval_length: int = 10_000
    eval_seed: int = 22
    # extra meta-test of many short episodes for acc@s with s <= eval_short_length (acc@50 is a 10-step
    # window: 8-32 long episodes leave it a ±0.05-0.1 interval); 0 = off
    eval_short_episodes: int = 256
    eval_short_length: int = 500
    remeasure: bool = False             # only complete finished arms: meta-test tasks (test_tasks) and short sets they lack
    seed: int = 0
    wandb: str = "offline"
    report_only: bool = False
    objective_episodes: int = 32        # --objective: episodes of the meta-training family per arm
    objective: bool = False             # only add the meta-training-objective check to finished arms

    def __post_init__(self):
        if self.budget < 1 or self.pairs < 1 or self.eval_episodes < 2 or self.eval_length < 50:
            raise ConfigError("budget >= 1, pairs >= 1, eval_episodes >= 2 and eval_length >= 50 are required")
        if self.eval_short_episodes != 0 and (self.eval_short_episodes < 2 or not
                                              50 <= self.eval_short_length <= self.eval_length):
            raise ConfigError(f"eval_short_episodes must be 0 (off) or >= 2 with 50 <= eval_short_length <= "
                              f"eval_length; got {self.eval_short_episodes}, {self.eval_short_length}")
        unknown = [a for a in self.arm_list if a not in ARMS]
        if unknown:
            raise ConfigError(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
        bad = [x for x in self.learner_list if x not in ("vsml", "metarnn")]
        if bad:
            raise ConfigError(f"learners must be vsml and/or metarnn, got {bad}")
        if self.metarnn_pretrain_steps < 1 or self.metarnn_pretrain_length < 1 or self.metarnn_pretrain_batch < 1:
            raise ConfigError("metarnn_pretrain_steps, metarnn_pretrain_length and metarnn_pretrain_batch must be >= 1")
        if not (self.metarnn_pretrain_lr > 0 and math.isfinite(self.metarnn_pretrain_lr)) or \
                not (self.metarnn_pretrain_clip >= 0 and math.isfinite(self.metarnn_pretrain_clip)):
            raise ConfigError(f"metarnn_pretrain_lr must be > 0 and metarnn_pretrain_clip >= 0 (0: off), got "
                              f"{self.metarnn_pretrain_lr}, {self.metarnn_pretrain_clip}")
        self.metarnn_config                                            # validates the architecture fields
        self.metarnn_stages                                            # validates the curriculum syntax

    @property
    def metarnn_config(self):
        """The Meta-RNN architecture every metarnn run of the study uses (θ0 and all arms)."""
        from vsml.learners.baselines import MetaRNNConfig
        return MetaRNNConfig(hidden=self.metarnn_hidden, micro_ticks=self.metarnn_micro_ticks,
                             max_in_dim=self.metarnn_max_in_dim, max_classes=self.metarnn_max_classes,
                             forget_bias=self.metarnn_forget_bias)

    @property
    def metarnn_stages(self) -> list[tuple[str, int]]:
        """Warm-start stages [(task spec, full-BPTT steps)]: the curriculum, then train_task."""
        stages = []
        for part in [q.strip() for q in self.metarnn_curriculum.split(";") if q.strip()]:
            spec, sep, n = part.rpartition("@")
            if not sep or not spec.strip() or not n.strip().isdigit() or int(n) < 1:
                raise ConfigError(f"metarnn_curriculum entry {part!r} must be SPEC@STEPS with STEPS >= 1, e.g. "
                                  f"'random[n=4,c=2,side=8]+proj+labelperm@150'")
            stages.append((spec.strip(), int(n)))
        return [*stages, (self.train_task, self.metarnn_pretrain_steps)]

    @property
    def arm_list(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()]

    @property
    def learner_list(self) -> list[str]:
        return [a.strip() for a in self.learners.split(",") if a.strip()]


# --------------------------------------------------------------------------------------------
# arms: (label, horizon H seen by the meta-objective, TrainConfig overrides, compute units per step)


def _arm(name: str, sc: StudyConfig) -> tuple[str, int, dict, int]:
    p = sc.pairs
    if name in ("es50", "es500", "es2000"):
        t = int(name[2:])
        return (f"ES H={t}", t, {"estimator": "es", "es": ESConfig(pairs=p), "episode_length": t,
                                 "lr": sc.es_lr}, 2 * p * t)
    if name in ("tes500", "pes500", "pes2000"):
        h = int(name[3:])
        est = name[:3]
        label = ("truncated ES" if est == "tes" else "PES") + f" H={h} (K=50)"
        return (label, h, {"estimator": est, "pes": PESConfig(particles=p, truncation=50, horizon=h),
                           "lr": sc.es_lr}, 2 * p * 50)
    if name == "bptt50":
        e = 8
        return ("BPTT H=50", 50, {"estimator": "bptt", "meta_batch": e, "episode_length": 50,
                                  "bptt": BPTTConfig(truncation=0), "lr": sc.grad_lr}, 3 * e * 50)
    if name == "tbptt500":
        e = 4
        return ("truncated BPTT H=500 (K=50)", 500, {"estimator": "bptt", "meta_batch": e, "episode_length": 500,
                                                    "bptt": BPTTConfig(truncation=50), "lr": sc.grad_lr}, 3 * e * 500)
    if name in ("bmg500", "bmg2000"):
        h = int(name[3:])
        e = 4 if h <= 500 else 2
        k, q = 50, 10
        cfg = BMGConfig(k_steps=k, l_steps=h - k, probe=q, matching="kl", grounding="data", task_weight=1.0)
        units = 3 * e * k + e * (h - k) + e * q + 3 * e * q
        return (f"BMG H={h} (K=50, L={h - k})", h, {"estimator": "bmg", "bmg": cfg, "meta_batch": e,
                                                    "episode_length": cfg.episode_length, "lr": sc.grad_lr}, units)
    raise KeyError(name)


ARMS = ("es50", "es500", "es2000", "tes500", "pes500", "pes2000", "bptt50", "tbptt500", "bmg500", "bmg2000")


# --------------------------------------------------------------------------------------------
# warm starts


def _base_cfg(sc: StudyConfig, learner: str, name: str, **kw) -> TrainConfig:
    cfg = TrainConfig(name=name, learner=learner, task=sc.train_task, data_dir=sc.data_dir,
                      out_dir=str(Path(sc.out) / "runs"), seed=sc.seed, backend=("auto" if learner == "vsml" else "torch"),
                      ckpt_every=0, eval=EvalConfig(tasks="digits", every=0, episodes=2, length=20),
                      log=LogConfig(every=10, wandb=sc.wandb, project="vsml-horizon", progress=False))
    if learner == "metarnn":                       # θ0 and every arm share one Meta-RNN architecture
        cfg = dataclasses.replace(cfg, metarnn=sc.metarnn_config)
    return dataclasses.replace(cfg, **kw)


def warm_start(sc: StudyConfig, learner: str) -> tuple[Path, dict]:
    """θ0 of a learner (cached in <out>/theta0_<learner>.safetensors); returns (path, info)."""
    path = Path(sc.out) / f"theta0_{learner}.safetensors"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        if learner == "metarnn":        # a θ0 cached by another Meta-RNN architecture would not fit the arms
            from vsml.learners.baselines import MetaRNNConfig
            saved = load_theta(path)[1].get("metarnn", dataclasses.asdict(MetaRNNConfig()))   # older: defaults
            if saved != dataclasses.asdict(sc.metarnn_config):
                raise ConfigError(f"{path} was built with metarnn={saved} but this study uses "
                                  f"{sc.metarnn_config}; use another --out or delete {path} and {info_path}")
        return path, json.loads(info_path.read_text())
    t0 = time.time()
    if learner == "vsml":
        # the trainer's cloning phase (clone.steps cloning steps, no meta-training steps)
        from vsml.estimators.cloning import CloneConfig
        cfg = _base_cfg(sc, "vsml", "theta0-vsml", clone=CloneConfig(steps=sc.clone_steps), steps=0)
        rd = train(cfg)
        rows = [json.loads(r) for r in (rd / "metrics.jsonl").read_text().splitlines()]
        last = next(({k.removeprefix("meta_train/"): v for k, v in r.items() if k.startswith("meta_train/")}
                     for r in reversed(rows) if "meta_train/clone_loss" in r), {})
        info = {"how": f"{sc.clone_steps} SGD-cloning steps (CloneConfig defaults) on {sc.train_task}",
                "wall_s": time.time() - t0, "run_dir": str(rd), "last_metrics": last}
        theta, _, _ = load_theta(rd / "theta.safetensors")
        save_theta(path, theta, cfg.to_dict(), sc.clone_steps)
    else:
        # full BPTT (vsml.md §2.3) through metarnn_pretrain_length-example episodes, stage by stage: the
        # curriculum families (metarnn_stages), then train_task; each stage starts from the previous θ
        # (fresh Adam).  What took the Meta-RNN off the ln C plateau here was the larger meta-batch (64) and
        # thousands of steps, not the curricula tried (RESULTS.md, "Long horizons"; Kirsch et al. 2022 on
        # plateaus); the curriculum option is kept for further attempts.
        stages, rds, prev, total = sc.metarnn_stages, [], None, 0
        for i, (task, n) in enumerate(stages):
            name = "theta0-metarnn" if i == len(stages) - 1 else f"theta0-metarnn-stage{i}"
            cfg = _base_cfg(sc, "metarnn", name, task=task, estimator="bptt", meta_batch=sc.metarnn_pretrain_batch,
                            episode_length=sc.metarnn_pretrain_length,
                            bptt=BPTTConfig(truncation=0, clip_grad_norm=sc.metarnn_pretrain_clip),
                            steps=n, lr=sc.metarnn_pretrain_lr, init_from=prev)
            rd = train(cfg)
            prev, total = str(rd / "theta.safetensors"), total + n
            rds.append(str(rd))
            print(f"[horizon] metarnn warm-start stage {i + 1}/{len(stages)} ({task}, {n} steps) done", flush=True)
        theta, _, _ = load_theta(prev)
        save_theta(path, theta, cfg.to_dict(), total)
        curr = "".join(f"{n} on {t}, then " for t, n in stages[:-1])
        info = {"how": f"full BPTT ({sc.metarnn_pretrain_batch} episodes x {sc.metarnn_pretrain_length} examples, "
                       f"Adam {sc.metarnn_pretrain_lr}, clip {sc.metarnn_pretrain_clip}): {curr}"
                       f"{sc.metarnn_pretrain_steps} on {sc.train_task}; {sc.metarnn_config}",
                "wall_s": time.time() - t0, "run_dir": rds[-1], "stage_run_dirs": rds}
    info_path.write_text(json.dumps(info, indent=1))
    return path, info


# --------------------------------------------------------------------------------------------
# meta-test


_EVAL_CACHE: dict = {}


def _study_batch(sc: StudyConfig, spec: str, episodes: int, length: int, seed: int):
    """The study's meta-test episodes of a task (cached): one test-split batch drawn with ``seed`` itself,
    as in the rounds recorded in docs/horizon (not evaluate()'s own draw), so that arms measured before
    and after a ``--remeasure`` see the same episodes."""
    key = (spec, episodes, length, seed)
    if key not in _EVAL_CACHE:
        fam = make_family(spec, data_dir=sc.data_dir)
        fam.prepare(("test",))
        _EVAL_CACHE[key] = fam.sample(episodes, length, seed=seed, split="test")
    return _EVAL_CACHE[key]


def _online_test(sc: StudyConfig, fl, episodes: int, length: int, seed: int, curve: bool) -> dict:
    """{task: {online_acc, eval_wall_s, acc@s, ci@s[, curve_x, curve_y]}} of one frozen learner through
    vsml.evaluation.evaluate.evaluate (acc@s: mean accuracy over steps (0.8 s, s] ± its 95% interval)."""
    from vsml.evaluation.evaluate import acc_at_steps, evaluate, log_binned_curve
    metrics = [acc_at_steps(STEPS_REPORTED), *([log_binned_curve()] if curve else [])]
    out = {}
    for spec in [s.strip() for s in sc.test_tasks.split(";") if s.strip()]:
        batch = _study_batch(sc, spec, episodes, length, seed)
        t0 = time.time()
        # seed None: the initial states of the recorded rounds (evaluate.state_seed's historic rule)
        r = evaluate([fl], [spec], episodes, length, None, metrics=metrics, batches={spec: batch})[spec][fl.name]
        out[spec] = {"online_acc": r["online_accuracy"], "eval_wall_s": time.time() - t0,
                     **{k: v for k, v in r.items() if k.startswith(("acc@", "ci@")) or k in ("curve_x", "curve_y")}}
    return out


def meta_test(sc: StudyConfig, learner_name: str, learner, theta: torch.Tensor) -> dict:
    """Online meta-test of a frozen θ on every test task: ``eval_episodes`` x ``eval_length`` (curves,
    acc@s), plus, when ``eval_short_episodes`` > 0, a second set of that many ``eval_short_length``-example
    episodes (seed eval_seed + 1) stored under ``"short"``; :func:`acc_at` reads acc@s from the short set
    for s <= eval_short_length (more episodes, so a tighter interval at small s)."""
    from vsml.evaluation.evaluate import FrozenLearner
    fl = FrozenLearner(learner_name, learner, theta.detach(), max_batch=sc.eval_episodes)
    short = short_test(sc, learner_name, learner, theta)
    out = _online_test(sc, fl, sc.eval_episodes, sc.eval_length, sc.eval_seed, curve=True)
    for spec, res in out.items():
        if spec in short:
            res["short"] = short[spec]
    return out


def short_test(sc: StudyConfig, learner_name: str, learner, theta: torch.Tensor) -> dict:
    """The short-episode meta-test of :func:`meta_test` ({task: {acc@s, ci@s, ...}}; {} when off)."""
    from vsml.evaluation.evaluate import FrozenLearner
    if not sc.eval_short_episodes:
        return {}
    fl = FrozenLearner(learner_name, learner, theta.detach(), max_batch=min(sc.eval_short_episodes, 128))
    out = _online_test(sc, fl, sc.eval_short_episodes, sc.eval_short_length, sc.eval_seed + 1, curve=False)
    return {spec: {"episodes": sc.eval_short_episodes, "length": sc.eval_short_length, "seed": sc.eval_seed + 1,
                   **res} for spec, res in out.items()}


def _frozen_theta(sc: StudyConfig, r: dict):
    """(learner, θ) of a finished arm result: the arm's final θ, θ0 for the start arm, the baseline's own."""
    if r["learner"] in ("sgd", "adam"):
        from vsml.learners import registry
        bl = registry.build(r["learner"])
        return bl, bl.init_theta()
    path = (Path(r["run_dir"]) / "theta.safetensors") if "run_dir" in r else \
        Path(sc.out) / f"theta0_{r['learner']}.safetensors"
    theta, _, _ = load_theta(path)
    return build_learner(_base_cfg(sc, r["learner"], "remeasure")), theta


def acc_at(mt: dict, s: int) -> tuple[float, float] | None:
    """(acc@s, its 95% half-width) of one task's meta-test: from the short-episode set when it covers s,
    else from the long episodes; None when s was not measured."""
    sh = mt.get("short")
    if sh is not None and f"acc@{s}" in sh:
        return sh[f"acc@{s}"], sh[f"ci@{s}"]
    if f"acc@{s}" in mt:
        return mt[f"acc@{s}"], mt[f"ci@{s}"]
    return None


# --------------------------------------------------------------------------------------------
# the grid


def steps_for_budget(budget: int, units_per_step: int) -> int:
    """Equal compute: the meta-steps an arm gets from ``budget`` compute units at ``units_per_step`` each
    (at least one)."""
    return max(1, budget // units_per_step)


def run_arm(sc: StudyConfig, learner: str, arm: str, theta0_path: Path) -> dict:
    """One arm: its TrainConfig through ``train()`` from θ0, then :func:`meta_test` of its final θ."""
    label, horizon, overrides, units = _arm(arm, sc)
    steps = steps_for_budget(sc.budget, units)
    cfg = _base_cfg(sc, learner, f"{learner}-{arm}", init_from=str(theta0_path), steps=steps, **overrides)
    t0 = time.time()
    rd = train(cfg)
    wall = time.time() - t0
    theta, _, _ = load_theta(rd / "theta.safetensors")
    rows = [json.loads(r) for r in (rd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if any(k.startswith("meta_train/") for k in r)]
    net = build_learner(cfg)
    res = {"learner": learner, "arm": arm, "label": label, "horizon": horizon, "meta_steps": steps,
           "units_per_step": units, "compute_units": steps * units, "train_wall_s": wall, "run_dir": str(rd),
           "first_train_row": train_rows[0] if train_rows else None,
           "last_train_row": train_rows[-1] if train_rows else None,
           "meta_test": meta_test(sc, learner, net, theta)}
    return res


def run_start_and_baselines(sc: StudyConfig, learner: str, theta0_path: Path, info: dict) -> dict:
    cfg = _base_cfg(sc, learner, f"{learner}-start")
    net = build_learner(cfg)
    theta, _, _ = load_theta(theta0_path)
    return {"learner": learner, "arm": "start", "label": "θ0 (warm start, no fine-tuning)", "horizon": None,
            "meta_steps": 0, "compute_units": 0, "warm_start": info, "meta_test": meta_test(sc, learner, net, theta)}


def run_sgd_adam(sc: StudyConfig) -> dict:
    from vsml.learners import registry
    out = {}
    for b in ("sgd", "adam"):
        bl = registry.build(b)
        out[b] = {"learner": b, "arm": "baseline", "label": f"online {b.upper() if b == 'sgd' else 'Adam'}",
                  "meta_test": meta_test(sc, b, bl, bl.init_theta())}
    return out


def _fmt(r: dict, task: str, s: int) -> str:
    a = acc_at(r["meta_test"].get(task, {}), s)
    return "–" if a is None else f"{a[0]:.3f}±{a[1]:.2f}"


def _goal(r: dict, task: str) -> str:
    """acc at 10H vs at H (or at the last reported step when 10H exceeds the meta-test length)."""
    h = r.get("horizon")
    mt = r["meta_test"].get(task, {})
    if not h or acc_at(mt, h) is None:
        return "–"
    t10 = min(10 * h, max(s for s in STEPS_REPORTED if f"acc@{s}" in mt))
    if acc_at(mt, t10) is None or t10 <= h:
        return "–"
    (a10, c10), (a1, c1) = acc_at(mt, t10), acc_at(mt, h)
    d = a10 - a1
    ci = math.hypot(c10, c1)
    verdict = "yes" if d > ci else ("no" if d < -ci else "n.s.")
    return f"{d:+.3f} ({'10H' if t10 == 10 * h else f'{t10 // h}H'}: {verdict})"


def report(sc: StudyConfig, results: list[dict], out: Path) -> None:
    from vsml.evaluation.report import markdown_table
    tasks = [s.strip() for s in sc.test_tasks.split(";") if s.strip()]
    lines = []
    for task in tasks:
        rows = []
        for r in results:
            mt = r["meta_test"].get(task)
            if mt is None:
                continue
            wall = f"{r['train_wall_s']:.0f}" if "train_wall_s" in r else "–"
            rows.append([r["learner"], r["label"], r.get("meta_steps", "–"), r.get("compute_units", "–"), wall,
                         f"{mt['online_acc']:.3f}", *(_fmt(r, task, s) for s in STEPS_REPORTED), _goal(r, task)])
        lines += [f"\n### {task}\n", *markdown_table(
            ["learner", "arm", "meta-steps", "units", "train wall s", "online acc",
             *(f"acc@{s}" for s in STEPS_REPORTED), "acc(10H) − acc(H)"],
            rows, "ll" + "r" * (4 + len(STEPS_REPORTED)) + "l")]
    objective = [[r["learner"], r["label"], f"{o['loss@50']:.3f}", f"{o['loss@500']:.3f}", f"{o['acc@500']:.3f}"]
                 for r in results if (o := r.get("objective"))]
    if objective:
        lines += ["\n### meta-training objective (online CE on 32 fixed meta-training episodes)\n", *markdown_table(
            ["learner", "arm", "CE over steps 1-50", "CE over steps 1-500", "accuracy over 1-500"], objective, "llrrr")]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps({"config": dataclasses.asdict(sc), "results": results}, indent=1))
    from vsml.evaluation.plotting import LogCurve, plot_log_curves
    learners = [x for x in sc.learner_list if any(r["learner"] == x for r in results)]
    for task in tasks:
        if not learners:
            break
        panels = {f"{ln} on {task}": [LogCurve(r["label"], r["meta_test"][task]["curve_x"],
                                               r["meta_test"][task]["curve_y"], *curve_style(r["learner"], r["arm"]))
                                      for r in results
                                      if task in r["meta_test"] and r["learner"] in (ln, "sgd", "adam")]
                  for ln in learners}
        safe = "".join(c if c.isalnum() else "_" for c in task).strip("_")
        plot_log_curves(panels, out / f"horizon_{safe}.png", fontsize=7)


def curve_style(learner: str, arm: str) -> tuple[str, str]:
    """(line style, matplotlib colour) of one curve in the study's plots: baselines dashed, θ0 dotted grey,
    arms by their index in ARMS (tab10 colours "C0".."C9"; shared with experiments/horizon_aggregate.py)."""
    style = "--" if learner in ("sgd", "adam") else (":" if arm == "start" else "-")
    color = "0.5" if arm == "start" else ({"sgd": "k", "adam": "0.35"}.get(learner)
                                          or f"C{ARMS.index(arm) % 10}")
    return style, color


def objective_check(sc: StudyConfig, r: dict) -> dict:
    """The estimators' own objective, measured the same way for every arm: mean online CE over the first
    50 and the first 500 examples of ``objective_episodes`` fixed episodes of the meta-training family
    (train split, seed 777, not a seed used in meta-training), at θ_final (or θ0 for the start arm), through
    ``evaluate()`` with those cached episodes (initial states: evaluate's rule for seed None; before the
    move onto evaluate() they came from Generator(778), so recorded numbers differ in the last digits)."""
    if r["learner"] not in ("vsml", "metarnn"):
        return {}
    from vsml.evaluation.evaluate import FrozenLearner, evaluate, loss_over_first
    net, theta = _frozen_theta(sc, r)
    key = ("objective", sc.train_task)
    if key not in _EVAL_CACHE:
        fam = make_family(sc.train_task, data_dir=sc.data_dir)
        fam.prepare(("train",))
        _EVAL_CACHE[key] = fam.sample(sc.objective_episodes, 500, seed=777, split="train")
    fl = FrozenLearner(r["learner"], net, theta, max_batch=sc.objective_episodes)
    res = evaluate([fl], [sc.train_task], sc.objective_episodes, 500, None, split="train",
                   loss_metrics=[loss_over_first((50, 500))], batches={sc.train_task: _EVAL_CACHE[key]})
    m = res[sc.train_task][fl.name]
    return {"loss@50": m["loss@50"], "loss@500": m["loss@500"], "acc@500": m["online_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    from vsml.training.cli import parse
    # booleans take a value (--objective true); anything but true/false, 1/0, yes/no, on/off is an error
    sc = parse(StudyConfig, argv, prog="horizon_study.py", description=__doc__.split("\n\n")[0], bool_values=True)
    torch.set_num_threads(1)
    out = Path(sc.out)
    (out / "arms").mkdir(parents=True, exist_ok=True)

    def load_all() -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))]

    def save(name: str, r: dict) -> None:
        (out / "arms" / f"{name}.json").write_text(json.dumps(r, indent=1))
        report(sc, _order(sc, load_all()), out)

    if sc.remeasure:   # complete finished arms: meta-test tasks they lack, and the short set where it is missing
        tasks = [t.strip() for t in sc.test_tasks.split(";") if t.strip()]
        for p in sorted((out / "arms").glob("*.json")):
            r = json.loads(p.read_text())
            if "error" in r or r["learner"] not in (*sc.learner_list, "sgd", "adam"):
                continue
            missing = [t for t in tasks if t not in r["meta_test"]]
            no_short = [t for t in tasks if t in r["meta_test"] and "short" not in r["meta_test"][t]]
            if not missing and not (no_short and sc.eval_short_episodes):
                continue
            learner, theta = _frozen_theta(sc, r)
            if missing:                                   # long + short meta-test of the new tasks
                r["meta_test"].update(meta_test(dataclasses.replace(sc, test_tasks=";".join(missing)),
                                                r["learner"], learner, theta))
            if no_short and sc.eval_short_episodes:
                for task, res in short_test(dataclasses.replace(sc, test_tasks=";".join(no_short)),
                                            r["learner"], learner, theta).items():
                    r["meta_test"][task]["short"] = res
            p.write_text(json.dumps(r, indent=1))
            print(f"[horizon] remeasured {p.stem}: new tasks {missing}, short set added for {no_short}", flush=True)
    if sc.objective:
        for p in sorted((out / "arms").glob("*.json")):
            r = json.loads(p.read_text())
            if "objective" not in r and "error" not in r and r["learner"] in ("vsml", "metarnn"):
                r["objective"] = objective_check(sc, r)
                p.write_text(json.dumps(r, indent=1))
                print(f"[horizon] objective {p.stem}: {r['objective']}", flush=True)
    if not sc.report_only and not sc.objective and not sc.remeasure:
        if not (out / "arms" / "baseline-sgd.json").exists():
            for b, r in run_sgd_adam(sc).items():
                save(f"baseline-{b}", r)
        for ln in sc.learner_list:
            th0, info = warm_start(sc, ln)
            if not (out / "arms" / f"{ln}-start.json").exists():
                save(f"{ln}-start", run_start_and_baselines(sc, ln, th0, info))
        for arm in sc.arm_list:             # arm-major: both learners get each arm before the next arm
            for ln in sc.learner_list:
                name = f"{ln}-{arm}"
                if (out / "arms" / f"{name}.json").exists():
                    continue
                th0, _ = warm_start(sc, ln)
                print(f"[horizon] === {name} ===", flush=True)
                try:
                    r = run_arm(sc, ln, arm, th0)
                except Exception as exc:  # noqa: BLE001  (record the failure, keep going with the grid)
                    traceback.print_exc()
                    r = {"learner": ln, "arm": arm, "label": _arm(arm, sc)[0], "error": repr(exc), "meta_test": {}}
                save(name, r)
                print(f"[horizon] {name}: " + json.dumps({t: {k: v for k, v in m.items() if k.startswith("acc@")}
                                                          for t, m in r["meta_test"].items()}), flush=True)
    results = _order(sc, load_all())
    report(sc, results, out)
    _wandb_summary(sc, results, out)
    print((out / "table.md").read_text())
    return 0


def _order(sc: StudyConfig, results: list[dict]) -> list[dict]:
    order = {a: i for i, a in enumerate(["start", *ARMS, "baseline"])}
    lorder = {x: i for i, x in enumerate([*sc.learner_list, "sgd", "adam"])}
    return sorted(results, key=lambda r: (lorder.get(r["learner"], 99), order.get(r["arm"], 99)))


def _wandb_summary(sc: StudyConfig, results: list[dict], out: Path) -> None:
    if sc.wandb == "disabled":
        return
    from vsml.training.loggers import RunLogger
    lg = RunLogger(out / "summary_run", dataclasses.asdict(sc), sc.wandb, project="vsml-horizon",
                   name="horizon-study", job_type="study")
    summ = {}
    for r in results:
        for task, mt in r["meta_test"].items():
            for k, v in mt.items():
                if k.startswith("acc@") or k == "online_acc":
                    summ[f"{r['learner']}/{r['arm']}/{task}/{k}"] = v
    lg.summary(summ)
    for p in sorted(out.glob("horizon_*.png")):
        lg.log_image(f"study/{p.stem}", p, 0)
    lg.close()


if __name__ == "__main__":
    raise SystemExit(main())
