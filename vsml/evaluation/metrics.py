"""Meta-test metrics: how a frozen learner is judged, chosen by its registry entry
(``vsml.learners.registry.LearnerSpec.metric``), so the training loop and ``eval.py`` never ask which
learner they run.

* ``classification`` (:class:`ClassificationMetric`): online / final accuracy and the per-step
  accuracy curve on held-out test-split families (vsml.md §3.6), via :func:`vsml.evaluation.evaluate.evaluate`.
* ``guessing`` (:class:`GuessingMetric`): the Guessing-Game error curve, solved fraction and the
  state analyses of Micro-Badger (badger-bmg-es.md §A.5, §B), via vsml/evaluation/badger_eval.py.

Both return ``{task: {learner name: result dict}}`` (plus ``"_paths"`` after the final meta-test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["ClassificationMetric", "GuessingMetric", "MetaTestMetric", "SavedEval", "metric_for"]


@dataclass(frozen=True)
class SavedEval:
    """What ``eval.py`` asks of a saved learner's meta-test (None: the metric's / the run's default)."""

    checkpoint: str | None = None
    tasks: str | None = None
    episodes: int | None = None
    length: int | None = None
    seed: int = 22
    smooth: int = 25
    out: str | None = None
    data_dir: str | None = None
    plot: bool = True


class MetaTestMetric(Protocol):
    name: str

    def meta_test(self, cfg: Any, learner: Any, theta: torch.Tensor, step: int, logger: Any, run_dir: Path,
                  final: bool = False, progress: Callable[[str], None] | None = None) -> dict:
        """Meta-test θ during / after training (``cfg`` a TrainConfig): log, and on ``final`` write results;
        ``progress`` receives progress lines (vsml.evaluation.evaluate.evaluate)."""
        ...

    def progress_line(self, res: dict, name: str) -> str:
        """One line for the training log from :meth:`meta_test`'s result for learner ``name``."""
        ...

    def report(self, res: dict, cfg: Any) -> str:
        """The final table."""
        ...

    def summary(self, res: dict) -> dict[str, float]:
        """Scalars for the run summary (wandb)."""
        ...

    def evaluate_saved(self, learners: list, cfg_dict: dict, req: SavedEval,
                       progress: Callable[[str], None] | None = None) -> int:
        """``eval.py``: meta-test ``learners`` (FrozenLearners, the checkpoint's first; ``cfg_dict`` its run
        config, ``{}`` without one), write results and plots, print the table; returns the exit code."""
        ...


def _tasks(res: dict) -> dict:
    return {t: per for t, per in res.items() if t != "_paths"}


def _online_acc_summary(res: dict) -> dict[str, float]:
    """final/<task>/<learner>/online_acc (for Micro-Badger: the fraction of solved steps, badger_meta_test)."""
    return {f"final/{t}/{n}/online_acc": r["online_accuracy"] for t, per in _tasks(res).items()
            for n, r in per.items()}


