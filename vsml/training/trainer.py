"""Meta-training loop: learner x task family x meta-gradient estimator, with logging, periodic
meta-tests, checkpoints, exact resume and signal handling.

Every random draw of meta-step s (the data episodes, the ES noise, the initial inner states)
is derived from (seed, s), so a resumed run repeats exactly the numbers of an uninterrupted one
given θ, the Adam state and s from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch

from tasks.base import derive_seed, sample_episodes  # one seed-derivation rule for data, noise and states
from vsml.training.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint, save_theta
from vsml.learners.registry import build_learner
from vsml.training.config import TrainConfig, config_from_dict
from vsml.training.distributed import NullLogger, distribute_estimator, init_distributed


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop writes a checkpoint and exits cleanly at the next step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:   # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:          # second signal: give up immediately
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[vsml] received signal {signum}; finishing this meta-step and writing a checkpoint "
              "(send again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _new_run_dir(out_dir: str, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... so an earlier run is never overwritten."""
    base = Path(out_dir) / name
    cand, i = base, 1
    while cand.exists() and any(cand.iterdir()):
        i += 1
        cand = Path(f"{base}-{i}")
    cand.mkdir(parents=True, exist_ok=True)
    return cand


def _check_resume_compatible(saved: TrainConfig, cfg: TrainConfig, step: int | None = None) -> None:
    """Refuse a resume whose config would change what the checkpoint's θ / optimiser state mean.

    One exception: ``clone.steps`` may change while the run has not left its cloning phase
    (checkpoint step <= both the saved and the new ``clone.steps``), so a cloning run can be
    extended (``--resume RUN --clone.steps 2000``); the ES/BPTT steps then start later."""
    if step is not None and saved.clone != cfg.clone and \
            dataclasses.replace(saved.clone, steps=cfg.clone.steps) == cfg.clone:
        if step > min(saved.clone.steps, cfg.clone.steps):
            raise CheckpointError(
                f"cannot resume with clone.steps={cfg.clone.steps}: the checkpoint is at step {step}, past its "
                f"cloning phase (clone.steps={saved.clone.steps}); clone.steps can only grow, or shrink to "
                f">= {step}, while the run is still cloning")
        saved = dataclasses.replace(saved, clone=cfg.clone)
    for key in ("learner", "vsml", "badger", "metarnn", "estimator", "clone", "pes"):
        if getattr(saved, key) != getattr(cfg, key):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {key}={getattr(saved, key)!r} but the "
                f"requested config has {key}={getattr(cfg, key)!r}; resume without overriding {key}")


def _estimator(cfg: TrainConfig, learner):
    from vsml.estimators.core import BPTTEstimator, ESEstimator
    if cfg.estimator in ("pes", "tes"):
        from vsml.estimators.pes import PES, TruncatedES
        pcfg = dataclasses.replace(cfg.pes, seed=derive_seed(cfg.seed, "pes-noise", cfg.pes.seed))
        return PES(pcfg) if cfg.estimator == "pes" else TruncatedES(pcfg)
    if cfg.estimator == "bmg":
        from vsml.estimators.bmg import BMGEstimator
        return BMGEstimator(learner, cfg.bmg, seed=cfg.seed)
    if cfg.estimator == "es":
        return ESEstimator(learner, dataclasses.replace(cfg.es, seed=derive_seed(cfg.seed, "es-noise", cfg.es.seed)))
    return BPTTEstimator(learner, cfg.bptt, seed=cfg.seed)


def run_meta_test(cfg: TrainConfig, learner, theta: torch.Tensor, step: int, logger, run_dir: Path,
                  final: bool = False) -> dict:
    if cfg.learner == "badger":       # Guessing-Game meta-test + state analyses (vsml/evaluation/badger_eval.py)
        from vsml.evaluation.badger_eval import badger_meta_test
        return badger_meta_test(cfg, learner, theta, step, logger, run_dir, final)
    from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list, write_results
    learners = [FrozenLearner(cfg.learner, learner, theta.detach())]
    if final and cfg.eval.baselines:
        from vsml.learners.baselines import make_learner
        for b in [s.strip() for s in cfg.eval.baselines.split(",") if s.strip()]:
            bl = make_learner(b)
            learners.append(FrozenLearner(b, bl, bl.init_theta().to(theta.device)))
    tasks = parse_task_list(cfg.eval.tasks)
    res = evaluate(learners, tasks, cfg.eval.episodes, cfg.eval.length, cfg.eval.seed, cfg.data_dir)
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
        paths = write_results(res, run_dir / "meta_test")
        for task, p in paths.items():
            if task != "json":
                logger.log_image(f"meta_test/{task}/plot", p, step)
        res["_paths"] = {k: str(v) for k, v in paths.items()}
    return res


