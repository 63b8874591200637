"""Issue 15: the validation meta-test of ``issue15_val.py`` (train split, validation seed; never the test split)
with 95% half-widths over episodes and the *paired* difference of each learner's per-episode online accuracy
to the first checkpoint's (all learners see the same episodes and initial states).

    python experiments/issue15_val_paired.py --checkpoints pretrained:mnist14-clone-long,runs/g-es2000-es --data_dir ../shared/datasets
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list
from vsml.evaluation.load import load_learner
from vsml.learners import registry


@dataclass(frozen=True)
class PairedValArgs:
    """Validation meta-test with CIs and paired differences to the first checkpoint."""

    checkpoints: tuple[str, ...]      # the first one is the reference
    tasks: str = "mnist+resize14;fashion_mnist+resize14"
    episodes: int = 8
    length: int = 2000
    seed: int = 101
    baselines: str = ""
    data_dir: str | None = None


from vsml.training.cli import parse  # noqa: E402
a = parse(PairedValArgs, prog="python experiments/issue15_val_paired.py")
learners = []
for ck in a.checkpoints:
    _, lr, th, _ = load_learner(ck)
    learners.append(FrozenLearner(ck, lr, th))
for b in [s for s in a.baselines.split(",") if s]:
    bl = registry.build(b)
    learners.append(FrozenLearner(b, bl, bl.init_theta()))
res = evaluate(learners, parse_task_list(a.tasks), a.episodes, a.length, a.seed, a.data_dir, split="train", smooth=1)
edges = [q for q in (0, 100, 300, 1000, 2000, 5000, 10000) if q < a.length] + [a.length]
for task, per in res.items():
    print(f"== {task} (train split, seed {a.seed}, {a.episodes} x {a.length}); diff = paired vs {a.checkpoints[0]}")
    ref = np.asarray(per[a.checkpoints[0]]["episode_online_accuracy"], dtype=float)
    for name, r in per.items():
        d = np.asarray(r["episode_online_accuracy"], dtype=float) - ref
        half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        c = np.asarray(r["curve_mean"], dtype=float)
        wins = [float(c[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])]
        print(f"  {name:50s} online {r['online_accuracy']:.3f} ±{r['online_accuracy_ci95']:.3f} "
              f"last100 {r['final_accuracy']:.3f} diff {d.mean():+.4f} ±{half:.4f} windows "
              + " ".join(f"{w:.3f}" for w in wins))
