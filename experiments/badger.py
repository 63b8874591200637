"""Micro-Badger experiments for issue #7 (badger-bmg-es.md §A, §B): plateaus and symmetry breakers,
mutual information and binding information of the expert states over training and within the inner
loop, the frequency principle, and topology (Laplacian λ₂) versus convergence speed.

    python experiments/badger.py plateau    --steps 2000 --seeds 0,1,2 --wandb offline
    python experiments/badger.py topology   --steps 2000 --seeds 0,1 --wandb offline
    python experiments/badger.py fprinciple --steps 1500 --seeds 0 --wandb offline
    python experiments/badger.py plots      # docs/badger_*.png from the saved JSON

Every run is a ``TrainConfig`` (:func:`run_config`: a :class:`vsml.learners.badger.MicroBadger`, full BPTT +
Adam, as ``train.py --preset badger``) meta-trained by ``vsml.training.trainer.train()``, resumed segment by
segment so that θ after every ``--eval_every`` steps gets a held-out meta-test (test split, fixed seed) with
the §B analyses (``vsml.evaluation.badger_eval.analyse_episodes``): the trainer writes
``<out>/<experiment>/<run>/metrics.jsonl`` (every step's meta-loss; wandb offline with ``--wandb offline``),
the analyses go to ``<run>/analyses.jsonl``.  (Before issue 16 the experiment had its own BPTT loop, whose
initial inner states came from another seed rule, so recorded numbers are not bit-reproducible.)  The per-experiment results go
to ``<out>/<experiment>.json``.  Run single-threaded (``OMP_NUM_THREADS=1``); each run takes a few minutes
on one CPU core.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from tyro.conf import Positional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks import make_family  # noqa: E402
from tasks.base import derive_seed  # noqa: E402
from tasks.guessing import SinusoidFamily  # noqa: E402
from vsml.analysis import binding_information, graph_summary, loss_curve_hurst, loss_curve_lyapunov  # noqa: E402
from vsml.learners.badger import BadgerConfig, MicroBadger  # noqa: E402
from vsml.evaluation.badger_eval import analyse_episodes, run_episodes  # noqa: E402
from vsml.estimators.bptt import BPTTConfig  # noqa: E402
from vsml.evaluation.plotting import read_metrics  # noqa: E402
from vsml.training.checkpoint import load_theta  # noqa: E402
from vsml.training.config import EvalConfig, LogConfig, TrainConfig  # noqa: E402
from vsml.training.trainer import train  # noqa: E402

# ------------------------------------------------------------------------------------------------ runs


def smooth(x: np.ndarray, w: int) -> np.ndarray:
    """Trailing moving average (the first w−1 points average what exists)."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=float), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - w)
    return (c[idx] - c[lo]) / (idx - lo)


def escape_step(loss: np.ndarray, threshold: float, window: int = 25) -> int | None:
    """First meta-step at which the smoothed meta-loss is below ``threshold`` (None: never)."""
    s = smooth(loss, window)
    hit = np.flatnonzero(s < threshold)
    return int(hit[0]) + 1 if len(hit) else None


def segment_ends(steps: int, eval_every: int, extra: tuple[int, ...] = ()) -> list[int]:
    """The meta-steps after which the experiment meta-tests θ: every ``eval_every`` steps, the ``extra``
    steps (inner-loop analyses) and the last step; training runs in segments between them."""
    ends = {s for s in range(eval_every, steps + 1, eval_every)} if eval_every > 0 else set()
    return sorted((ends | {s for s in extra if 0 < s <= steps}) | {steps})


def run_config(name: str, cfg: BadgerConfig, task: str, steps: int, seed: int, out: Path, lr: float = 1e-2,
               batch: int = 64, length: int = 20, wandb: str = "disabled") -> TrainConfig:
    """The TrainConfig of one experiment run: Micro-Badger, full BPTT (grad-norm clip 1) + Adam at ``lr``,
    ``batch`` episodes of ``length`` inner steps per meta-step; the trainer's own meta-tests are kept minimal
    (the experiment runs its analyses on θ after each segment)."""
    return TrainConfig(name=name, learner="badger", task=task, estimator="bptt", badger=cfg,
                       bptt=BPTTConfig(truncation=0, clip_grad_norm=1.0), lr=lr, meta_batch=batch,
                       episode_length=length, steps=steps, seed=seed, backend="torch", ckpt_every=0,
                       out_dir=str(out), eval=EvalConfig(tasks=task, every=0, episodes=2, length=length),
                       log=LogConfig(every=1, wandb=wandb, project="vsml-badger", progress=False))


