"""The meta-test protocol (vsml.md §3.6): a frozen learner runs online over T test-split examples per episode,
predicting each example before its label is seen; we report online accuracy (mean over the whole curve),
final accuracy (mean over the last steps) and the per-step curve with a 95% confidence band over episodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .base import EpisodeBatch, TaskFamily, derive_seed

__all__ = ["DEFAULT_EVAL_SEED", "RunFn", "meta_test", "moving_average", "summarize"]

#: The reference's ``evaluation.seed``.
DEFAULT_EVAL_SEED = 22

#: run_fn(batch) -> {"correct": [E, T] bool/float, "loss": [E, T] float, ...}
RunFn = Callable[[EpisodeBatch], Mapping[str, Any]]


def _to_numpy(v: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(v, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"meta_test: run_fn returned {name!r} of shape {arr.shape}, expected [E, T] = {shape}")
    return arr


def moving_average(curves: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis, same length (the first steps average what exists)."""
    if window <= 1:
        return curves
    c = np.cumsum(curves, axis=-1)
    out = c.copy()
    out[..., window:] = c[..., window:] - c[..., :-window]
    counts = np.minimum(np.arange(1, curves.shape[-1] + 1), window)
    return out / counts


def _band(per_episode: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean, lo, hi over axis 0 with half-width z * std / sqrt(E) (std with ddof=1; 0 for E=1)."""
    e = per_episode.shape[0]
    mean = per_episode.mean(axis=0)
    std = per_episode.std(axis=0, ddof=1) if e > 1 else np.zeros_like(mean)
    half = z * std / math.sqrt(e)
    return mean, mean - half, mean + half


def summarize(
    correct: np.ndarray, loss: np.ndarray, *, final_window: int = 100, smooth: int = 1
) -> dict[str, Any]:
    """Metrics from per-step results of E episodes.

    Args:
        correct: [E, T] 1.0 where the prediction (made before the label was seen) was right.
        loss: [E, T] per-step loss.
        final_window: the final accuracy averages the last ``final_window`` steps (clipped to T).
        smooth: trailing moving-average window applied to each episode's curve before the band (1 = none).

    Returns:
        ``online_accuracy`` (mean over all steps and episodes), ``final_accuracy`` (mean over the last
        ``final_window`` steps), ``loss`` (mean), ``final_loss``, ``online_accuracy_ci95`` / ``final_accuracy_ci95``
        (half-widths of 95% intervals over episodes), ``episode_online_accuracy`` [E], ``curve_mean``,
        ``curve_lo``, ``curve_hi`` [T] (accuracy per step, band mean +- 1.96 std/sqrt(E), clipped to [0, 1]),
        ``loss_curve_mean`` [T], ``num_episodes``, ``length``, ``final_window``, ``smooth``. Scalars are Python
        floats / ints; the arrays are float64 CPU ``torch.Tensor``s (``.tolist()`` for JSON).
    """
    e, t = correct.shape
    w = max(1, min(int(final_window), t))
    ep_online = correct.mean(axis=1)  # [E]
    ep_final = correct[:, t - w:].mean(axis=1)  # [E]
    ci = lambda v: float(1.96 * v.std(ddof=1) / math.sqrt(e)) if e > 1 else 0.0
    curve_mean, lo, hi = _band(moving_average(correct, smooth))
    t64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    return {
        "online_accuracy": float(ep_online.mean()),
        "online_accuracy_ci95": ci(ep_online),
        "final_accuracy": float(ep_final.mean()),
        "final_accuracy_ci95": ci(ep_final),
        "loss": float(loss.mean()),
        "final_loss": float(loss[:, t - w:].mean()),
        "episode_online_accuracy": t64(ep_online),
        "curve_mean": t64(curve_mean),
        "curve_lo": t64(np.clip(lo, 0.0, 1.0)),
        "curve_hi": t64(np.clip(hi, 0.0, 1.0)),
        "loss_curve_mean": t64(loss.mean(axis=0)),
        "num_episodes": int(e),
        "length": int(t),
        "final_window": int(w),
        "smooth": int(smooth),
    }


def meta_test(
    run_fn: RunFn,
    family: TaskFamily,
    num_episodes: int,
    length: int = 2000,
    seed: int = DEFAULT_EVAL_SEED,
    batch_size: int | None = None,
    *,
    split: str = "test",
    final_window: int = 100,
    smooth: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run a frozen learner online over ``num_episodes`` episodes of ``length`` steps and summarise.

    Args:
        run_fn: takes an :class:`EpisodeBatch` and returns at least ``"correct"`` ([E, T] bool or float: the
            prediction for x_t, made before y_t was seen, was right) and ``"loss"`` ([E, T] float). The learner
            must be frozen (no meta-parameter changes); only its inner state may learn within the episode.
        family: the task family; a mixture picks one member per batch (from the batch seed), so evaluate each
            dataset with its own family for per-dataset numbers.
        num_episodes: number of episodes in total.
        length: T, steps per episode (vsml.md: 2000).
        seed: evaluation seed; batch i uses ``derive_seed(seed, "eval-batch", i)``.
        batch_size: episodes per ``run_fn`` call (default: all at once).
        split: data split, ``"test"`` by default.
        final_window: number of last steps averaged for ``final_accuracy`` (default 100).
        smooth: trailing moving-average window for the curve and its band (1 = none).
        device: where batches are built (see :meth:`TaskFamily.sample`).

    Returns:
        The dict of :func:`summarize` plus ``"name"`` (family name), ``"split"``, ``"num_classes"`` (None if
        the batches differ) and ``"chance"`` (1 / num_classes, or None).
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    bs = num_episodes if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    corrects, losses = [], []
    class_counts: set[int] = set()
    done, i = 0, 0
    while done < num_episodes:
        n = min(bs, num_episodes - done)
        batch = family.sample(n, length, derive_seed(seed, "eval-batch", i), split, device=device)
        class_counts.add(batch.num_classes)
        out = run_fn(batch)
        if "correct" not in out or "loss" not in out:
            raise KeyError(f"meta_test: run_fn must return 'correct' and 'loss', got keys {sorted(out)}")
        corrects.append(_to_numpy(out["correct"], "correct", (n, length)))
        losses.append(_to_numpy(out["loss"], "loss", (n, length)))
        done += n
        i += 1
    result = summarize(np.concatenate(corrects), np.concatenate(losses), final_window=final_window, smooth=smooth)
    result.update({
        "name": family.name,
        "split": split,
        "num_classes": class_counts.pop() if len(class_counts) == 1 else None,
        "chance": None,
    })
    if result["num_classes"]:
        result["chance"] = 1.0 / result["num_classes"]
    return result
