"""Metric logging: a JSONL file (always), and wandb (optional, offline or disabled by default).

Metric keys are the same in both sinks: ``meta_train/<name>``, ``meta_test/<task>/<name>``,
``perf/<name>``.  wandb is imported lazily; asking for it when it is not installed is a clear
error, never a silent no-op.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

WandbMode = Literal["disabled", "offline", "online"]


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Writes every ``log`` call as one JSON line ``{"step": s, key: value, ...}`` to
    ``<run_dir>/metrics.jsonl`` (appending, so a resumed run continues the file) and mirrors it to
    wandb when enabled.  Learning curves go to ``log_curves`` (a JSON file per call plus a wandb table
    and line plot)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], wandb_mode: WandbMode = "disabled",
                 project: str = "vsml", name: str | None = None, group: str | None = None,
                 job_type: str = "meta-train", resume_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1)
        self.wandb_run = None
        env_mode = os.environ.get("WANDB_MODE")
        mode = wandb_mode
        if mode != "disabled" and env_mode == "disabled":
            mode = "disabled"       # the environment switches wandb off (e.g. in tests)
        if mode != "disabled":
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    f"wandb logging was requested (mode={mode!r}) but the wandb package is not installed; "
                    "install it with `pip install wandb` (or `pip install -e .[wandb]`), or pass "
                    "--log.wandb disabled") from exc
            self.wandb_run = wandb.init(project=project, name=name, group=group, job_type=job_type,
                                        config=config, dir=str(self.run_dir), mode=mode,
                                        id=resume_id, resume="allow" if resume_id else None)
            self.wandb_run.define_metric("step")
            for pat in ("meta_train/*", "meta_test/*", "perf/*"):
                self.wandb_run.define_metric(pat, step_metric="step")

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**{k: _jsonable(v) for k, v in metrics.items()}, "step": int(step)})

    def log_curves(self, task: str, curves: dict[str, dict[str, list[float]]], step: int) -> None:
        """Meta-test learning curves: {learner: {"mean": [...], "lo": [...], "hi": [...]}}."""
        out = self.run_dir / "curves"
        out.mkdir(exist_ok=True)
        with open(out / f"{task}_step{step:06d}.json", "w") as fh:
            json.dump({"task": task, "step": step, "curves": curves}, fh)
        if self.wandb_run is not None:
            import wandb
            rows = [[name, i, m] for name, c in curves.items() for i, m in enumerate(c["mean"])]
            table = wandb.Table(data=rows, columns=["learner", "example", "accuracy"])
            xs = [list(range(len(c["mean"]))) for c in curves.values()]
            ys = [list(c["mean"]) for c in curves.values()]
            self.wandb_run.log({
                f"meta_test/{task}/curve_table": table,
                f"meta_test/{task}/curve": wandb.plot.line_series(
                    xs=xs, ys=ys, keys=list(curves), title=f"{task}: online accuracy", xname="example"),
                "step": int(step)})

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({key: wandb.Image(str(path)), "step": int(step)})

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = _jsonable(v)

    def close(self) -> None:
        self._fh.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