def train_run(name: str, cfg: BadgerConfig, task: str, steps: int, seed: int, out: Path, lr: float = 1e-2,
              batch: int = 64, length: int = 20, eval_every: int = 50, eval_episodes: int = 512,
              wandb: str = "disabled", inner_info_at: tuple[int, ...] = ()) -> dict[str, Any]:
    """Meta-train one learner with ``vsml.training.trainer.train()`` (resumed segment by segment, so that θ
    after every ``eval_every`` steps is meta-tested with the §B analyses); returns its loss curve, held-out
    meta-test rows and summary numbers.  The analyses' rows also go to ``<run>/analyses.jsonl``."""
    run_dir = out / name
    if run_dir.exists():                               # a rerun of the same name starts over
        shutil.rmtree(run_dir)
    learner = MicroBadger(cfg)
    fam = make_family(task)
    freqs = fam.freqs if isinstance(fam, SinusoidFamily) else None
    test = fam.sample(eval_episodes, length, seed=22, split="test")
    inner_steps = set(inner_info_at) | {steps}

    def meta_test(step: int, theta: torch.Tensor) -> dict:
        o = run_episodes(learner, theta, test, derive_seed(22, "badger-eval-state"))
        res = analyse_episodes(o, test, freqs=freqs, feedback_scale=cfg.feedback_scale)
        if step in inner_steps or step == 0:
            # binding information at every inner step (the inner-loop trajectory, §A.5)
            h = o.hidden.double().numpy()                                       # [E, T, n, H]
            res["binding_inner"] = [binding_information(h[:, t], pca=2) for t in range(h.shape[1])]
        row = {"step": step, **{k: v for k, v in res.items() if k not in ("error_lo", "error_hi")}}
        with open(run_dir / "analyses.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row

    tcfg = run_config(name, cfg, task, steps, seed, out, lr, batch, length, wandb)
    theta0 = learner.init_theta(torch.Generator().manual_seed(derive_seed(seed, "theta-init")))   # the trainer's θ0
    run_dir.mkdir(parents=True)
    evals = [meta_test(0, theta0)]
    t0 = time.time()
    for i, end in enumerate(segment_ends(steps, eval_every, tuple(inner_steps))):
        seg = dataclasses.replace(tcfg, steps=end)
        if i == 0:
            train(seg, run_dir=str(run_dir))
        else:
            train(seg, resume=str(run_dir))
        evals.append(meta_test(end, load_theta(run_dir / "theta.safetensors")[0]))
    wall = time.time() - t0
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "meta_train/loss" in r]
    losses = [r["meta_train/loss"] for r in rows]
    grad_norms = [r.get("meta_train/grad_norm", float("nan")) for r in rows]
    loss = np.asarray(losses)
    res = {"name": name, "config": dataclasses.asdict(cfg), "task": task, "seed": seed, "steps": steps, "lr": lr,
           "loss": losses, "grad_norm": grad_norms, "evals": evals, "wall_s": wall,
           "final_error_last": evals[-1]["error_last"], "final_error_mean": evals[-1]["error_mean"]}
    try:
        res["loss_dynamics"] = {**loss_curve_hurst(loss), "lyapunov_logloss": loss_curve_lyapunov(loss)}
    except ValueError as exc:
        res["loss_dynamics"] = {"error": str(exc)}
    print(f"[badger-exp] {name}: final held-out error last {res['final_error_last']:.4f} mean "
          f"{res['final_error_mean']:.4f}  ({wall:.0f} s)", flush=True)
    return res


def _save(out: Path, exp: str, results: list[dict]) -> Path:
    """Merge this invocation's runs into <out>/<exp>.json (a run of the same name is replaced), so that
    seeds / variants can be added by later invocations."""
    p = out / f"{exp}.json"
    old = json.loads(p.read_text()) if p.exists() else []
    names = {r["name"] for r in results}
    p.write_text(json.dumps([r for r in old if r["name"] not in names] + results))
    return p


