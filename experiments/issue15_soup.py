"""Issue 15: a model soup, the average θ = Σ_i w_i θ_i (uniform w_i = 1/K unless ``--weights``) of several θ of
one learner (checkpoints of one run, runs of one recipe, or a start and a meta-trained θ: weights (1 − λ, λ) give
θ_start + λ(θ_trained − θ_start)), saved as a θ .safetensors file with the first checkpoint's config, for
``experiments/issue15_val.py`` / ``eval.py``.  Prints each member's relative L2 distance to the soup.

    python experiments/issue15_soup.py --out /tmp/soup.safetensors \\
        --checkpoints runs/i15-k2-t200/checkpoints/step_000350.pt,runs/i15-k2-seed6/checkpoints/step_000350.pt
    python experiments/issue15_soup.py --out vsml/pretrained/mnist14-sgd-bptt-soup.safetensors \\
        --checkpoints pretrained:mnist14-sgd-bptt,analytic:sgd --weights 0.25,0.75     # the shipped soup
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from vsml.evaluation.load import load_learner
from vsml.training.checkpoint import save_theta


def _fail(msg: str) -> None:
    """Bad input: one line on stderr, exit code 2, nothing written."""
    print(f"issue15_soup.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _key(cfg: dict) -> str:
    """The learner part of a config, JSON-normalised (a loaded config has lists where a built one has tuples)."""
    return json.dumps([cfg["learner"], cfg["vsml"]], sort_keys=True)


@dataclass(frozen=True)
class SoupArgs:
    """Average θ over checkpoints of one learner."""

    checkpoints: tuple[str, ...]      # run dirs, .pt, θ .safetensors or pretrained:NAME (same learner config)
    out: str                          # the soup's θ .safetensors
    weights: tuple[float, ...] = ()   # one per checkpoint, summing to 1; empty = uniform


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(SoupArgs, prog="python experiments/issue15_soup.py")
    thetas, cfg0 = [], None
    for ck in a.checkpoints:
        _, _, theta, cfg = load_learner(ck, compile=False)
        if cfg0 is not None and _key(cfg) != _key(cfg0):
            _fail(f"{ck}: its learner config differs from {a.checkpoints[0]}'s; a soup needs one learner")
        cfg0 = cfg0 or cfg
        thetas.append(theta)
    w = a.weights or tuple(1.0 / len(thetas) for _ in thetas)
    if len(w) != len(thetas) or abs(sum(w) - 1.0) > 1e-6:
        _fail(f"--weights needs one weight per checkpoint ({len(thetas)}) summing to 1, got {w}")
    ws = torch.tensor(w, dtype=torch.float64)                            # [K]
    soup = (ws[:, None, None] * torch.stack(thetas).double()).sum(0).to(thetas[0].dtype)   # [K, L, P] -> [L, P]
    for ck, th in zip(a.checkpoints, thetas):
        print(f"{ck}: |θ − soup| / |soup| = {float((th - soup).norm() / soup.norm()):.4f}")
    save_theta(a.out, soup, cfg0, 0, {"soup_of": ",".join(a.checkpoints), "soup_weights": ",".join(map(str, w))})
    print(f"wrote {a.out}")
