"""Meta-test: frozen learners run online on held-out task families (vsml.md §3.6); :func:`evaluate`
is the one entry, used by the trainer (through vsml/evaluation/metrics.py), ``eval.py`` and the studies.

A :class:`MetaTestProtocol` says how a task's episodes are drawn and what is measured:
:class:`OnlineClassification` (the default: each learner predicts every example before its label is
seen; ``tasks.protocol.summarize`` turns the per-step correctness into online accuracy, final
accuracy (last 100 steps) and the per-step curve with a 95% band; further metrics of the
correctness matrix plug in through ``metrics=[...]``: :func:`acc_at_steps`, the long-horizon
study's acc@s, and :func:`log_binned_curve`), or the Guessing Game of Micro-Badger
(:class:`vsml.evaluation.badger_eval.GuessingGame`: error curve, solved fraction, state analyses).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tasks import make_family
from tasks.base import derive_seed
from tasks.protocol import summarize
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


CorrectnessMetric = Callable[[np.ndarray], dict[str, Any]]
"""A metric of the per-step correctness matrix [E, T] (1 = the prediction made before y_t was right)."""


def acc_at_steps(steps: Sequence[int], window: float = 0.2) -> CorrectnessMetric:
    """acc@s for each s in ``steps`` (those <= T): the mean accuracy over steps (s − window·s, s]
    (0-based [⌊(1 − window) s⌋, s)) and ``ci@s``, the 95% half-width over episodes (1.96 σ / √E)."""
    def metric(correct: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in steps:
            if s <= correct.shape[1]:
                per_ep = correct[:, math.floor((1 - window) * s):s].mean(1)              # [E]
                n = len(per_ep)
                out[f"acc@{s}"] = float(per_ep.mean())
                out[f"ci@{s}"] = float(1.96 * per_ep.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        return out
    return metric


def log_binned_curve(n_bins: int = 40) -> CorrectnessMetric:
    """The accuracy curve in ``n_bins`` log-spaced step bins (for a log axis): ``curve_x`` (bin centres,
    geometric means of the edges) and ``curve_y`` (mean accuracy in the bin)."""
    def metric(correct: np.ndarray) -> dict[str, Any]:
        t = correct.shape[1]
        edges = np.unique(np.round(np.logspace(0, math.log10(t), n_bins + 1)).astype(int))
        xs, ys = [], []
        for a, b in itertools.pairwise(edges):
            xs.append(float(math.sqrt(a * b)))
            ys.append(float(correct[:, a - 1:b - 1].mean()) if b > a else float("nan"))
        return {"curve_x": xs, "curve_y": ys}
    return metric


LossMetric = Callable[[np.ndarray], dict[str, Any]]
"""A metric of the per-step online loss matrix [E, T] (cross-entropy of the prediction made before y_t)."""


def loss_over_first(steps: Sequence[int]) -> LossMetric:
    """``loss@s`` for each s in ``steps`` (those <= T): the mean online loss over the first s steps of every
    episode (e.g. a meta-training objective measured at its horizon)."""
    def metric(loss: np.ndarray) -> dict[str, Any]:
        return {f"loss@{s}": float(loss[:, :s].mean()) for s in steps if s <= loss.shape[1]}
    return metric


class MetaTestProtocol(Protocol):
    """How a task's meta-test episodes are drawn and what is measured on them (one per kind of task)."""

    def episodes(self, spec: str, num: int, length: int, seed: int, split: str, data_dir: str | None,
                 device: torch.device | str | None) -> tuple[Any, Any]:
        """(EpisodeBatch, its family) of a task, built on ``device`` where the protocol can."""
        ...

    def measure(self, fl: FrozenLearner, batch: Any, family: Any, seed: int | None) -> dict[str, Any]:
        """The result of one frozen learner on the batch (Python scalars / lists / tensors); ``seed``
        draws the learner's initial states."""
        ...