def _pes_state_dict(st) -> dict:
    """PESState -> plain dict of tensors / ints (loads with weights_only=True)."""
    from vsml.learners.base import tree_flatten
    leaves = [] if st.inner is None else tree_flatten(st.inner)[0]
    return {"t": int(st.t), "episode": int(st.episode), "accum": st.accum.detach().cpu(),
            "has_inner": st.inner is not None, "inner_leaves": [t.detach().cpu() for t in leaves]}


def _restore_pes_state(estimator, system, fresh, d: dict):
    """Inverse of ``_pes_state_dict``: the inner state's structure comes from a fresh draw of the
    same episode, its tensors from the checkpoint."""
    from vsml.learners.base import tree_flatten
    from vsml.estimators.pes import PESState
    inner = None
    if d["has_inner"]:
        template = estimator._fresh(system, d["episode"])
        leaves, rebuild = tree_flatten(template)
        if len(leaves) != len(d["inner_leaves"]):
            raise CheckpointError("the checkpoint's PES inner state does not fit this learner/task; "
                                  "resume with the config it was written with")
        inner = rebuild([t.to(leaf.device) for t, leaf in zip(d["inner_leaves"], leaves)])
    return PESState(inner=inner, accum=d["accum"].to(fresh.accum.device), t=d["t"], episode=d["episode"])


def _load_init_theta(path: str) -> torch.Tensor:
    from vsml.training.checkpoint import load_theta
    p = Path(path)
    if p.is_dir():
        p = p / "theta.safetensors"
    if p.suffix == ".safetensors":
        return load_theta(p)[0]
    return load_checkpoint(p)["theta"]


