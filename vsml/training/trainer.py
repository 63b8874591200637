"""Meta-training loop: learner x task family x meta-gradient estimator, with logging, periodic
meta-tests, checkpoints, exact resume and signal handling.

Every random draw of meta-step s (the data episodes, the ES noise, the initial inner states)
is derived from (seed, s), so a resumed run repeats exactly the numbers of an uninterrupted one
given θ, the Adam state and s from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from tasks.base import derive_seed, sample_episodes  # one seed-derivation rule for data, noise and states
from vsml.training.checkpoint import CheckpointError, atomic_write_text, save_checkpoint, save_theta
from vsml.learners.registry import build_learner
from vsml.training.config import TrainConfig, config_from_dict
from vsml.training.distributed import NullLogger, distribute_estimator, init_distributed
from vsml.training.rundir import (DISK_ERRNOS, RunDirError, create_run_dir, disk_error_message,
                                  lock_existing_run_dir, read_finished, truncate_metrics, write_finished)


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
    res = evaluate(learners, tasks, cfg.eval.episodes, cfg.eval.length, cfg.eval.seed, cfg.data_dir,
                   progress=_say if final else None)
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


def _say(msg: str) -> None:
    """Print a log line without tangling a live tqdm bar (the bar is cleared and redrawn around it)."""
    from tqdm.auto import tqdm
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def _apply_lr(opt: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
        if weight_decay is not None and "weight_decay" in group:
            group["weight_decay"] = weight_decay


def _step_loss(m: dict) -> float | None:
    for k in ("loss_mean", "loss", "clone_loss"):
        if k in m:
            return float(m[k])
    return None


def _no_finite_member(m: dict) -> bool:
    """True when a meta-step had no usable (finite) population member: ES ``all_nonfinite``; BPTT/BMG
    ``nonfinite`` (one loss); any estimator whose loss or gradient was non-finite."""
    if m.get("skipped_nonfinite_grad"):
        return True
    bad = bool(m["all_nonfinite"]) if "all_nonfinite" in m else bool(m.get("nonfinite", 0))
    loss = _step_loss(m)
    return bad or (loss is not None and not math.isfinite(loss))


def _nonfinite_state(theta: torch.Tensor, *opts: torch.optim.Optimizer) -> str | None:
    """What part of the training state holds a NaN/inf (θ or an Adam moment), or None."""
    if not bool(torch.isfinite(theta.detach()).all()):
        return "θ"
    for o in opts:
        for st in o.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    return f"the Adam state ({k})"
    return None


def _check_divergence(cfg: TrainConfig, step: int, div: dict, bad_state: str | None, info: dict) -> None:
    """Stop the run (DivergenceError) on non-finite θ / optimiser state, or after
    ``cfg.max_nonfinite_steps`` consecutive steps with no finite member."""
    n = cfg.max_nonfinite_steps
    if bad_state is not None:
        what = f"{bad_state} became non-finite at step {step}"
    elif n and div["streak"] >= n:
        what = (f"no population member had a finite meta-loss for {div['streak']} consecutive steps "
                f"(steps {div['first']}-{step}; limit max_nonfinite_steps={n})")
    else:
        return
    rd, last = info["rd"], info["last_ckpt"]
    if step <= cfg.clone.steps:           # clone.* cannot change on resume: a new run
        keep = (f"the last good checkpoint (step {last}) is kept in {rd / 'checkpoints' / 'last.pt'}"
                if last is not None else "no checkpoint was written before it")
        keep += f"; start a new run with a smaller --clone.lr (now {cfg.clone.lr:g})"
    elif last is not None:
        keep = (f"the last good checkpoint (step {last}) is kept in {rd / 'checkpoints' / 'last.pt'}; resume from it "
                f"with a smaller learning rate: python train.py --resume {rd} --lr {cfg.resolved_lr / 10:g}")
    else:
        keep = f"no checkpoint was written before it; start again with a smaller --lr (now {cfg.resolved_lr:g})"
    raise DivergenceError(f"meta-training diverged: {what}; {keep}")


def _close_quietly(logger) -> None:
    with contextlib.suppress(Exception):    # e.g. a full disk while flushing; the error was already reported
        logger.close()


def _write_curves(rd: Path) -> Path | None:
    """The meta-training curve plot (meta-loss, meta-test accuracy over steps) in the run folder."""
    from vsml.evaluation.plotting import plot_training_curves
    try:
        return plot_training_curves(rd / "metrics.jsonl", rd / "training_curves.png")
    except Exception as exc:  # noqa: BLE001 - a plot must never turn a finished run into a failure
        _say(f"[vsml] could not draw the meta-training curves ({type(exc).__name__}: {exc})")
        return None


def _already_finished(cfg: TrainConfig, ck: dict, rd: Path, ctx) -> bool:
    """A resume of a run whose checkpoint is at (or past) the requested steps: say so and do nothing
    when its final meta-test was done (``finished.json``); else only the final meta-test runs."""
    step = int(ck["step"])
    if step < cfg.total_steps:
        return False
    done = read_finished(rd)
    if done is None or done < step:
        if ctx.is_main:
            print(f"[vsml] {rd} reached step {step} but its final meta-test did not finish; running it now",
                  flush=True)
        return False
    if ctx.is_main:
        print(f"[vsml] {rd} already finished at step {step} (results in {rd / 'meta_test'}); nothing to do. "
              f"To train further, ask for more steps, e.g. python train.py --resume {rd} --steps "
              f"{max(step - cfg.clone.steps, 0) + 100}", flush=True)
    return True


class DivergenceError(RuntimeError):
    """Meta-training stopped because θ, the optimiser state or every population member stopped being
    finite (``TrainConfig.max_nonfinite_steps``); the last good checkpoint is kept."""


def _remove_unused_run_dir(rd: Path) -> None:
    """Remove a run folder this process created if nothing but its lock / config / empty logs is in it."""
    import shutil
    try:
        for p in rd.iterdir():
            if p.name not in (".lock", "config.json", "metrics.jsonl", "curves") or \
                    (p.name == "metrics.jsonl" and p.stat().st_size) or (p.name == "curves" and any(p.iterdir())):
                return
        shutil.rmtree(rd)
    except OSError:
        pass


def _lock_run_dir(ctx, rd: Path):
    """Rank 0 locks ``rd`` (creating it); the outcome is shared so every rank fails together."""
    lock, err = None, None
    if ctx.is_main:
        try:
            lock = lock_existing_run_dir(rd)
        except RunDirError as exc:
            err = str(exc)
    err = ctx.broadcast_object(err)
    if err is not None:
        raise RunDirError(err)
    return lock


def train(cfg: TrainConfig, resume: str | None = None, run_dir: str | None = None) -> Path:
    """Meta-train; returns the run directory.  ``resume``: a run directory or checkpoint file.

    Ordinary mistakes raise ``ConfigError`` / ``CheckpointError`` / ``DatasetError`` before any folder
    exists (:func:`vsml.training.preflight.preflight`); the run directory is created exclusively and
    locked for the run's life (:mod:`vsml.training.rundir`); a full or read-only disk mid-run is a
    one-line ``RunDirError`` that keeps the last good checkpoint; divergence is a ``DivergenceError``."""
    info: dict = {"rd": None, "created": False, "started": False, "last_ckpt": None, "logger": None}
    with contextlib.ExitStack() as cleanup:
        try:
            return _train(cfg, resume, run_dir, cleanup, info)
        except BaseException as exc:
            if info["created"] and not info["started"]:
                cleanup.callback(_remove_unused_run_dir, info["rd"])   # runs before the lock is released
            if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS or info["rd"] is None:
                raise
            rd = info["rd"]
            if info.get("logger") is not None:
                _close_quietly(info["logger"])   # its unflushed line would fail again at exit
            kept = (f"the last good checkpoint (step {info['last_ckpt']}) is kept in {rd / 'checkpoints'}; free "
                    f"space and resume with: python train.py --resume {rd}") if info["last_ckpt"] is not None \
                else "no checkpoint was written yet"
            raise RunDirError(f"{disk_error_message(exc, 'to the run directory')}; {kept}") from None


def _train(cfg: TrainConfig, resume, run_dir, cleanup: contextlib.ExitStack, info: dict) -> Path:
    from vsml.training.loggers import RunLogger
    from vsml.training.preflight import preflight

    # every config / device / dataset / output check before anything is created
    pre = preflight(cfg, resume=resume)
    family = pre.family
    ctx = init_distributed(cfg)       # the torchrun process group, or a one-process context
    from kernels.backend import check_backend
    check_backend(cfg.backend, ctx.device, cfg.vsml, cfg.learner)   # a forced backend that cannot run: ConfigError
    ck = None
    if ctx.launched and resume is None and run_dir is None:
        run_dir, resume = ctx.resolve_run_dir(cfg.out_dir, cfg.name)   # out_dir/name; resume its last.pt
    if resume is not None:
        ck = ctx.load_checkpoint(resume)      # rank 0 reads, broadcasts
        saved = config_from_dict(ck["config"])
        _check_resume_compatible(saved, cfg, int(ck["step"]))
        rd = Path(resume) if Path(resume).is_dir() else Path(ck["path"]).parent.parent
        lock = _lock_run_dir(ctx, rd)         # a second process on this run directory stops here
    elif run_dir:
        rd = Path(run_dir)
        info["created"] = ctx.is_main and not rd.exists()
        lock = _lock_run_dir(ctx, rd)
    else:
        rd, lock = create_run_dir(cfg.out_dir, cfg.name)   # exclusive mkdir + lock (NAME-2, ... if taken)
        info["created"] = True
        if rd.name != cfg.name:
            print(f"[vsml] {Path(cfg.out_dir) / cfg.name} holds an earlier run; writing to {rd}", flush=True)
    if lock is not None:
        cleanup.callback(lock.release)
    info["rd"] = rd
    if ck is not None:
        info["last_ckpt"] = int(ck["step"])
        if _already_finished(cfg, ck, rd, ctx):
            return rd
    device = ctx.device                   # cfg.device, or cuda:LOCAL_RANK under torchrun
    cfg_dict = cfg.to_dict()
    if ctx.is_main:                       # only rank 0 writes (config, metrics, checkpoints, meta-tests)
        atomic_write_text(rd / "config.json", json.dumps(cfg_dict, indent=2))
        if ck is not None:
            dropped = truncate_metrics(rd, int(ck["step"]))   # steps after the checkpoint run again
            if dropped:
                print(f"[vsml] metrics.jsonl: dropped {dropped} row(s) logged after step {ck['step']} "
                      "(they are recomputed now)", flush=True)

    learner = build_learner(cfg)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "theta-init"))
    theta = torch.nn.Parameter(learner.init_theta(gen).to(device))
    if ctx.is_main and hasattr(learner, "no_grad_backend"):
        print(f"[vsml] no-grad unrolls: backend {cfg.backend} -> {learner.no_grad_backend(theta.detach())} "
              f"on {device}", flush=True)
    if pre.init_theta is not None and ck is None:
        with torch.no_grad():
            theta.copy_(pre.init_theta.to(device))
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
        _apply_lr(opt, cfg.resolved_lr, cfg.weight_decay)    # a --lr given on resume applies (Adam's
        _apply_lr(opt_clone, cfg.clone.lr)                    # load_state_dict restores the saved one)
        torch.set_rng_state(ck["rng"]["torch"])
        start = int(ck["step"])
        wandb_id = ck.get("extra", {}).get("wandb_id")
        print(f"[vsml] resumed {rd} at step {start}", flush=True)
    logger = NullLogger() if not ctx.is_main else RunLogger(rd, cfg_dict, cfg.log.wandb, project=cfg.log.project, name=rd.name,
                       group=f"{cfg.learner}-{cfg.estimator}-{cfg.task}", resume_id=wandb_id)
    info["logger"] = logger
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

    div = {"streak": 0, "first": None}      # consecutive meta-steps with no finite member

    def checkpoint(step: int) -> None:
        if not ctx.is_main:
            return
        bad = _nonfinite_state(theta, opt, opt_clone)
        if bad is not None or div["streak"]:
            why = bad or f"no population member had a finite loss in the last {div['streak']} step(s)"
            _say(f"[vsml] not writing a checkpoint at step {step}: {why}; the last good one"
                 + (f" (step {info['last_ckpt']})" if info["last_ckpt"] is not None else "") + " is kept")
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
        info["last_ckpt"] = step

    from tqdm.auto import tqdm
    total = cfg.total_steps
    bar = tqdm(total=total, initial=start, disable=(not cfg.log.progress or not ctx.is_main) or None, dynamic_ncols=True,
               desc=rd.name, file=sys.stderr)
    step = start
    t_last, nonfinite_total = time.time(), 0
    interrupted = failure = None
    info["started"] = True
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
                no_finite = _no_finite_member(m)
                div["streak"] = div["streak"] + 1 if no_finite else 0
                div["first"] = (div["first"] or step) if no_finite else None
                nonfinite_total += int(m.get("nonfinite", int(no_finite)))
                if ctx.is_main and (step % cfg.log.every == 0 or step == total or step == cfg.clone.steps):
                    now = time.time()
                    row = {f"meta_train/{k}": v for k, v in m.items()}
                    row["meta_train/nonfinite_total"] = nonfinite_total
                    row["meta_train/theta_norm"] = theta.detach().double().norm().item()   # no float32 overflow
                    row["perf/sec_per_step"] = (now - t_last) / cfg.log.every
                    t_last = now
                    logger.log(row, step)
                    loss = m.get("loss_mean", m.get("loss", m.get("clone_loss", float("nan"))))
                    bar.set_postfix(loss=f"{loss:.4f}")
                    what = "clone_loss" if cloning else "meta_loss"
                    bad = (f" nonfinite {int(m.get('nonfinite', int(no_finite)))} (total {nonfinite_total})"
                           if nonfinite_total else "")
                    _say(f"[vsml] step {step}/{total} {what} {loss:.4f}{bad} "
                         f"({row['perf/sec_per_step']:.2f} s/step) task={batch.name if batch else cfg.task}")
                _check_divergence(cfg, step, div, _nonfinite_state(theta, opt, opt_clone), info)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    checkpoint(step)
                if ctx.is_main and cfg.eval.every and step < total and (step % cfg.eval.every == 0 or step == cfg.clone.steps):
                    t_eval = time.time()
                    _say(f"[vsml] meta-test at step {step}: {cfg.eval.tasks} ({cfg.eval.episodes} episodes x "
                         f"{cfg.eval.length} steps) ...")
                    res = run_meta_test(cfg, learner, theta, step, logger, rd)
                    if cfg.learner == "badger":    # a regression game: report the guess error, not "accuracy"
                        line = ", ".join(f"{t}: error mean {per[cfg.learner]['error_mean']:.3f} / last "
                                         f"{per[cfg.learner]['error_last']:.3f}" for t, per in res.items())
                    else:
                        line = ", ".join(f"{t}: online acc {per[cfg.learner]['online_accuracy']:.3f}"
                                         for t, per in res.items())
                    _say(f"[vsml] meta-test {line} ({time.time() - t_eval:.1f} s)")
                if ctx.any(stop.signal is not None):     # all ranks stop after the same step
                    interrupted = stop.signal or signal.SIGTERM
                    break
    except KeyboardInterrupt:
        interrupted = signal.SIGINT
    except BaseException as exc:
        failure = exc
        raise
    finally:
        bar.close()
        if not isinstance(failure, (OSError, DivergenceError)):   # no second error on top of a full disk
            checkpoint(step)        # never lose a run's results, whatever happened (unless non-finite)
        if isinstance(failure, DivergenceError) and ctx.is_main:
            _close_quietly(logger)
            _write_curves(rd)
    ctx.close()
    if interrupted is not None:
        logger.close()
        if ctx.is_main:
            _write_curves(rd)
        if ctx.is_main:
            print(f"[vsml] interrupted at step {step}; checkpoint written to {rd / 'checkpoints' / 'last.pt'}. "
                  f"Resume with: python train.py --resume {rd}"
                  + (" (under torchrun: rerun the same torchrun command)" if ctx.launched else ""), flush=True)
        raise SystemExit(128 + int(interrupted))
    if not ctx.is_main:
        return rd                   # rank 0 alone runs the final meta-test
    t_eval = time.time()
    _say(f"[vsml] final meta-test: {cfg.eval.tasks} ({cfg.eval.episodes} episodes x {cfg.eval.length} steps"
         + (f", with {cfg.eval.baselines}" if cfg.eval.baselines else "") + ") ...")
    res = run_meta_test(cfg, learner, theta, step, logger, rd, final=True)
    _say(f"[vsml] final meta-test done ({time.time() - t_eval:.1f} s)")
    summary = {f"final/{t}/{n}/online_acc": r["online_accuracy"] for t, per in res.items() if t != "_paths"
               for n, r in per.items()}
    logger.summary(summary)
    logger.close()
    write_finished(rd, step)          # a later --resume of this run has nothing left to do
    curves = _write_curves(rd)
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
    if curves is not None:
        print(f"[vsml]   meta-training curves: {curves}")
    return rd
