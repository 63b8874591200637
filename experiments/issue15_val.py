"""Issue 15: validation meta-test for recipe / checkpoint selection (train split, validation seed; never the
test split).  Per learner: online accuracy with its 95% half-width over episodes, last-100 accuracy, the
*paired* difference of the per-episode online accuracy to the first checkpoint's (all learners see the same
episodes and initial states) and the mean accuracy in windows of examples.  The JSON keeps the per-episode online
accuracies, so a later run can pair with a learner of an earlier one (``--pair FILE:NAME``) without re-running it
(same tasks, episodes, length and seed: the episodes and initial states are the same).

    python experiments/issue15_val.py --checkpoints pretrained:mnist14-clone-es,runs/clone-long --data_dir ../shared/datasets
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list
from vsml.evaluation.load import load_learner
from vsml.learners import registry


@dataclass(frozen=True)
class ValArgs:
    """Validation meta-test (train split) of several learners for recipe / checkpoint selection."""

    checkpoints: tuple[str, ...]      # run directories, .pt, θ .safetensors or pretrained:NAME; the first is the reference
    tasks: str = "mnist+resize14;fashion_mnist+resize14"
    episodes: int = 8
    length: int = 2000
    seed: int = 101
    baselines: str = "sgd,adam"
    data_dir: str | None = None
    json: str | None = None
    pair: str | None = None           # FILE:NAME: pair against learner NAME of an earlier --json FILE instead of the first checkpoint


from vsml.training.cli import parse  # noqa: E402
a = parse(ValArgs, prog="python experiments/issue15_val.py")
learners = []
for ck in a.checkpoints:
    _, lr, th, _ = load_learner(ck)
    learners.append(FrozenLearner(ck, lr, th))
for b in [s for s in a.baselines.split(",") if s]:
    bl = registry.build(b)
    learners.append(FrozenLearner(b, bl, bl.init_theta()))
res = evaluate(learners, parse_task_list(a.tasks), a.episodes, a.length, a.seed, a.data_dir, split="train", smooth=1)
edges = [q for q in (0, 100, 300, 1000, 2000, 5000, 10000) if q < a.length] + [a.length]
out = {}
earlier, ref_name = None, a.checkpoints[0]
if a.pair:
    path, _, ref_name = a.pair.partition(":")          # names may hold ":" (analytic:sgd), paths do not
    with open(path) as fh:
        earlier = json.load(fh)
    if earlier.get("setup") != {"episodes": a.episodes, "length": a.length, "seed": a.seed}:
        raise SystemExit(f"--pair {a.pair}: that file was made with {earlier.get('setup')}, not episodes={a.episodes}, "
                         f"length={a.length}, seed={a.seed}; pair only runs on the same episodes")
for task, per in res.items():
    print(f"== {task} (train split, seed {a.seed}, {a.episodes} x {a.length}); diff = paired vs {ref_name}")
    if earlier is None:
        ref = np.asarray(per[ref_name]["episode_online_accuracy"], dtype=float)      # [episodes]
    else:
        ref = np.asarray(earlier[task][ref_name]["episodes"], dtype=float)           # [episodes]
    for name, r in per.items():
        d = np.asarray(r["episode_online_accuracy"], dtype=float) - ref     # [episodes]
        half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        c = np.asarray(r["curve_mean"], dtype=float)                          # [length]
        wins = [float(c[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])]
        out.setdefault(task, {})[name] = {"online": r["online_accuracy"], "online_ci95": r["online_accuracy_ci95"],
                                          "final": r["final_accuracy"], "diff": float(d.mean()), "diff_ci95": half,
                                          "windows": wins,
                                          "episodes": [float(x) for x in r["episode_online_accuracy"]]}
        print(f"  {name:50s} online {r['online_accuracy']:.3f} ±{r['online_accuracy_ci95']:.3f} "
              f"last100 {r['final_accuracy']:.3f} diff {d.mean():+.4f} ±{half:.4f} windows "
              + " ".join(f"{w:.3f}" for w in wins))
if a.json:
    with open(a.json, "w") as fh:
        json.dump({"edges": edges, "setup": {"episodes": a.episodes, "length": a.length, "seed": a.seed}, **out},
                  fh, indent=1)