def train(cfg: TrainConfig, resume: str | None = None, run_dir: str | None = None) -> Path:
    """Meta-train; returns the run directory.  ``resume``: a run directory or checkpoint file."""
    from vsml.training.loggers import RunLogger

    from tasks import make_family
    from vsml.evaluation.evaluate import parse_task_list
    ctx = init_distributed(cfg)       # the torchrun process group, or a one-process context
    from kernels.backend import check_backend
    check_backend(cfg.backend, ctx.device, cfg.vsml, cfg.learner)   # a forced backend that cannot run: ConfigError
    # load (or fail on) every dataset the run needs before creating the run directory
    family = make_family(cfg.task, data_dir=cfg.data_dir)
    family.prepare(("train",))
    for spec in parse_task_list(cfg.eval.tasks):
        make_family(spec, data_dir=cfg.data_dir).prepare(("train", "test"))
    ck = None
    if ctx.launched and resume is None and run_dir is None:
        run_dir, resume = ctx.resolve_run_dir(cfg.out_dir, cfg.name)   # out_dir/name; resume its last.pt
    if resume is not None:
        ck = ctx.load_checkpoint(resume)      # rank 0 reads, broadcasts
        saved = config_from_dict(ck["config"])
        _check_resume_compatible(saved, cfg, int(ck["step"]))
        rd = Path(resume) if Path(resume).is_dir() else Path(ck["path"]).parent.parent
    else:
        rd = Path(run_dir) if run_dir else _new_run_dir(cfg.out_dir, cfg.name)
        rd.mkdir(parents=True, exist_ok=True)
    device = ctx.device                   # cfg.device, or cuda:LOCAL_RANK under torchrun
    cfg_dict = cfg.to_dict()
    if ctx.is_main:                       # only rank 0 writes (config, metrics, checkpoints, meta-tests)
        atomic_write_text(rd / "config.json", json.dumps(cfg_dict, indent=2))

    learner = build_learner(cfg)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "theta-init"))
    theta = torch.nn.Parameter(learner.init_theta(gen).to(device))
    if ctx.is_main and hasattr(learner, "no_grad_backend"):
        print(f"[vsml] no-grad unrolls: backend {cfg.backend} -> {learner.no_grad_backend(theta.detach())} "
              f"on {device}", flush=True)
    if cfg.init_from and ck is None:
        init = _load_init_theta(cfg.init_from)
        if tuple(init.shape) != tuple(theta.shape):
            raise CheckpointError(f"init_from={cfg.init_from}: θ has shape {list(init.shape)} but this config "
                                  f"needs {list(theta.shape)}")
        with torch.no_grad():
            theta.copy_(init.to(device))
    from vsml.estimators.core import make_optimizer  # BPTT clipping happens inside bptt_gradient
    opt = make_optimizer(theta, cfg.resolved_lr, weight_decay=cfg.weight_decay)
    opt_clone = make_optimizer(theta, cfg.clone.lr)
    start = 0
    wandb_id = None
    if ck is not None:
        if tuple(ck["theta"].shape) != tuple(theta.shape):
            raise CheckpointError(f"checkpoint θ has shape {list(ck['theta'].shape)} but the config needs "
                                  f"{list(theta.shape)}")
        with torch.no_grad():
            theta.copy_(ck["theta"].to(device))
        if set(ck["optimizer"]) != {"meta", "clone"}:
            raise CheckpointError(f"{ck['path']}: optimizer state has keys {sorted(ck['optimizer'])}, expected "
                                  "['clone', 'meta']; the checkpoint comes from another vsml version")
        opt.load_state_dict(ck["optimizer"]["meta"])
        opt_clone.load_state_dict(ck["optimizer"]["clone"])
        torch.set_rng_state(ck["rng"]["torch"])
        start = int(ck["step"])
        wandb_id = ck.get("extra", {}).get("wandb_id")
        print(f"[vsml] resumed {rd} at step {start}", flush=True)
    logger = NullLogger() if not ctx.is_main else RunLogger(rd, cfg_dict, cfg.log.wandb, project=cfg.log.project, name=rd.name,
                       group=f"{cfg.learner}-{cfg.estimator}-{cfg.task}", resume_id=wandb_id)
    estimator = distribute_estimator(_estimator(cfg, learner), ctx, cfg.dist)   # sharded under torchrun
    n_data = cfg.es.pairs if cfg.estimator == "es" else cfg.meta_batch
    es_shards = ctx.distributed and cfg.estimator == "es" and torch.device(device).type != "cpu"
    truncated = cfg.estimator in ("pes", "tes")
    system = pes_state = None
    if truncated:
        # persistent inner states across meta-steps: episodes of pes.horizon examples, advanced by
        # pes.truncation examples per meta-step (the data of each episode is drawn from its seed)
        from vsml.estimators.pes import LearnerSystem

        def sample(num, length, seed):
            b = family.sample(num, length, seed=seed, split="train", device=device)
            return b.x.to(device), b.y.to(device), b.num_classes

        system = LearnerSystem(learner, sample, horizon=cfg.pes.horizon, device=device)
        pes_state = estimator.init(theta.detach())
        if ck is not None and ck.get("extra", {}).get("pes") is not None:
            pes_state = _restore_pes_state(estimator, system, pes_state, ck["extra"]["pes"])
    cloner = None
    if cfg.clone.steps:
        from vsml.estimators.cloning_deep import make_clone_estimator   # shallow (cloning.py) or deep (cloning_deep.py)
        cloner = distribute_estimator(make_clone_estimator(learner, cfg.clone, seed=cfg.seed), ctx, cfg.dist)

    def checkpoint(step: int) -> None:
        if not ctx.is_main:
            return
        extra = {"wandb_id": logger.wandb_id} if logger.wandb_id else {}
        if pes_state is not None:
            extra["pes"] = _pes_state_dict(pes_state)
        kw = dict(theta=theta, optimizer={"meta": opt.state_dict(), "clone": opt_clone.state_dict()}, rng={"torch": torch.get_rng_state()}, step=step,
                  config=cfg_dict, extra=extra)
        save_checkpoint(rd / "checkpoints" / "last.pt", **kw)
        if cfg.keep_checkpoints:
            save_checkpoint(rd / "checkpoints" / f"step_{step:06d}.pt", **kw)
        save_theta(rd / "theta.safetensors", theta, cfg_dict, step)

    from tqdm.auto import tqdm
    total = cfg.total_steps
    bar = tqdm(total=total, initial=start, disable=(not cfg.log.progress or not ctx.is_main) or None, dynamic_ncols=True,
               desc=rd.name, file=sys.stderr)
    step = start
    t_last, nonfinite_total = time.time(), 0
    interrupted = None
    try:
        with _StopFlag() as stop:
            while step < total:
                cloning = step < cfg.clone.steps
                seed_s = derive_seed(cfg.seed, "meta-train-data", step)
                if cloning:
                    batch = family.sample(cfg.clone.episodes, cfg.clone.length, seed=seed_s, split="train",
                                          device=device)
                    est, optim = cloner, opt_clone
                elif truncated:
                    batch, optim = None, opt
                else:
                    # GPU ES under torchrun: each rank builds only its own pairs' episodes (per-episode
                    # streams, vsml/training/distributed.py); the CPU keeps the global draw, sliced per rank
                    shard = ctx.shard(n_data) if es_shards else None
                    batch = sample_episodes(family, n_data, cfg.episode_length, seed_s, "train", device=device,
                                            episodes=shard)
                    est, optim = estimator, opt
                if batch is None:
                    grad, m, pes_state = estimator.step(theta.detach(), pes_state, system, step)
                else:
                    x, y = batch.x.to(device), batch.y.to(device)
                    grad, m = est.estimate(theta.detach(), x, y, batch.num_classes, step)
                if not torch.isfinite(grad).all():
                    m["skipped_nonfinite_grad"] = 1
                    grad = torch.zeros_like(grad)
                theta.grad = grad.to(theta.dtype)
                optim.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                ctx.after_step(step, theta, optim)    # cross-rank θ checksum every dist.checksum_every
                bar.update(1)
                nonfinite_total += int(m.get("nonfinite", 0))
                if ctx.is_main and (step % cfg.log.every == 0 or step == total or step == cfg.clone.steps):
                    now = time.time()
                    row = {f"meta_train/{k}": v for k, v in m.items()}
                    row["meta_train/nonfinite_total"] = nonfinite_total
                    row["meta_train/theta_norm"] = theta.detach().norm().item()
                    row["perf/sec_per_step"] = (now - t_last) / cfg.log.every
                    t_last = now
                    logger.log(row, step)
                    loss = m.get("loss_mean", m.get("loss", m.get("clone_loss", float("nan"))))
                    bar.set_postfix(loss=f"{loss:.4f}")
                    what = "clone_loss" if cloning else "meta_loss"
                    print(f"[vsml] step {step}/{total} {what} {loss:.4f} "
                          f"({row['perf/sec_per_step']:.2f} s/step) task={batch.name if batch else cfg.task}",
                          flush=True)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    checkpoint(step)
                if ctx.is_main and cfg.eval.every and step < total and (step % cfg.eval.every == 0 or step == cfg.clone.steps):
                    res = run_meta_test(cfg, learner, theta, step, logger, rd)
                    if cfg.learner == "badger":    # a regression game: report the guess error, not "accuracy"
                        line = ", ".join(f"{t}: error mean {per[cfg.learner]['error_mean']:.3f} / last "
                                         f"{per[cfg.learner]['error_last']:.3f}" for t, per in res.items())
                    else:
                        line = ", ".join(f"{t}: online acc {per[cfg.learner]['online_accuracy']:.3f}"
                                         for t, per in res.items())
                    print("[vsml] meta-test " + line, flush=True)
                if ctx.any(stop.signal is not None):     # all ranks stop after the same step
                    interrupted = stop.signal or signal.SIGTERM
                    break
    except KeyboardInterrupt:
        interrupted = signal.SIGINT
    finally:
        bar.close()
        checkpoint(step)            # never lose a run's results, whatever happened
    ctx.close()
    if interrupted is not None:
        logger.close()
        if ctx.is_main:
            print(f"[vsml] interrupted at step {step}; checkpoint written to {rd / 'checkpoints' / 'last.pt'}. "
                  f"Resume with: python train.py --resume {rd}"
                  + (" (under torchrun: rerun the same torchrun command)" if ctx.launched else ""), flush=True)
        raise SystemExit(128 + int(interrupted))
    if not ctx.is_main:
        return rd                   # rank 0 alone runs the final meta-test
    res = run_meta_test(cfg, learner, theta, step, logger, rd, final=True)
    summary = {f"final/{t}/{n}/online_acc": r["online_accuracy"] for t, per in res.items() if t != "_paths"
               for n, r in per.items()}
    logger.summary(summary)
    logger.close()
    from vsml.evaluation.evaluate import summary_table
    print("\n[vsml] final meta-test (test split, θ frozen):")
    if cfg.learner == "badger":       # regression game: guess errors (chance = 1), not accuracies
        print(f"{'task':<24}{'error mean':>12}{'error last':>12}{'solved frac':>13}  episodes x T")
        for t, per in res.items():
            if t != "_paths":
                r = per[cfg.learner]
                print(f"{t:<24}{r['error_mean']:>12.4f}{r['error_last']:>12.4f}{r['solved_frac']:>13.4f}  "
                      f"{cfg.eval.episodes} x {cfg.eval.length}")
        print(f"(error: the scaled MSE feedback, chance 1; solved frac: steps with error < "
              f"{cfg.badger.solved_threshold})")
    else:
        print(summary_table({t: v for t, v in res.items() if t != "_paths"}))
    print(f"\n[vsml] run directory: {rd}")
    for k, p in res.get("_paths", {}).items():
        print(f"[vsml]   {'results' if k == 'json' else 'plot ' + k}: {p}")
    return rd