@dataclass(frozen=True)
class OnlineClassification:
    """The classification meta-test (vsml.md §3.6): one batch of episodes drawn with seed
    ``derive_seed(seed, "eval-batch", 0)`` (the draw of :func:`tasks.protocol.meta_test`); the result is
    :func:`tasks.protocol.summarize` (online / final accuracy, loss, the per-step curve with its 95% band;
    ``smooth``: each episode's 0/1 curve is averaged over a trailing window of this many steps before
    the band, the scalar accuracies never are), the family's ``name``, ``split``, ``num_classes`` and
    ``chance``, the ``metrics`` of the correctness matrix [E, T] (e.g. :func:`acc_at_steps`) and the
    ``loss_metrics`` of the loss matrix [E, T] (e.g. :func:`loss_over_first`)."""

    smooth: int = 25
    metrics: Sequence[CorrectnessMetric] = ()
    split: str = "test"
    loss_metrics: Sequence[LossMetric] = ()

    def episodes(self, spec: str, num: int, length: int, seed: int, split: str, data_dir: str | None,
                 device: torch.device | str | None) -> tuple[Any, Any]:
        fam = make_family(spec, data_dir=data_dir)
        return fam.sample(num, length, derive_seed(seed, "eval-batch", 0), split, device=device), fam

    def measure(self, fl: FrozenLearner, batch: Any, family: Any, seed: int | None) -> dict[str, Any]:
        out = fl.run(batch, seed=seed)
        correct = out["correct"].to(torch.float64).numpy()                              # [E, T]
        loss = out["loss"].to(torch.float64).numpy()                                    # [E, T]
        r = summarize(correct, loss, smooth=min(self.smooth, correct.shape[1]))
        r.update(name=batch.name if family is None else family.name, split=self.split,
                 num_classes=batch.num_classes, chance=1.0 / batch.num_classes)
        for m in self.metrics:
            r.update(m(correct))
        for m in self.loss_metrics:
            r.update(m(loss))
        return r


def evaluate(learners: list[FrozenLearner], task_specs: list[str], episodes: int, length: int, seed: int | None,
             data_dir: str | None = None, split: str = "test", smooth: int = 25,
             metrics: Sequence[CorrectnessMetric] = (), loss_metrics: Sequence[LossMetric] = (),
             batches: Mapping[str, Any] | None = None,
             protocol: MetaTestProtocol | None = None, device: torch.device | str | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """The one meta-test entry: {task: {learner: result}}, every learner on the same episodes of every task.

    ``protocol`` draws the episodes and measures (default :class:`OnlineClassification` with ``smooth``,
    ``metrics`` and ``loss_metrics``; the Guessing Game: :class:`vsml.evaluation.badger_eval.GuessingGame`);
    ``batches[task]``, when given, replaces the protocol's draw (a study's own cached episodes).
    ``seed`` draws the episodes and the learners' initial states (None, with ``batches``: the historic
    initial-state rule of :func:`state_seed`).  ``device``: where the episodes are
    built (default: the first learner's θ device), so a GPU meta-test builds its batches on the GPU.
    ``progress``: called with a line before and after each (task, learner) pair (e.g. ``tqdm.write``)."""
    protocol = protocol or OnlineClassification(smooth=smooth, metrics=tuple(metrics), split=split,
                                                loss_metrics=tuple(loss_metrics))
    if device is None and learners:
        device = learners[0].theta.device
    results: dict[str, dict[str, dict[str, Any]]] = {}
    n, i = len(task_specs) * len(learners), 0
    for spec in task_specs:
        if batches is not None and spec in batches:
            batch, family = batches[spec], None
        else:
            batch, family = protocol.episodes(spec, episodes, length, seed, split, data_dir, device)
        results[spec] = {}
        for fl in learners:
            i += 1
            t0 = time.time()
            if progress is not None:
                progress(f"[eval] ({i}/{n}) {spec}: {fl.name} on {episodes} episodes x {length} examples ...")
            r = protocol.measure(fl, batch, family, seed)
            r = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()}
            results[spec][fl.name] = r
            if progress is not None:
                score = (f"online acc {r['online_accuracy']:.3f}" if "online_accuracy" in r else
                         f"error mean {r['error_mean']:.3f}")
                progress(f"[eval] ({i}/{n}) {spec}: {fl.name} {score} ({time.time() - t0:.1f} s)")
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
