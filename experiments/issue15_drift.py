"""Issue 15: why a learner collapses after its meta-training horizon.  Unrolls each learner (frozen θ) over
validation episodes (train split) and prints, every ``every`` examples, the accuracy of that stretch and the
mean / max |c| of each sub-LSTM state element over all (input, output) pairs of the dense layer
([E, A, B, N] -> [N]).  In ``analytic:sgd`` element k = ``cell.num_rand`` holds the weight (c_k = ε w).

    python experiments/issue15_drift.py --checkpoints analytic:sgd,pretrained:mnist14-sgd-bptt --data_dir ../shared/datasets
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsml.evaluation.evaluate import OnlineClassification
from vsml.evaluation.load import load_learner
from vsml.learners.base import state_generator


@dataclass(frozen=True)
class DriftArgs:
    """Per-element cell-state magnitudes of frozen VSML learners over long validation episodes."""

    checkpoints: tuple[str, ...]      # run dirs, .pt, θ .safetensors, pretrained:NAME or analytic:NAME
    task: str = "mnist+resize14"
    episodes: int = 2
    length: int = 10000
    every: int = 1000
    seed: int = 101
    data_dir: str | None = None


if __name__ == "__main__":
    from vsml.training.cli import parse
    a = parse(DriftArgs, prog="python experiments/issue15_drift.py")
    batch, _ = OnlineClassification(smooth=1).episodes(a.task, a.episodes, a.length, a.seed, "train", a.data_dir, "cpu")
    x, y = batch.x, batch.y                                             # [E, T, D], [E, T]
    for ck in a.checkpoints:
        _, learner, theta, _ = load_learner(ck, compile=False)
        st = learner.init_state(x.shape[0], x.shape[2], batch.num_classes, state_generator(learner, a.seed),
                                theta.dtype, theta.device)
        print(f"== {ck} ({a.task}, {a.episodes} train-split episodes, seed {a.seed})")
        with torch.no_grad():
            for t0 in range(0, a.length, a.every):
                out = learner.unroll(theta, x[:, t0:t0 + a.every], y[:, t0:t0 + a.every], batch.num_classes, state=st)
                st = out.state
                c = st.c[0].abs().flatten(0, -2)                        # [E, A, B, N] -> [E·A·B, N]
                mean, mx = c.mean(0), c.amax(0)                         # [N]
                print(f"  examples {t0 + a.every:6d}  accuracy {out.correct.float().mean().item():.3f}  mean|c| "
                      + " ".join(f"{v:.2g}" for v in mean.tolist()) + "  max|c| " + " ".join(f"{v:.2g}" for v in mx.tolist()),
                      flush=True)