# ------------------------------------------------------------------------------------------------ experiments

#: plateau / symmetry-breaker study: designated readout (expert d writes number d), so identical experts
#: can only guess one value for every number; the breakers are the knob (§A.3)
BASE = dict(n_experts=6, hidden=16, msg=8, readout="designated", topology="complete", aggregation="mean",
            meta_loss="mean")
PLATEAU_VARIANTS: dict[str, dict] = {
    "symmetric": {},
    "noise0.5": {"init_noise": 0.5},
    "ids": {"id_dim": 4},
    "noise0.5_exp": {"init_noise": 0.5, "update": "exp"},        # the anchored update (a, b) = (0.5, 0.7)
    "topology_sum": {"topology": "kout", "k": 2, "aggregation": "sum"},
}


def exp_plateau(args) -> list[dict]:
    out = Path(args.out) / "plateau"
    results = []
    for variant, kw in PLATEAU_VARIANTS.items():
        if args.variants and variant not in args.variants.split(","):
            continue
        for seed in args.seeds:
            cfg = BadgerConfig(**{**BASE, **kw})
            r = train_run(f"{variant}-s{seed}", cfg, args.task, args.steps, seed, out, lr=args.lr,
                          eval_every=args.eval_every, wandb=args.wandb, inner_info_at=(50,))
            r["variant"] = variant
            results.append(r)
            _save(Path(args.out), "plateau", results)
    return results


#: topology study: the same game with per-expert initial-state noise (0.5) as the symmetry breaker, and
#: graphs of increasing algebraic connectivity λ₂ (6 experts: empty 0, ring-1 1, ring-2 4, complete 6)
TOPOLOGIES: dict[str, dict] = {
    "empty": {"topology": "er", "p": 0.0},
    "ring1": {"topology": "ring", "k": 1},
    "kout2": {"topology": "kout", "k": 2},
    "ring2": {"topology": "ring", "k": 2},
    "complete": {"topology": "complete"},
}


def exp_topology(args) -> list[dict]:
    out = Path(args.out) / "topology"
    results = []
    for topo, kw in TOPOLOGIES.items():
        if args.variants and topo not in args.variants.split(","):
            continue
        for seed in args.seeds:
            cfg = BadgerConfig(**{**BASE, "init_noise": 0.5, **kw})
            lrn = MicroBadger(cfg)
            adj = lrn.init_state(256, 3, 3, torch.Generator().manual_seed(seed)).adj.numpy()
            gs = [graph_summary(a) for a in adj[:64]]
            r = train_run(f"{topo}-s{seed}", cfg, args.task, args.steps, seed, out, lr=args.lr,
                          eval_every=args.eval_every, wandb=args.wandb)
            r["topology"] = topo
            r["graph"] = {k: float(np.mean([g[k] for g in gs])) for k in ("lambda2", "lambda_max", "n_scc")}
            results.append(r)
            _save(Path(args.out), "topology", results)
    return results


def exp_fprinciple(args) -> list[dict]:
    out = Path(args.out) / "fprinciple"
    cfg = BadgerConfig(n_experts=10, hidden=32, msg=8, id_dim=4, readout="pooled", max_outputs=41, topology="kout",
                       k=3, meta_loss="mean")
    results = []
    for seed in args.seeds:
        r = train_run(f"sinusoid-s{seed}", cfg, args.fp_task, args.steps, seed, out, lr=args.lr,
                      length=args.fp_length, eval_every=args.eval_every, wandb=args.wandb)
        results.append(r)
        _save(Path(args.out), "fprinciple", results)
    return results


