"""Issue 15: validation meta-test for recipe / checkpoint selection (train split, validation seed; never the
test split).  Prints online accuracy, windowed accuracy and last-100 accuracy per learner.

    python experiments/issue15_val.py --checkpoints pretrained:mnist14-clone-es,runs/clone-long --data_dir ../shared/datasets
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list
from vsml.evaluation.load import load_learner
from vsml.learners import registry



@dataclass(frozen=True)
class ValArgs:
    """Validation meta-test (train split) of several learners for recipe / checkpoint selection."""

    checkpoints: tuple[str, ...]      # run directories, .pt, θ .safetensors or pretrained:NAME
    tasks: str = "mnist+resize14;fashion_mnist+resize14"
    episodes: int = 8
    length: int = 2000
    seed: int = 101
    baselines: str = "sgd,adam"
    data_dir: str | None = None
    json: str | None = None


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
for task, per in res.items():
    print(f"== {task} (train split, seed {a.seed}, {a.episodes} x {a.length})")
    for name, r in per.items():
        curve = None
        for key in ("curve_raw", "curve_mean", "curve"):
            if key in r:
                curve = torch.tensor(r[key]); break
        wins = [float(curve[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])] if curve is not None else []
        out.setdefault(task, {})[name] = {"online": r["online_accuracy"], "final": r["final_accuracy"], "windows": wins}
        print(f"  {name:45s} online {r['online_accuracy']:.3f} last100 {r['final_accuracy']:.3f} windows "
              + " ".join(f"{w:.3f}" for w in wins))
if a.json:
    json.dump({"edges": edges, **out}, open(a.json, "w"), indent=1)
