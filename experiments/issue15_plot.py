"""Issue 15: learning curves (trailing-window mean over episodes) of several eval.py results.json files on one
plot per task, linear and log x-axis.

    python experiments/issue15_plot.py --results "NAME=path/results.json,NAME2=path2/results.json" --out docs/issue15/curves
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402



@dataclass(frozen=True)
class PlotArgs:
    """Curves of several eval.py results.json files, one plot per task, linear and log x."""

    results: tuple[str, ...]          # PREFIX=results.json ('' prefix keeps the learner names)
    out: str                          # output path prefix


from vsml.training.cli import parse  # noqa: E402
a = parse(PlotArgs, prog="python experiments/issue15_plot.py")
curves: dict[str, dict[str, dict]] = {}
for spec in a.results:
    prefix, path = spec.split("=", 1)
    for task, per in json.loads(Path(path).read_text()).items():
        for name, r in per.items():
            label = f"{prefix}{name}" if not prefix else (prefix if name.startswith("vsml") or len(per) == 1 else name)
            curves.setdefault(task, {}).setdefault(label, r)
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
for task, per in curves.items():
    for log in (False, True):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, r in per.items():
            m = np.asarray(r["curve_mean"], float)
            x = np.arange(1, len(m) + 1)
            ax.plot(x, m, label=f"{label} ({r['online_accuracy']:.3f})", lw=1.3)
            if "curve_lo" in r:
                ax.fill_between(x, r["curve_lo"], r["curve_hi"], alpha=0.15)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("examples seen (online)" + (" — log scale" if log else ""))
        ax.set_ylabel("accuracy (trailing mean)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        safe = task.replace("+", "_").replace("[", "").replace("]", "").replace("=", "")
        fig.tight_layout()
        fig.savefig(f"{a.out}_{safe}{'_logx' if log else ''}.png", dpi=110)
        plt.close(fig)
print("wrote", a.out + "_*.png")