# ------------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_all(args) -> None:
    plt = _plt()
    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    p = out / "plateau.json"
    if p.exists():
        res = json.loads(p.read_text())
        variants = list(dict.fromkeys(r["variant"] for r in res))
        colors = {v: f"C{i}" for i, v in enumerate(variants)}
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        table = {}
        for r in res:
            v = r["variant"]
            loss = np.asarray(r["loss"])
            axes[0].plot(np.arange(1, len(loss) + 1), smooth(loss, 25), color=colors[v], lw=1,
                         label=v if r["seed"] == res[0]["seed"] or v not in table else None)
            st = [e["step"] for e in r["evals"]]
            axes[1].plot(st, [e["mi_by_t"].get(str(len(e["error_curve"]) - 1), np.nan) for e in r["evals"]],
                         color=colors[v], lw=1, marker=".", ms=3)
            axes[2].plot(st, [e["binding_by_t"].get(str(len(e["error_curve"]) - 1), np.nan) for e in r["evals"]],
                         color=colors[v], lw=1, marker=".", ms=3)
            esc = escape_step(loss, args.threshold)
            table.setdefault(v, []).append({"seed": r["seed"], "leave_chance_step": escape_step(loss, args.threshold_chance),
                                            "escape_step": esc, "min_smoothed_loss": float(smooth(loss, 25).min()),
                                            "final_error_mean": r["final_error_mean"],
                                            "final_error_last": r["final_error_last"]})
        axes[0].set_yscale("log")
        axes[0].axhline(args.threshold, color="gray", ls=":", lw=1)
        axes[0].set_ylabel("meta-loss (smoothed over 25 steps)")
        axes[0].set_title("meta-loss = mean c·MSE over the inner steps; chance 1", fontsize=9)
        axes[1].set_ylabel("mean pairwise MI (nats)")
        axes[1].set_title("Gaussian MI between experts, held-out, t* = last step", fontsize=9)
        axes[2].set_ylabel("binding information (nats)")
        axes[2].set_title("binding information, held-out, t* = last step", fontsize=9)
        for ax in axes:
            ax.set_xlabel("meta-training step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Guessing Game ({res[0]['task']}, 6 experts, designated readout): plateaus and symmetry breakers",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(docs / "badger_plateaus.png", dpi=90)
        plt.close(fig)
        summary["plateau"] = table
        # MI / binding around the escape of each breaking run
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        labelled = set()
        for r in res:
            esc = escape_step(np.asarray(r["loss"]), args.threshold)
            if esc is None:
                continue
            st = np.array([e["step"] for e in r["evals"]]) - esc
            t_last = str(len(r["evals"][0]["error_curve"]) - 1)
            lab = None if r["variant"] in labelled else r["variant"]
            labelled.add(r["variant"])
            axes[0].plot(st, [e["mi_by_t"].get(t_last, np.nan) for e in r["evals"]], color=colors[r["variant"]],
                         lw=1, marker=".", ms=3, label=lab)
            axes[1].plot(st, [e["error_mean"] for e in r["evals"]], color=colors[r["variant"]], lw=1, marker=".", ms=3)
        axes[0].set_ylabel("mean pairwise MI (nats), t* = last")
        axes[1].set_ylabel("held-out error (mean over inner steps)")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        for ax in axes:
            ax.axvline(0, color="gray", ls=":")
            ax.set_xlabel("meta-steps relative to the plateau escape")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(docs / "badger_mi_escape.png", dpi=90)
        plt.close(fig)
        # binding within the inner loop: before training vs trained (one breaking run per variant)
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for r in res:
            if r["seed"] != res[0]["seed"]:
                continue
            first = next(e for e in r["evals"] if "binding_inner" in e)
            last = [e for e in r["evals"] if "binding_inner" in e][-1]
            t = np.arange(1, len(last["binding_inner"]) + 1)
            ax.plot(t, first["binding_inner"], color=colors[r["variant"]], ls=":", lw=1)
            ax.plot(t, last["binding_inner"], color=colors[r["variant"]], lw=1.5, label=r["variant"])
        ax.set_xlabel("inner step t")
        ax.set_ylabel("binding information (nats)")
        ax.set_title("within the inner loop: untrained (dotted) vs trained (solid)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "badger_binding_inner.png", dpi=90)
        plt.close(fig)
    p = out / "topology.json"
    if p.exists():
        res = json.loads(p.read_text())
        rows = []
        for r in res:
            loss = np.asarray(r["loss"])
            rows.append({"topology": r["topology"], "seed": r["seed"], "lambda2": r["graph"]["lambda2"],
                         "leave_chance_step": escape_step(loss, args.threshold_chance),
                         "escape_step": escape_step(loss, args.threshold),
                         "min_smoothed_loss": float(smooth(loss, 25).min()),
                         "auc_loss": float(np.mean(loss)), "final_error_mean": r["final_error_mean"]})
        summary["topology"] = rows
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        topos = list(dict.fromkeys(r["topology"] for r in res))
        for i, tp in enumerate(topos):
            rr = [r for r in rows if r["topology"] == tp]
            axes[0].scatter([r["lambda2"] for r in rr], [r["auc_loss"] for r in rr], color=f"C{i}", label=tp)
            for r in res:
                if r["topology"] == tp and r["seed"] == res[0]["seed"]:
                    axes[1].plot(smooth(np.asarray(r["loss"]), 25), color=f"C{i}", lw=1, label=tp)
        axes[0].set_xlabel("algebraic connectivity λ₂ (symmetrised Laplacian)")
        axes[0].set_ylabel("mean meta-loss over training (lower = faster)")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("meta-training step")
        axes[1].set_ylabel("meta-loss, smoothed 25")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "badger_topology.png", dpi=90)
        plt.close(fig)
    p = out / "fprinciple.json"
    if p.exists():
        res = json.loads(p.read_text())
        r = res[0]
        ev = [e for e in r["evals"] if "freq_err" in e]
        freqs = ev[0]["freqs"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        st = [e["step"] for e in ev]
        fe_last = np.array([np.asarray(e["freq_err"])[-1] for e in ev])            # [evals, K]
        for j, k in enumerate(freqs):
            axes[0].plot(st, fe_last[:, j], label=f"k={k}")
        axes[0].set_xlabel("meta-training step")
        axes[0].set_ylabel("Δ_F(k) at the last inner step")
        fin = np.asarray(ev[-1]["freq_err"])                                      # [T, K]
        for j, k in enumerate(freqs):
            axes[1].plot(np.arange(1, fin.shape[0] + 1), fin[:, j], label=f"k={k}")
        axes[1].set_xlabel("inner step t (trained learner)")
        axes[1].set_ylabel("Δ_F(k)")
        axes[2].plot(smooth(np.asarray(r["loss"]), 25))
        axes[2].set_yscale("log")
        axes[2].set_xlabel("meta-training step")
        axes[2].set_ylabel("meta-loss, smoothed 25")
        for ax in axes[:2]:
            ax.legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(f"frequency principle: {r['task']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(docs / "badger_fprinciple.png", dpi=90)
        plt.close(fig)
        summary["fprinciple"] = {"steps": st, "freqs": freqs, "freq_err_last_inner": fe_last.tolist(),
                                 "freq_err_inner_final": fin.tolist(), "final_error_mean": r["final_error_mean"]}
    for name in ("plateau", "topology", "fprinciple"):
        p = out / f"{name}.json"
        if p.exists():
            summary.setdefault("loss_dynamics", {})[name] = {r["name"]: r.get("loss_dynamics")
                                                            for r in json.loads(p.read_text())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_dynamics"}, indent=1, default=str))


@dataclass(frozen=True)
class BadgerStudyArgs:
    experiment: Annotated[Literal["plateau", "topology", "fprinciple", "plots"], Positional]
    steps: int = 2000
    seeds: tuple[int, ...] = (0, 1, 2)   # comma-separated
    variants: str = ""                   # comma-separated subset of the experiment's variants
    task: str = "guessing[n=2]"
    fp_task: str = "sinusoid[n=41,k=1-5]"
    fp_length: int = 20
    lr: float = 3e-3
    eval_every: int = 50
    # escape from the symmetric plateau: first step with smoothed meta-loss below this (N=2: chance 1; identical
    # experts can at best guess the mean of the two numbers, mean meta-loss >= (1 + 19 * 0.5) / 20 = 0.525)
    threshold: float = 0.45
    threshold_chance: float = 0.8        # escape from the chance plateau: first step with smoothed meta-loss below this
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    out: str = "/tmp/badger/exp"
    docs: str = str(ROOT / "docs")


def main(argv: list[str] | None = None) -> int:
    from vsml.training.cli import parse
    args = parse(BadgerStudyArgs, argv, prog="experiments/badger.py", description=__doc__)
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"plateau": exp_plateau, "topology": exp_topology, "fprinciple": exp_fprinciple, "plots": plot_all}[
        args.experiment](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
