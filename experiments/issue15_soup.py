"""Issue 15: a model soup, the uniform average of several θ of one learner (checkpoints of one run or
runs of one recipe), saved as a θ .safetensors file with the first checkpoint's config, for
``experiments/issue15_val.py`` / ``eval.py``.  Prints each member's relative L2 distance to the mean.

    python experiments/issue15_soup.py --out /tmp/soup.safetensors \\
        --checkpoints runs/i15-k2-t200/checkpoints/step_000350.pt,runs/i15-k2-seed6/checkpoints/step_000350.pt
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsml.evaluation.load import load_learner
from vsml.training.checkpoint import save_theta


@dataclass(frozen=True)
class SoupArgs:
    """Average θ over checkpoints of one learner."""

    checkpoints: tuple[str, ...]      # run dirs, .pt, θ .safetensors or pretrained:NAME (same learner config)
    out: str                          # the soup's θ .safetensors


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(SoupArgs, prog="python experiments/issue15_soup.py")
    thetas, cfg0 = [], None
    for ck in a.checkpoints:
        _, _, theta, cfg = load_learner(ck, compile=False)
        if cfg0 is not None and (cfg["learner"], cfg["vsml"]) != (cfg0["learner"], cfg0["vsml"]):
            raise SystemExit(f"{ck}: its learner config differs from {a.checkpoints[0]}'s; a soup needs one learner")
        cfg0 = cfg0 or cfg
        thetas.append(theta)
    soup = torch.stack(thetas).mean(0)                                   # [K, L, P] -> [L, P]
    for ck, th in zip(a.checkpoints, thetas):
        print(f"{ck}: |θ − soup| / |soup| = {float((th - soup).norm() / soup.norm()):.4f}")
    save_theta(a.out, soup, cfg0, 0, {"soup_of": ",".join(a.checkpoints)})
    print(f"wrote {a.out}")
