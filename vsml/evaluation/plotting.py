"""Meta-test learning-curve plots (matplotlib, headless), drawn from saved result dicts: linear-axis
curves with bands (:func:`plot_task_curves`), log-step-axis curve panels (:func:`plot_log_curves`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LogCurve:
    """One line of :func:`plot_log_curves`: y over step bins x (e.g. ``evaluate.log_binned_curve``), with an
    optional band (lo, hi) drawn around it."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"
    color: Any = None
    band: tuple[Sequence[float], Sequence[float]] | None = None


def decorate_log_axis(ax, title: str, fontsize: float = 7, marks: Sequence[int] = (50, 500, 2000)) -> None:
    """Log step axis, the steps ``marks`` (e.g. meta-training horizons) as faint lines, grid, legend."""
    ax.set_xscale("log")
    ax.set_xlabel("meta-test step (examples seen)")
    ax.set_ylabel("online accuracy (log-spaced bins)")
    ax.set_title(title)
    for h in marks:
        ax.axvline(h, color="0.85", lw=0.8, zorder=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize, loc="upper left")


def plot_log_curves(panels: dict[str, Sequence[LogCurve]], path: str | Path, fontsize: float = 7,
                    marks: Sequence[int] = (50, 500, 2000), width: float = 6.2, height: float = 4.2,
                    dpi: int = 80) -> Path | None:
    """Accuracy-vs-step curves on a log step axis, one panel per key of ``panels`` (its title) side by side;
    used by the horizon study and its seed aggregate.  Returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width * max(1, len(panels)), height), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for c in curves:
            ax.plot(c.x, c.y, c.style, label=c.label, lw=1.4, color=c.color)
            if c.band is not None:
                ax.fill_between(c.x, c.band[0], c.band[1], color=c.color, alpha=0.12, lw=0)
        decorate_log_axis(ax, title, fontsize=fontsize, marks=marks)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
