"""Issue 15: online SGD / Adam with the best learning rate of a small grid, chosen on the validation split
(train split, seed 101, 8 x ``length``, mean online accuracy over the tasks), then meta-tested once on the test
split (16 x ``length``, seed 22).

    python experiments/issue15_tuned_baselines.py --data_dir ../shared/datasets         # MNIST-14 / Fashion-14
    python experiments/issue15_tuned_baselines.py --tasks digits --length 500           # the default job's meta-test
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list
from vsml.learners.baselines import OnlineSGD


@dataclass(frozen=True)
class Args:
    """Small learning-rate grid for the online SGD / Adam baselines."""

    tasks: str = "mnist+resize14;fashion_mnist+resize14"
    sgd_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    adam_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    length: int = 2000                # examples per episode (validation and test)
    data_dir: str | None = None
    json: str | None = None


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(Args, prog="python experiments/issue15_tuned_baselines.py")
    tasks = parse_task_list(a.tasks)
    grid = [("sgd", lr) for lr in a.sgd_lrs] + [("adam", lr) for lr in a.adam_lrs]
    learners = []
    for opt, lr in grid:
        bl = OnlineSGD(hidden=None, lr=lr, optimizer=opt)
        learners.append(FrozenLearner(f"{opt} lr={lr:g}", bl, bl.init_theta()))
    val = evaluate(learners, tasks, 8, a.length, 101, a.data_dir, split="train", smooth=1)
    out = {"validation": {t: {n: r["online_accuracy"] for n, r in per.items()} for t, per in val.items()}}
    best = {}
    for opt in ("sgd", "adam"):
        names = [f"{o} lr={lr:g}" for o, lr in grid if o == opt]
        score = {n: sum(val[t][n]["online_accuracy"] for t in val) / len(val) for n in names}
        for n in names:
            print(f"validation {n:16s} mean online {score[n]:.4f}  " +
                  "  ".join(f"{t} {val[t][n]['online_accuracy']:.4f}" for t in val))
        best[opt] = max(score, key=score.get)
    print("chosen:", best)
    chosen = [fl for fl in learners if fl.name in best.values()]
    test = evaluate(chosen, tasks, 16, a.length, 22, a.data_dir, split="test")
    out["test"] = {t: {n: {"online": r["online_accuracy"], "final": r["final_accuracy"]} for n, r in per.items()}
                   for t, per in test.items()}
    for t, per in test.items():
        for n, r in per.items():
            print(f"test {t:24s} {n:16s} online {r['online_accuracy']:.4f} final {r['final_accuracy']:.4f}")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
