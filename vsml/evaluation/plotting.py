"""Meta-test learning-curve plots (matplotlib, headless), drawn from saved result dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_task_curves(task: str, curves: dict[str, dict[str, Any]], path: str | Path, chance: float | None = None,
                     smoothed_by: int = 1, title: str | None = None) -> Path:
    """One panel: online accuracy vs examples seen, one line per learner with its 95% band over episodes.

    curves: {learner: {"curve_mean": [T], "curve_lo": [T], "curve_hi": [T], "online_accuracy": float}}, as
    written by ``tasks.protocol.meta_test`` (``smoothed_by``: the trailing window it averaged each
    episode's curve over, only used for the axis label).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in curves.items():
        m = np.asarray(c["curve_mean"], dtype=float)
        lo = np.asarray(c["curve_lo"], dtype=float)
        hi = np.asarray(c["curve_hi"], dtype=float)
        x = np.arange(1, len(m) + 1)
        line, = ax.plot(x, m, label=f"{name} (online acc {c['online_accuracy']:.3f})")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("examples seen (online, each predicted before its label)")
    ax.set_ylabel(f"accuracy (trailing mean over {smoothed_by} steps)" if smoothed_by > 1 else "accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"meta-test: {task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (torn or unreadable lines skipped)."""
    import json
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path | None:
    """Meta-training curves of a run: the meta-loss (and cloning loss) per step on the left, the
    meta-test accuracy (or guess error) per task on the right.  None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(v):
        try:
            f = float(v)
        except (TypeError, ValueError):
            return float("nan")        # "nan"/"inf" were logged as strings
        return f

    rows = read_metrics(metrics_path)
    train: dict[str, tuple[list, list]] = {}
    test: dict[str, tuple[list, list]] = {}
    for r in rows:
        s = r.get("step")
        for key, label in (("meta_train/loss_mean", "meta-loss"), ("meta_train/loss", "meta-loss"),
                           ("meta_train/clone_loss", "cloning loss")):
            if key in r:
                xs, ys = train.setdefault(label, ([], []))
                xs.append(s)
                ys.append(num(r[key]))
        for key, v in r.items():
            if key.startswith("meta_test/") and key.endswith(("/online_acc", "/error_mean")):
                task = key[len("meta_test/"):].rsplit("/", 1)[0]
                xs, ys = test.setdefault(f"{task} ({key.rsplit('/', 1)[1]})", ([], []))
                xs.append(s)
                ys.append(num(v))
    if not train and not test:
        return None
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (xs, ys) in train.items():
        a0.plot(xs, ys, label=label)
    a0.set_xlabel("meta-step")
    a0.set_ylabel("loss (population mean)")
    a0.set_title("meta-training")
    a0.grid(alpha=0.3)
    if train:
        a0.legend(fontsize=8)
    for label, (xs, ys) in test.items():
        a1.plot(xs, ys, marker="o", label=label)
    a1.set_xlabel("meta-step")
    a1.set_ylabel("guess error (test split)" if any("error_mean" in k for k in test)
                  else "online accuracy (test split)")
    a1.set_title("meta-test during training")
    a1.grid(alpha=0.3)
    if test:
        a1.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
