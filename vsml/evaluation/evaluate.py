"""Meta-test: frozen learners run online on test-split task families (vsml.md §3.6).

Each learner predicts every example before its label is seen; ``tasks.protocol.meta_test`` turns
the per-step correctness into online accuracy (mean over the curve), final accuracy (last 100
steps) and the per-step curve with a 95% band.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks import make_family
from tasks.protocol import meta_test
from vsml.learners.base import state_generator


@dataclass
class FrozenLearner:
    """A learner with fixed meta-parameters θ (empty for SGD/Adam baselines)."""

    name: str
    learner: Any
    theta: torch.Tensor
    max_batch: int = 64      # episodes per forward call (memory)

    def run(self, batch, seed: int | None = None) -> dict[str, torch.Tensor]:
        """EpisodeBatch -> {"correct": [E, T], "loss": [E, T]} (no gradients, fresh state per episode).

        ``seed``: the evaluation seed; it draws the learners' initial states (see :func:`state_seed`)."""
        outs_c, outs_l = [], []
        dev = self.theta.device
        with torch.no_grad():
            for e0 in range(0, batch.x.shape[0], self.max_batch):
                x = batch.x[e0:e0 + self.max_batch].to(dev)
                y = batch.y[e0:e0 + self.max_batch].to(dev)
                # initial states drawn on the learner's device (CPU: the numbers of every earlier version)
                gen = state_generator(self.learner, state_seed(seed, e0), dev)
                out = self.learner.unroll(self.theta, x, y, batch.num_classes, generator=gen)
                outs_c.append(out.correct.float().cpu())
                outs_l.append(out.loss.float().cpu())
        return {"correct": torch.cat(outs_c), "loss": torch.cat(outs_l)}


#: eval seed whose initial-state draw keeps the historic rule (10007·(chunk+1)), so numbers published
#: with the default ``--seed 22`` / ``eval.seed`` reproduce exactly
HISTORIC_EVAL_SEED = 22


def state_seed(seed: int | None, chunk_start: int) -> int:
    """Seed of the initial inner states of the episodes starting at ``chunk_start``."""
    if seed is None or seed == HISTORIC_EVAL_SEED:
        return 10_007 * (chunk_start + 1)
    from tasks.base import derive_seed
    return derive_seed(seed, "eval-initial-states", chunk_start)


def parse_task_list(spec: str) -> list[str]:
    """Task specs separated by ';' (a single spec may contain ',' as in ``mix:a,b``)."""
    return [s.strip() for s in spec.split(";") if s.strip()]


def evaluate(learners: list[FrozenLearner], task_specs: list[str], episodes: int, length: int, seed: int,
             data_dir: str | None = None, split: str = "test", smooth: int = 25,
             device: torch.device | str | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {learner: result dict of tasks.protocol.meta_test}}; all learners see the same episodes.

    ``smooth``: each episode's 0/1 correctness curve is averaged over a trailing window of this many
    steps before the mean curve and its 95% band over episodes are formed (the scalar accuracies are
    never smoothed).  ``seed`` draws the episodes and the learners' initial states.

    ``device``: where the episodes are sampled (default: the first learner's θ device), so a GPU
    meta-test builds its batches on the GPU.  ``progress``: called with a line before and after each
    (task, learner) pair (e.g. ``tqdm.write``)."""
    if device is None and learners:
        device = learners[0].theta.device
    results: dict[str, dict[str, dict[str, Any]]] = {}
    n, i = len(task_specs) * len(learners), 0
    for spec in task_specs:
        fam = make_family(spec, data_dir=data_dir)
        results[spec] = {}
        for fl in learners:
            i += 1
            t0 = time.time()
            if progress is not None:
                progress(f"[eval] ({i}/{n}) {spec}: {fl.name} on {episodes} episodes x {length} examples ...")
            r = meta_test(functools.partial(fl.run, seed=seed), fam, num_episodes=episodes, length=length,
                          seed=seed, split=split, smooth=min(smooth, length), device=device)
            results[spec][fl.name] = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()}
            if progress is not None:
                progress(f"[eval] ({i}/{n}) {spec}: {fl.name} online acc "
                         f"{results[spec][fl.name]['online_accuracy']:.3f} ({time.time() - t0:.1f} s)")
    return results


def chance_level(results_for_task: dict[str, dict[str, Any]]) -> float | None:
    for r in results_for_task.values():
        if "num_classes" in r:
            return 1.0 / r["num_classes"]
    return None


def summary_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A plain-text table: task, learner, online accuracy, final accuracy, loss."""
    rows = [("task", "learner", "online acc", "final acc", "loss", "episodes x T")]
    for task, per in results.items():
        for name, r in per.items():
            rows.append((task, name, f"{r['online_accuracy']:.4f}", f"{r['final_accuracy']:.4f}",
                         f"{r['loss']:.4f}", f"{r['num_episodes']} x {r['length']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """results.json plus one PNG per task; returns {"json": path, task: png path, ...}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"json": out_dir / "results.json"}
    with open(paths["json"], "w") as fh:
        json.dump(results, fh)
    if plot:
        from vsml.evaluation.plotting import plot_task_curves
        for task, per in results.items():
            safe = "".join(ch if ch.isalnum() or ch in "-_+" else "_" for ch in task)
            smooth = max(int(r.get("smooth", 1)) for r in per.values())
            paths[task] = plot_task_curves(task, per, out_dir / f"curve_{safe}.png",
                                           chance=chance_level(per), smoothed_by=smooth)
    return paths
