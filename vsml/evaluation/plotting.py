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
