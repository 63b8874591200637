"""Issue 15, the deep net: how sensitive the hand-built ``analytic:backprop`` θ is to a meta-gradient-sized change.
Unrolls the frozen learner on training-split episodes with θ + δ·s, s a random ±1 pattern, (a) on every θ value
(two patterns) and (b) on one block of one layer at a time (the gate weights W split by the input they read:
forward message, backward message, h), and prints the online / last-500 accuracy of each.  δ = 1e-5 is one Adam
step at the learning rate of the ``sched-tbptt`` recipe.

    python experiments/issue15_backprop_sensitivity.py --data_dir ../shared/datasets
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tasks import make_family
from vsml.engine.analytic import BACKPROP_CONFIG, analytic_theta
from vsml.engine.network import VSMLNetwork
from vsml.engine.params import param_shapes


@dataclass(frozen=True)
class SensitivityArgs:
    """Accuracy of analytic:backprop under ±δ changes of θ."""

    spec: str = "analytic:backprop"
    task: str = "mnist+resize14"
    episodes: int = 4
    length: int = 2000
    seed: int = 101
    delta: float = 1e-5
    data_dir: str | None = None


def main(a: SensitivityArgs) -> None:
    cfg = BACKPROP_CONFIG
    net = VSMLNetwork(cfg, backend="auto")
    b = make_family(a.task, data_dir=a.data_dir).sample(a.episodes, a.length, seed=a.seed, split="train")
    st = net.init_state(a.episodes, b.x.shape[2], b.num_classes, torch.Generator().manual_seed(3))
    theta = analytic_theta(a.spec, cfg)                                   # [2, P]

    def acc(th: torch.Tensor) -> str:
        with torch.no_grad():
            c = net.unroll(th, b.x, b.y, state=st).correct.float()       # [E, T]
        return f"{c.mean().item():.3f} / {c[:, -500:].mean().item():.3f}"

    print(f"{a.spec} on {a.task} ({a.episodes} x {a.length}, train split), online / last-500 accuracy")
    print(f"  unchanged: {acc(theta)}")
    for s in range(2):
        sign = torch.sign(torch.randn(theta.shape, generator=torch.Generator().manual_seed(s)))
        print(f"  ±{a.delta:g} on every value (pattern {s}): {acc(theta + a.delta * sign)}")
    sign = torch.sign(torch.randn(theta.shape, generator=torch.Generator().manual_seed(0)))
    n, m = cfg.cell.hidden, cfg.cell.msg
    blocks, off = [], 0
    for name, shape in param_shapes(cfg.cell):
        size = math.prod(shape)
        if name == "W":                                                   # [4N, 2M+N] by the input it reads
            for part, c0, c1 in (("W[:, fwd]", 0, m), ("W[:, bwd]", m, 2 * m), ("W[:, h]", 2 * m, 2 * m + n)):
                mask = torch.zeros(4 * n, 2 * m + n)
                mask[:, c0:c1] = 1
                blocks.append((part, off, size, mask.flatten()))
        else:
            blocks.append((name, off, size, torch.ones(size)))
        off += size
    for layer in range(theta.shape[0]):
        for name, start, size, mask in blocks:
            step = torch.zeros_like(theta)
            step[layer, start:start + size] = a.delta * sign[layer, start:start + size] * mask
            print(f"  layer {layer} {name:<10} ±{a.delta:g}: {acc(theta + step)}", flush=True)


if __name__ == "__main__":
    from vsml.training.cli import parse
    main(parse(SensitivityArgs, prog="python experiments/issue15_backprop_sensitivity.py"))
