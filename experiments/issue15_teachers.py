"""Issue 15: online-SGD teachers whose weights are kept in range vs plain SGD (RESULTS.md, "Teachers whose
weights stay in range lose what makes SGD good").  Train split, episode seed 5.  Run from the repo root:

    python experiments/issue15_teachers.py                   # MNIST-14 + projections, 8 x 4000: decaying α, RMS norms
    python experiments/issue15_teachers.py --table bounded   # MNIST-14, 8 x 2000: weight decay, clipping

The teacher is the cloned one (``vsml.estimators.cloning.teacher_update``: per-synapse w ← (1 − λ) w − α x e,
then clipped; logits mean_a w·x), here with optionally a decaying α_t = α / (1 + t/τ)^p or the weights'
RMS capped after every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tasks import make_family
from vsml.estimators.cloning import teacher_update


def run(x, y, alpha=1.0, tau=0, p=0.5, norm=0.0, lam=0.0, wmax=0.0, marks=()):
    """One teacher on x [E, T, D], y [E, T] (10 classes) from N(0, 1/D) weights.  Returns the per-tick
    accuracy [T] and (std, max |w|) of the weights after each tick in ``marks``."""
    e_num, t_len, d = x.shape
    w = torch.randn(e_num, d, 10) / d ** 0.5
    acc, snaps = [], []
    for t in range(t_len):
        z = (w * x[:, t, :, None]).mean(1)                                   # [E, C]
        acc.append((z.argmax(-1) == y[:, t]).float().mean().item())
        e = torch.softmax(z, -1) - F.one_hot(y[:, t], 10).float()
        a = alpha / (1 + t / tau) ** p if tau else alpha
        w = teacher_update(w, x[:, t], e, a, lam, wmax)
        if norm:
            r = w.square().mean((1, 2), keepdim=True).sqrt()
            w = w * torch.clamp(norm / r, max=1.0)
        if t in marks:
            snaps.append((w.std().item(), w.abs().max().item()))
    return torch.tensor(acc), snaps


@dataclass(frozen=True)
class TeacherArgs:
    """Bounded online-SGD teachers vs plain SGD."""

    table: Literal["range", "bounded"] = "range"   # range: decaying α and RMS norms; bounded: decay and clipping
    data_dir: str = "../shared/datasets"


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(TeacherArgs, prog="python experiments/issue15_teachers.py")
    torch.manual_seed(0)
    if a.table == "range":
        b = make_family("mnist+resize14+proj", data_dir=a.data_dir).sample(8, 4000, seed=5, split="train")
        x, y = b.x.reshape(8, 4000, -1), b.y.long()
        marks = (99, 299, 999, 1999, 3999)
        arms = [("sgd a=1", {}), ("sgd a=0.3", dict(alpha=0.3)), ("sgd a=0.1", dict(alpha=0.1)),
                ("a=1 tau100 p.5", dict(tau=100)), ("a=1 tau30 p1", dict(tau=30, p=1)),
                ("a=1 tau100 p1", dict(tau=100, p=1)),
                *[(f"a=1 rmsnorm {n}", dict(norm=n)) for n in (1.0, 2.0, 4.0)],
                ("a=0.3 rmsnorm 2", dict(alpha=.3, norm=2))]
        for kind, kw in arms:
            acc, snaps = run(x, y, marks=marks, **kw)
            print(f"{kind:28s} online2k {acc[:2000].mean():.3f} last100@2k {acc[1900:2000].mean():.3f} "
                  f"last100@4k {acc[-100:].mean():.3f} std@100/300/1k/2k/4k {[round(s, 2) for s, _ in snaps]}",
                  flush=True)
    else:
        b = make_family("mnist+resize14", data_dir=a.data_dir).sample(8, 2000, seed=5, split="train")
        x, y = b.x.reshape(8, 2000, -1), b.y.long()
        print(x.shape, x.mean().item(), x.std().item(), x.abs().max().item())
        arms = [("sgd a=1", {}), *[(f"wd lam={lam}", dict(lam=lam)) for lam in (1e-3, 3e-3, 1e-2)],
                *[(f"clip {wm}", dict(wmax=wm)) for wm in (0.5, 1.0, 2.0)],
                ("sgd a=0.5 clip1", dict(alpha=0.5, wmax=1.0)), ("sgd a=0.3 clip1", dict(alpha=0.3, wmax=1.0))]
        for kind, kw in arms:
            acc, snaps = run(x, y, marks=(9, 99, 299, 999, 1999), **kw)
            wn = [v for s, m in snaps for v in (round(m, 2), round(s, 3))]
            print(f"{kind:28s} online {acc.mean():.3f} last100 {acc[-100:].mean():.3f} "
                  f"|w|max,std@10/100/300/1000/2000 {wn}", flush=True)
