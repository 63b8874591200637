"""Issue 15, the deep net: the learning rates of the MLP that ``analytic:backprop`` writes into θ, on validation
(train split, seed 101), by running the MLP alone (``cloning_deep.TeacherLearner`` with the analytic start
w_0 = tanh(c_0), w_1 = 0).  Prints online / last-100 accuracy on MNIST-14 and Fashion-14 per (κ, α_1, α_0, γ),
best first.

    python experiments/issue15_backprop_grid.py --data_dir ../shared/datasets                         # 24 points
    python experiments/issue15_backprop_grid.py --kappas 1 --alphas 1 --hidden_alphas 0.001,0.003,0.01 --gains 7,14,28 --data_dir ../shared/datasets
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from tasks import make_family
from vsml.engine.analytic import BACKPROP_CONFIG, backprop_initial_weights
from vsml.engine.state import init_state
from vsml.estimators.cloning_deep import TeacherLearner


@dataclass(frozen=True)
class GridArgs:
    """Validation grid of the analytic:backprop MLP's learning rates."""

    kappas: tuple[float, ...] = (1.0, 2.0)
    alphas: tuple[float, ...] = (0.3, 1.0, 3.0)
    hidden_alphas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    gains: tuple[float, ...] = (14.0,)
    tasks: tuple[str, ...] = ("mnist+resize14", "fashion_mnist+resize14")
    episodes: int = 16
    length: int = 2000
    seed: int = 101
    data_dir: str | None = None


def main(a: GridArgs) -> dict:
    res: dict[tuple, list[tuple[float, float]]] = {}
    for task in a.tasks:
        b = make_family(task, data_dir=a.data_dir).sample(a.episodes, a.length, seed=a.seed, split="train")
        for kappa, a1, a0, gain in itertools.product(a.kappas, a.alphas, a.hidden_alphas, a.gains):
            cfg = dataclasses.replace(BACKPROP_CONFIG, logit_scale=kappa)
            st = init_state(cfg, a.episodes, b.x.shape[2], b.num_classes, torch.Generator().manual_seed(a.seed))
            out = TeacherLearner(cfg, [a0, a1], gain=gain, initial_weights=backprop_initial_weights).unroll(
                None, b.x, b.y, state=st)
            c = out.correct.float()                                            # [E, T]
            res.setdefault((kappa, a1, a0, gain), []).append((c.mean().item(), c[:, -100:].mean().item()))
    print("(κ, α_1, α_0, γ)  " + "  ".join(f"{t}: online / last 100" for t in a.tasks))
    for k, v in sorted(res.items(), key=lambda kv: -sum(acc for acc, _ in kv[1])):
        print(k, "  ".join(f"{acc:.3f} / {last:.3f}" for acc, last in v))
    return res


if __name__ == "__main__":
    from vsml.training.cli import parse
    main(parse(GridArgs, prog="python experiments/issue15_backprop_grid.py"))
