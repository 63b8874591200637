"""Issue 15, the deep net: how far online backprop on the 196→16→10 MLP (the learner ``analytic:backprop`` writes
into θ) drifts from *itself* under rounding.  Runs the MLP (``cloning_deep.mlp_sgd_step`` with the builder's α 0.01 / 1, γ = 14,
from ``analytic.backprop_initial_weights``) three times on the same test-split episodes: in float64, in float32,
and in float64 from initial weights perturbed by a relative 1e-6.  Prints per window the relative logit error
||ŷ − ŷ_64|| / ||ŷ_64|| (logits centred over classes, as ``--drift``) and the fraction of equal predictions.
If the float32 MLP drifts from the float64 one as far as the VSML learner drifts from the MLP, the learner's late
disagreement is the MLP's own sensitivity to rounding, not an imitation error.

    python experiments/issue15_backprop_chaos.py --task mnist+resize14 --data_dir ../shared/datasets
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks import make_family
from vsml.engine.analytic import BACKPROP_CONFIG, backprop_initial_weights, resolved_options
from vsml.engine.state import init_state
from vsml.estimators.cloning_deep import mlp_sgd_step


@dataclass(frozen=True)
class ChaosArgs:
    """Rounding sensitivity of online backprop on the MLP of analytic:backprop."""

    task: str = "mnist+resize14"
    episodes: int = 16
    length: int = 10000
    seed: int = 22
    split: str = "test"
    data_dir: str | None = None
    json: str | None = None


def main(a: ChaosArgs) -> dict:
    b = make_family(a.task, data_dir=a.data_dir).sample(a.episodes, a.length, seed=a.seed, split=a.split)
    st = init_state(BACKPROP_CONFIG, a.episodes, b.x.shape[2], b.num_classes, torch.Generator().manual_seed(a.seed))
    w32 = backprop_initial_weights(st)                                  # [E, D, 16], [E, 16, C]
    w64 = [w.double() for w in w32]
    noise = torch.randn(w64[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wp = [w64[0] * (1 + 1e-6 * noise), w64[1].clone()]
    _, opt = resolved_options("analytic:backprop")                     # the MLP's α and γ: the builder's defaults
    alphas, gain = [opt["hidden_alpha"], opt["alpha"]], opt["gain"]
    names = ("float32", "perturbed")
    rel = {k: torch.zeros(a.length) for k in names}
    agree = {k: torch.zeros(a.length) for k in names}
    for t in range(a.length):
        x64 = b.x[:, t].double()
        ref = mlp_sgd_step(w64, x64, b.y[:, t], b.num_classes, alphas, gain=gain)
        f32 = mlp_sgd_step(w32, b.x[:, t], b.y[:, t], b.num_classes, alphas, gain=gain)
        per = mlp_sgd_step(wp, x64, b.y[:, t], b.num_classes, alphas, gain=gain)
        w64, w32, wp = ref.new_w, f32.new_w, per.new_w
        tc = ref.logits - ref.logits.mean(-1, keepdim=True)                  # [E, C]
        for k, lg in zip(names, (f32.logits.double(), per.logits)):
            lc = lg - lg.mean(-1, keepdim=True)
            rel[k][t] = ((lc - tc).norm(dim=-1) / tc.norm(dim=-1).clamp(min=1e-8)).mean()
            agree[k][t] = (lg.argmax(-1) == ref.logits.argmax(-1)).double().mean()
    edges = [e for e in (0, 10, 30, 100, 300, 1000, 2000, 5000, 10000) if e < a.length] + [a.length]
    out = {"task": a.task, "episodes": a.episodes, "length": a.length, "seed": a.seed, "split": a.split, "window": []}
    for k in names:
        out[f"{k}_rel_err"], out[f"{k}_agree"] = [], []
    print(f"online backprop on the MLP of analytic:backprop vs its float64 run, {a.task} ({a.episodes} episodes, "
          f"{a.split} split)")
    for lo, hi in itertools.pairwise(edges):
        out["window"].append(f"[{lo}, {hi})")
        line = f"  ticks [{lo}, {hi})".ljust(22)
        for k in names:
            r, g = rel[k][lo:hi].mean().item(), agree[k][lo:hi].mean().item()
            out[f"{k}_rel_err"].append(r)
            out[f"{k}_agree"].append(g)
            line += f"  {k}: rel {r:.3g}, same prediction {g:.3f}"
        print(line)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    from vsml.training.cli import parse
    main(parse(ChaosArgs, prog="python experiments/issue15_backprop_chaos.py"))