class ClassificationMetric:
    """Online classification on the ``eval.tasks`` families (test split); the final meta-test adds the
    ``eval.baselines`` and writes results.json plus one curve PNG per task."""

    name = "classification"

    def meta_test(self, cfg: Any, learner: Any, theta: torch.Tensor, step: int, logger: Any, run_dir: Path,
                  final: bool = False, progress: Callable[[str], None] | None = None) -> dict:
        from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list, write_results
        from vsml.learners import registry
        learners = [FrozenLearner(cfg.learner, learner, theta.detach())]
        if final and cfg.eval.baselines:
            for b in [s.strip() for s in cfg.eval.baselines.split(",") if s.strip()]:
                bl = registry.build(b)
                learners.append(FrozenLearner(b, bl, bl.init_theta().to(theta.device)))
        res = evaluate(learners, parse_task_list(cfg.eval.tasks), cfg.eval.episodes, cfg.eval.length,
                       cfg.eval.seed, cfg.data_dir, progress=progress)
        metrics = {}
        for task, per in res.items():
            r = per[cfg.learner]
            metrics[f"meta_test/{task}/online_acc"] = r["online_accuracy"]
            metrics[f"meta_test/{task}/final_acc"] = r["final_accuracy"]
            metrics[f"meta_test/{task}/loss"] = r["loss"]
            logger.log_curves(task, {n: {"mean": v["curve_mean"], "lo": v["curve_lo"], "hi": v["curve_hi"]}
                                     for n, v in per.items()}, step)
        logger.log(metrics, step)
        if final:
            paths = write_results(res, Path(run_dir) / "meta_test")
            for task, p in paths.items():
                if task != "json":
                    logger.log_image(f"meta_test/{task}/plot", p, step)
            res["_paths"] = {k: str(v) for k, v in paths.items()}
        return res

    def progress_line(self, res: dict, name: str) -> str:
        return ", ".join(f"{t}: online acc {per[name]['online_accuracy']:.3f}" for t, per in _tasks(res).items())

    def report(self, res: dict, cfg: Any) -> str:
        from vsml.evaluation.evaluate import summary_table
        return summary_table(_tasks(res))

    summary = staticmethod(_online_acc_summary)

    def evaluate_saved(self, learners: list, cfg_dict: dict, req: SavedEval,
                       progress: Callable[[str], None] | None = None) -> int:
        """Online classification of every learner (16 episodes x 2000 examples, the run's eval tasks,
        unless given); results.json + one curve PNG per task in ``req.out`` (default ``<run>/eval``)."""
        from vsml.evaluation.evaluate import evaluate, parse_task_list, summary_table, write_results
        episodes = 16 if req.episodes is None else req.episodes
        length = 2000 if req.length is None else req.length
        tasks = req.tasks or cfg_dict.get("eval", {}).get("tasks", "digits")
        out = req.out
        if out is None and req.checkpoint:
            if req.checkpoint.startswith("pretrained:"):
                out = f"eval_{req.checkpoint.split(':', 1)[1]}"
            else:
                p = Path(req.checkpoint)
                out = str((p if p.is_dir() else p.parent) / "eval")
        if progress:
            progress(f"[eval] {len(learners)} learner(s) x {len(parse_task_list(tasks))} task(s), {episodes} "
                     f"episodes x {length} examples each (seed {req.seed}) ...")
        res = evaluate(learners, parse_task_list(tasks), episodes, length, req.seed, req.data_dir,
                       smooth=max(1, req.smooth), progress=progress)
        paths = write_results(res, out or "eval_out", plot=req.plot)
        print(summary_table(res))
        print(f"\nresults: {paths['json']}")
        for k, p in paths.items():
            if k != "json":
                print(f"plot {k}: {p}")
        return 0


class GuessingMetric:
    """The Guessing Game, a regression game: guess errors (the scaled MSE feedback, chance 1), not accuracies."""

    name = "guessing"

    def meta_test(self, cfg: Any, learner: Any, theta: torch.Tensor, step: int, logger: Any, run_dir: Path,
                  final: bool = False, progress: Callable[[str], None] | None = None) -> dict:
        from vsml.evaluation.badger_eval import badger_meta_test
        return badger_meta_test(cfg, learner, theta, step, logger, run_dir, final)

    def progress_line(self, res: dict, name: str) -> str:
        return ", ".join(f"{t}: error mean {per[name]['error_mean']:.3f} / last {per[name]['error_last']:.3f}"
                         for t, per in _tasks(res).items())

    def report(self, res: dict, cfg: Any) -> str:
        lines = [f"{'task':<24}{'error mean':>12}{'error last':>12}{'solved frac':>13}  episodes x T"]
        for t, per in _tasks(res).items():
            r = per[cfg.learner]
            lines.append(f"{t:<24}{r['error_mean']:>12.4f}{r['error_last']:>12.4f}{r['solved_frac']:>13.4f}  "
                         f"{cfg.eval.episodes} x {cfg.eval.length}")
        lines.append(f"(error: the scaled MSE feedback, chance 1; solved frac: steps with error < "
                     f"{cfg.badger.solved_threshold})")
        return "\n".join(lines)

    summary = staticmethod(_online_acc_summary)

    def evaluate_saved(self, learners: list, cfg_dict: dict, req: SavedEval,
                       progress: Callable[[str], None] | None = None) -> int:
        """A fresh held-out Guessing-Game meta-test of the checkpoint's learner (baselines do not play it),
        its analyses and the run's training plots (:func:`vsml.evaluation.badger_eval.eval_run`)."""
        from vsml.evaluation.badger_eval import eval_run
        first = learners[0]
        return eval_run(req.checkpoint, first.learner, first.theta, cfg_dict, req.tasks, req.episodes, req.length,
                        req.seed, req.out, plot=req.plot)


METRICS: dict[str, MetaTestMetric] = {"classification": ClassificationMetric(), "guessing": GuessingMetric()}


def metric_for(learner: str) -> MetaTestMetric:
    """The meta-test metric the learner registry names for ``learner``."""
    from vsml.learners.registry import spec
    return METRICS[spec(learner).metric]
