"""Micro-Badger meta-test, analysis records and plots (badger-bmg-es.md §A.5, §B).

``train()`` calls :func:`badger_meta_test` instead of the classification meta-test when
``learner=badger`` (its registry entry names the ``guessing`` metric, vsml/evaluation/metrics.py).  The
measurement is :func:`vsml.evaluation.evaluate.evaluate` with the :class:`GuessingGame` protocol: the
frozen learner plays held-out (test-split) Guessing-Game episodes, and we report the error curve over the inner steps (mean and 95% band over episodes), the last-step error,
the fraction of steps solved, and the §B analyses of the recorded expert states at a few inner steps
t* (Gaussian MI between experts, binding information), the graph diagnostics of the episodes'
topologies and, for the sinusoid variant, Δ_F(k) at every inner step.  Each meta-test appends one row
to ``<run>/badger_analysis.jsonl`` (the decimated training history of §A.5); the final one also
writes ``meta_test/results.json`` and PNGs.  :func:`plot_run` (``eval.py`` on a badger run) draws the
run's plots from those files plus ``metrics.jsonl``, with the Hurst and Lyapunov exponents of the
meta-training loss curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


__all__ = ["GuessingGame", "analyse_episodes", "badger_meta_test", "eval_run", "eval_tasks", "plot_run",
           "run_episodes"]


def eval_tasks(cfg: Any) -> list[str]:
    """The Guessing-Game specs among ``eval.tasks``; the training task itself (test split, held-out seeds)
    when there are none (e.g. ``--preset bptt --learner badger --task guessing`` keeps eval.tasks=digits)."""
    from tasks.guessing import is_guessing_spec
    specs = [s.strip() for s in cfg.eval.tasks.split(";") if s.strip() and is_guessing_spec(s.strip())]
    return specs or [cfg.task]


def run_episodes(learner: Any, theta: torch.Tensor, batch: Any, seed: int) -> Any:
    """Unroll the frozen learner on a GuessingFamily batch with recorded states (no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    dev = theta.device
    with torch.no_grad():
        return learner.unroll(theta.detach(), batch.x.to(dev), batch.y.to(dev), batch.num_classes,
                              generator=gen, record=True)


def analyse_episodes(out: Any, batch: Any, t_points: list[int] | None = None, pca: int = 2,
                     freqs: tuple[int, ...] | None = None, feedback_scale: float = 3.0) -> dict[str, Any]:
    """Error curve, solved fraction, MI / binding at inner steps t*, graph diagnostics, Δ_F(k).

    out: a :class:`vsml.learners.badger.BadgerOutput` with ``hidden`` [E, T, n, H]; the E episodes are the
    i.i.d. samples of the state estimators (§B "Which samples").  ``pca`` reduces each expert to p
    principal components before MI / binding (joint dim n·p must stay ≪ E).
    """
    from vsml.analysis import binding_information, frequency_errors, graph_summary, mi_summary
    err = out.error.detach().double().cpu().numpy()                             # [E, T]
    e, t_len = err.shape
    half = 1.96 * err.std(0, ddof=1) / math.sqrt(e) if e > 1 else np.zeros(t_len)
    res: dict[str, Any] = {
        "error_curve": err.mean(0).tolist(), "error_lo": (err.mean(0) - half).tolist(),
        "error_hi": (err.mean(0) + half).tolist(), "error_last": float(err[:, -1].mean()),
        "error_mean": float(err.mean()), "solved_frac": float(out.correct.float().mean()),
        "solved_last": float(out.correct[:, -1].float().mean()), "num_episodes": e, "length": t_len,
        # chance: the error of guessing 0 for every number, c·mean_d y_d², averaged over the episodes
        "chance": feedback_scale * _mean_square(batch),
    }
    if out.hidden is not None:
        h = out.hidden.detach().double().cpu().numpy()                          # [E, T, n, H]
        alive = out.state.alive.detach().cpu().numpy().astype(bool)             # [E, n]
        keep = alive.all(0)                                                     # experts present in every episode
        tp = t_points if t_points is not None else sorted({0, t_len // 4, t_len // 2, t_len - 1})
        mi, bind = {}, {}
        n_keep = int(keep.sum())
        if n_keep >= 2 and e > 4 * n_keep * pca:
            for t in tp:
                st = h[:, t][:, keep]                                           # [E, n_keep, H]
                mi[str(t)] = mi_summary(st, pca=pca)["mi_mean"]
                bind[str(t)] = binding_information(st, pca=pca)
        res["mi_by_t"], res["binding_by_t"] = mi, bind
    adj = out.state.adj.detach().cpu().numpy()                                  # [E, n, n]
    gs = [graph_summary(a) for a in adj[: min(64, e)]]
    res["graph"] = {k: float(np.mean([g[k] for g in gs])) for k in ("lambda2", "n_scc", "mean_in_degree",
                                                                     "weakly_connected")}
    if freqs:
        g = out.logits.detach().double().cpu().numpy()                         # [E, T, N]
        y = batch.x[:, 0].double().numpy()                                      # [E, N]
        fe = frequency_errors(np.transpose(g, (1, 0, 2)), np.broadcast_to(y, (t_len, *y.shape)), freqs)  # [T, K]
        res["freq_err"] = fe.tolist()
        res["freqs"] = list(freqs)
    return res


def _mean_square(batch: Any) -> float:
    """mean over episodes of mean_d y_d² over the episode's N_e active numbers."""
    y = batch.x[:, 0].double()                                                  # [E, N_max] (zero beyond N_e)
    n = (batch.y[:, 0] + 1).double()                                            # [E]
    return float((y ** 2).sum(1).div(n).mean())


@dataclass(frozen=True)
class GuessingGame:
    """The Guessing-Game meta-test for :func:`vsml.evaluation.evaluate.evaluate`: one test-split batch
    drawn with the evaluation seed itself, the frozen learner unrolled once with recorded states (its
    initial states from ``derive_seed(seed, "badger-eval-state")``), and :func:`analyse_episodes`
    (error curve, solved fraction, MI / binding, graph diagnostics, Δ_F(k) for sinusoids)."""

    def episodes(self, spec: str, num: int, length: int, seed: int, split: str, data_dir: str | None,
                 device: Any = None) -> tuple[Any, Any]:
        """The test batch, on the CPU (Micro-Badger runs there)."""
        from tasks.guessing import make_guessing_family
        fam = make_guessing_family(spec)
        return fam.sample(num, length, seed=seed, split=split), fam

    def measure(self, fl: Any, batch: Any, family: Any, seed: int) -> dict[str, Any]:
        from tasks.base import derive_seed
        from tasks.guessing import SinusoidFamily
        out = run_episodes(fl.learner, fl.theta, batch, derive_seed(seed, "badger-eval-state"))
        freqs = family.freqs if isinstance(family, SinusoidFamily) else None
        return analyse_episodes(out, batch, freqs=freqs, feedback_scale=fl.learner.cfg.feedback_scale)


def _guessing_test(learner: Any, theta: torch.Tensor, name: str, specs: list[str], episodes: int, length: int,
                   seed: int) -> dict[str, dict[str, Any]]:
    """{task: result} of one frozen learner through the one evaluation entry."""
    from vsml.evaluation.evaluate import FrozenLearner, evaluate
    res = evaluate([FrozenLearner(name, learner, theta)], specs, episodes, length, seed, protocol=GuessingGame())
    return {spec: per[name] for spec, per in res.items()}


def badger_meta_test(cfg: Any, learner: Any, theta: torch.Tensor, step: int, logger: Any, run_dir: Path,
                     final: bool = False) -> dict:
    """The Guessing-Game meta-test of a training run (vsml/evaluation/metrics.py, ``GuessingMetric``):
    {task: {learner name: result}}, logged, appended to badger_analysis.jsonl, plotted when ``final``."""
    results: dict[str, Any] = {}
    rows = []
    measured = _guessing_test(learner, theta, cfg.learner, eval_tasks(cfg), cfg.eval.episodes, cfg.eval.length,
                              cfg.eval.seed)
    for spec, res in measured.items():
        # the keys train() prints / summarises (online / final "accuracy" = fraction of solved steps)
        res.update(online_accuracy=res["solved_frac"], final_accuracy=res["solved_last"], loss=res["error_mean"],
                   final_loss=res["error_last"])
        results[spec] = {cfg.learner: res}
        metrics = {f"meta_test/{spec}/error_last": res["error_last"], f"meta_test/{spec}/error_mean": res["error_mean"],
                   f"meta_test/{spec}/solved_frac": res["solved_frac"], f"meta_test/{spec}/lambda2": res["graph"]["lambda2"]}
        for t, v in res.get("mi_by_t", {}).items():
            metrics[f"meta_test/{spec}/mi_t{t}"] = v
        for t, v in res.get("binding_by_t", {}).items():
            metrics[f"meta_test/{spec}/binding_t{t}"] = v
        logger.log(metrics, step)
        logger.log_curves(spec, {cfg.learner: {"mean": res["error_curve"], "lo": res["error_lo"],
                                               "hi": res["error_hi"]}}, step)
        rows.append({"step": int(step), "task": spec, **{k: v for k, v in res.items()}})
    run_dir = Path(run_dir)
    with open(run_dir / "badger_analysis.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    if final:
        out_dir = run_dir / "meta_test"
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "results.json", "w") as fh:
            json.dump({k: v for k, v in results.items()}, fh)
        paths = {"json": out_dir / "results.json"}
        for spec, per in results.items():
            p = plot_error_curve(spec, per[cfg.learner], out_dir / f"badger_{_safe(spec)}.png")
            paths[spec] = p
            logger.log_image(f"meta_test/{spec}/plot", p, step)
        results["_paths"] = {k: str(v) for k, v in paths.items()}
    return results


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_+" else "_" for ch in s)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_error_curve(task: str, res: dict, path: Path) -> Path:
    """Error e_t of the guess over the inner steps (mean and 95% band), chance level; Δ_F(k) if present."""
    plt = _plt()
    has_f = "freq_err" in res
    fig, axes = plt.subplots(1, 2 if has_f else 1, figsize=(10 if has_f else 5.5, 3.8), squeeze=False)
    ax = axes[0, 0]
    t = np.arange(1, len(res["error_curve"]) + 1)
    ax.plot(t, res["error_curve"], label=f"Micro-Badger (last step {res['error_last']:.3f})")
    ax.fill_between(t, res["error_lo"], res["error_hi"], alpha=0.25, linewidth=0)
    ax.axhline(res.get("chance", 1.0), color="gray", ls="--", lw=1, label="chance (guess 0)")
    ax.set_yscale("log")
    ax.set_xlabel("inner step t")
    ax.set_ylabel("feedback error c·MSE")
    ax.set_title(f"meta-test: {task}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_f:
        ax = axes[0, 1]
        fe = np.asarray(res["freq_err"])                                        # [T, K]
        for j, k in enumerate(res["freqs"]):
            ax.plot(t, fe[:, j], label=f"k={k}")
        ax.set_xlabel("inner step t")
        ax.set_ylabel("relative error Δ_F(k)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("frequency errors within the inner loop", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The run's Badger plots: meta-training loss (log) with its Hurst / Lyapunov exponents, MI and
    binding information over training (from the periodic meta-tests), and Δ_F(k) over training for
    sinusoid tasks.  Returns {"paths": {...}, "loss_dynamics": {...}} and writes ``run_summary.json``."""
    from vsml.analysis import loss_curve_hurst, loss_curve_lyapunov
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if "meta_train/loss" in r]
    paths: dict[str, str] = {}
    summary: dict[str, Any] = {}
    plt = _plt()
    if rows:
        steps = np.array([r["step"] for r in rows])
        loss = np.array([float(r["meta_train/loss"]) for r in rows])
        ok = np.isfinite(loss)
        steps, loss = steps[ok], loss[ok]
        if len(loss) >= 40:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                summary.update(loss_curve_hurst(loss))
                try:
                    summary["lyapunov_logloss"] = loss_curve_lyapunov(loss)
                except ValueError as exc:          # too short for the embedding
                    summary["lyapunov_logloss"] = f"n/a ({exc})"
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot(steps, loss, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("meta-training step")
        ax.set_ylabel("meta-loss (weighted c·MSE)")
        title = "meta-training"
        if "hurst_dlogloss" in summary:
            title += f"  H(loss)={summary['hurst_loss']:.2f}  H(Δlog loss)={summary['hurst_dlogloss']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / "badger_train_loss.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths["train_loss"] = str(p)
    ana = _read_jsonl(run_dir / "badger_analysis.jsonl")
    for task in sorted({r["task"] for r in ana}):
        rs = [r for r in ana if r["task"] == task]
        st = [r["step"] for r in rs]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(st, [r["error_last"] for r in rs], marker="o", ms=3, label="last inner step")
        axes[0].plot(st, [r["error_mean"] for r in rs], marker="o", ms=3, label="mean over inner steps")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("meta-test error")
        for key, ax, lab in (("mi_by_t", axes[1], "mean pairwise MI (nats)"),
                             ("binding_by_t", axes[2], "binding information (nats)")):
            ts = sorted({t for r in rs for t in r.get(key, {})}, key=int)
            for t in ts:
                ax.plot(st, [r.get(key, {}).get(t, np.nan) for r in rs], marker="o", ms=3,
                        label=f"inner step {int(t) + 1}")
            ax.set_ylabel(lab)
        for ax in axes:
            ax.set_xlabel("meta-training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{task}: held-out error and expert-state information over training", fontsize=9)
        fig.tight_layout()
        p = out_dir / f"badger_info_{_safe(task)}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths[f"info_{task}"] = str(p)
        if any("freq_err" in r for r in rs):
            fr = [r for r in rs if "freq_err" in r]
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            fe = np.array([np.asarray(r["freq_err"])[-1] for r in fr])          # [steps, K] at the last inner step
            for j, k in enumerate(fr[0]["freqs"]):
                ax.plot([r["step"] for r in fr], fe[:, j], marker="o", ms=3, label=f"k={k}")
            ax.set_yscale("log")
            ax.set_xlabel("meta-training step")
            ax.set_ylabel("Δ_F(k) at the last inner step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = out_dir / f"badger_freq_{_safe(task)}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths[f"freq_{task}"] = str(p)
    (out_dir / "run_summary.json").write_text(json.dumps({"loss_dynamics": summary, "paths": paths}, indent=2))
    return {"paths": paths, "loss_dynamics": summary}


def eval_run(checkpoint: str, learner: Any, theta: torch.Tensor, cfg_dict: dict, tasks: str | None,
             episodes: int | None, length: int | None, seed: int, out: str | None, plot: bool = True) -> int:
    """``eval.py --checkpoint RUN`` for a badger run: a fresh held-out meta-test (the run's eval tasks,
    episodes and inner-loop length unless given), its plots, and the run's training plots
    (:func:`plot_run`) when the checkpoint lies in a run directory.  Prints a table; returns 0."""
    from vsml.training.config import config_from_dict
    cfg = config_from_dict(cfg_dict)
    specs = [s.strip() for s in tasks.split(";") if s.strip()] if tasks else eval_tasks(cfg)
    episodes = episodes or cfg.eval.episodes
    length = length or cfg.eval.length
    p = Path(checkpoint)
    run_dir = p if p.is_dir() else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    out_dir = Path(out) if out else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{'task':<28} {'err t=1':>8} {'err last':>9} {'err mean':>9} {'solved':>7} {'chance':>7}"]
    results = _guessing_test(learner, theta, cfg.learner, specs, episodes, length, seed)
    for spec, res in results.items():
        lines.append(f"{spec:<28} {res['error_curve'][0]:>8.4f} {res['error_last']:>9.4f} {res['error_mean']:>9.4f} "
                     f"{res['solved_frac']:>7.3f} {res['chance']:>7.3f}")
        if plot:
            plot_error_curve(spec, res, out_dir / f"badger_{_safe(spec)}.png")
    (out_dir / "results.json").write_text(json.dumps(results))
    print("\n".join(lines))
    if plot and (run_dir / "metrics.jsonl").exists():
        info = plot_run(run_dir, out_dir)
        if info["loss_dynamics"]:
            print("meta-training loss dynamics: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info["loss_dynamics"].items()))
    print(f"\nresults and plots: {out_dir}")
    return 0
