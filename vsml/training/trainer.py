"""Meta-training loop: learner x task family x meta-gradient estimator, with logging, periodic
meta-tests, checkpoints, exact resume and signal handling.

The loop knows no estimator and no learner by name: the run is a sequence of phases
(``TrainConfig.phases``: cloning, then meta-training), each with an estimator from the registry
(vsml/estimators/registry.py) behind the one protocol ``step(θ, state, s) -> (ĝ, metrics, state)``
and its own Adam; the estimator states and optimisers are checkpointed per phase.  How θ is
meta-tested comes from the learner's registry entry (vsml/evaluation/metrics.py).

Every random draw of meta-step s (the data episodes, the ES noise, the initial inner states)
is derived from (seed, s), so a resumed run repeats exactly the numbers of an uninterrupted one
given θ, the Adam state and s from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from tasks.base import derive_seed  # one seed-derivation rule for data, noise and states
from vsml.training.averaging import ThetaAverage
from vsml.training.checkpoint import CheckpointError, atomic_write_text, save_checkpoint, save_theta
from vsml.learners.registry import build_learner
from vsml.training.config import TrainConfig, config_from_dict
from vsml.training.distributed import NullLogger, distribute_estimator, init_distributed
from vsml.training.rundir import (DISK_ERRNOS, RunDirError, create_run_dir, disk_error_message,
                                  lock_existing_run_dir, read_finished, truncate_metrics, write_finished)
from vsml.estimators.base import Problem
from vsml.estimators.registry import build as build_estimator
from vsml.evaluation.metrics import metric_for


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
    for key in ("learner", "vsml", "badger", "metarnn", "estimator", "clone", "pes", "average_every"):
        if getattr(saved, key) != getattr(cfg, key):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {key}={getattr(saved, key)!r} but the "
                f"requested config has {key}={getattr(cfg, key)!r}; resume without overriding {key}")


def _saved_estimator_states(ck: dict) -> dict[str, dict]:
    """{phase name: estimator state dict} of a checkpoint; a checkpoint written before the estimator
    protocol kept only the PES / truncated ES state, as ``extra["pes"]`` (the "meta" phase's)."""
    extra = ck.get("extra", {})
    if "estimator" in extra:
        return extra["estimator"]
    out = {"meta": extra["pes"]} if extra.get("pes") is not None else {}
    if extra.get("clone") is not None:     # long-horizon cloning's carried episodes (issue 15 branch, pre-protocol)
        out["clone"] = extra["clone"]
    return out


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




def _no_finite_member(m: dict, loss_metric: str) -> bool:
    """True when a meta-step had no usable (finite) population member: ES ``all_nonfinite``; BPTT/BMG
    ``nonfinite`` (one loss); any estimator whose loss (``m[loss_metric]``) or gradient was non-finite."""
    if m.get("skipped_nonfinite_grad"):
        return True
    bad = bool(m["all_nonfinite"]) if "all_nonfinite" in m else bool(m.get("nonfinite", 0))
    loss = m.get(loss_metric)
    return bad or (loss is not None and not math.isfinite(float(loss)))


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
    from vsml.estimators.core import make_optimizer
    # one Adam per phase (cloning, then meta-training), keyed by the phase's name in checkpoints
    opts = {p.name: make_optimizer(theta, p.lr, weight_decay=p.weight_decay) for p in cfg.phases}
    start = 0
    wandb_id = None
    if ck is not None:
        if tuple(ck["theta"].shape) != tuple(theta.shape):
            raise CheckpointError(f"checkpoint θ has shape {list(ck['theta'].shape)} but the config needs "
                                  f"{list(theta.shape)}")
        with torch.no_grad():
            theta.copy_(ck["theta"].to(device))
        if set(ck["optimizer"]) != set(opts):
            raise CheckpointError(f"{ck['path']}: optimizer state has keys {sorted(ck['optimizer'])}, expected "
                                  f"{sorted(opts)}; the checkpoint comes from another vsml version")
        for p in cfg.phases:
            opts[p.name].load_state_dict(ck["optimizer"][p.name])
            _apply_lr(opts[p.name], p.lr, p.weight_decay)    # a --lr given on resume applies (Adam's
                                                              # load_state_dict restores the saved one)
        torch.set_rng_state(ck["rng"]["torch"])
        start = int(ck["step"])
        wandb_id = ck.get("extra", {}).get("wandb_id")
        print(f"[vsml] resumed {rd} at step {start}", flush=True)
    logger = NullLogger() if not ctx.is_main else RunLogger(rd, cfg_dict, cfg.log.wandb, project=cfg.log.project, name=rd.name,
                       group=f"{cfg.learner}-{cfg.estimator}-{cfg.task}", resume_id=wandb_id)
    info["logger"] = logger
    # every phase's estimator behind one protocol (vsml/estimators/base.py), sharded under torchrun
    problem = Problem(learner, family, seed=cfg.seed, device=device)
    estimators = {p.name: distribute_estimator(build_estimator(p.estimator, cfg, problem), ctx)
                  for p in cfg.phases if p.steps}
    states = {name: est.init(theta.detach()) for name, est in estimators.items()}
    if ck is not None:
        for name, d in _saved_estimator_states(ck).items():
            if d and name in estimators:
                try:
                    states[name] = estimators[name].load_state_dict(theta.detach(), d)
                except ValueError as exc:
                    raise CheckpointError(f"{ck['path']}: {exc}") from None
    avg = ThetaAverage(cfg.average_every, after=cfg.clone.steps)   # the run's θ (θ̄ or the iterate)
    if ck is not None:
        avg.load_state_dict(ck.get("extra", {}).get("average"), device)
    phase_ends = list(itertools.accumulate(p.steps for p in cfg.phases))   # the step each phase ends at
    metric = metric_for(cfg.learner)          # how this learner is meta-tested (vsml/evaluation/metrics.py)

    div = {"streak": 0, "first": None}      # consecutive meta-steps with no finite member

    def checkpoint(step: int) -> None:
        if not ctx.is_main:
            return
        bad = _nonfinite_state(theta, *opts.values())
        if bad is not None or div["streak"]:
            why = bad or f"no population member had a finite loss in the last {div['streak']} step(s)"
            _say(f"[vsml] not writing a checkpoint at step {step}: {why}; the last good one"
                 + (f" (step {info['last_ckpt']})" if info["last_ckpt"] is not None else "") + " is kept")
            return
        extra = {"wandb_id": logger.wandb_id} if logger.wandb_id else {}
        extra["estimator"] = {name: est.state_dict(states[name]) for name, est in estimators.items()}
        if avg.every:
            extra["average"] = avg.state_dict()
        kw = dict(theta=theta, optimizer={name: o.state_dict() for name, o in opts.items()},
                  rng={"torch": torch.get_rng_state()}, step=step, config=cfg_dict, extra=extra)
        save_checkpoint(rd / "checkpoints" / "last.pt", **kw)
        if cfg.keep_checkpoints:
            save_checkpoint(rd / "checkpoints" / f"step_{step:06d}.pt", **kw)
        save_theta(rd / "theta.safetensors", avg.value(theta), cfg_dict, step,
                   {"average_of": avg.describe()} if avg.n else None)
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
                phase = next(p for p, end in zip(cfg.phases, phase_ends) if step < end)
                est, optim = estimators[phase.name], opts[phase.name]
                grad, m, states[phase.name] = est.step(theta.detach(), states[phase.name], step)
                if not torch.isfinite(grad).all():
                    m["skipped_nonfinite_grad"] = 1
                    grad = torch.zeros_like(grad)
                theta.grad = grad.to(theta.dtype)
                optim.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                avg.update(step, theta)
                ctx.after_step(step, theta, optim)    # cross-rank θ checksum every dist.checksum_every
                bar.update(1)
                no_finite = _no_finite_member(m, est.loss_metric)
                div["streak"] = div["streak"] + 1 if no_finite else 0
                div["first"] = (div["first"] or step) if no_finite else None
                nonfinite_total += int(m.get("nonfinite", int(no_finite)))
                if ctx.is_main and (step % cfg.log.every == 0 or step in phase_ends):
                    now = time.time()
                    row = {f"meta_train/{k}": v for k, v in m.items()}
                    row["meta_train/nonfinite_total"] = nonfinite_total
                    row["meta_train/theta_norm"] = theta.detach().double().norm().item()   # no float32 overflow
                    row["perf/sec_per_step"] = (now - t_last) / cfg.log.every
                    t_last = now
                    logger.log(row, step)
                    loss = m.get(est.loss_metric, float("nan"))
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bad = (f" nonfinite {int(m.get('nonfinite', int(no_finite)))} (total {nonfinite_total})"
                           if nonfinite_total else "")
                    _say(f"[vsml] step {step}/{total} {phase.name}_loss {loss:.4f}{bad} "
                         f"({row['perf/sec_per_step']:.2f} s/step) task={cfg.task}")
                _check_divergence(cfg, step, div, _nonfinite_state(theta, *opts.values()), info)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    checkpoint(step)
                if ctx.is_main and cfg.eval.every and step < total and (step % cfg.eval.every == 0 or step in phase_ends):
                    t_eval = time.time()
                    _say(f"[vsml] meta-test at step {step}: {cfg.eval.tasks} ({cfg.eval.episodes} episodes x "
                         f"{cfg.eval.length} steps) ...")
                    res = metric.meta_test(cfg, learner, avg.value(theta), step, logger, rd)
                    _say(f"[vsml] meta-test {metric.progress_line(res, cfg.learner)} ({time.time() - t_eval:.1f} s)")
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
    if avg.n:
        _say(f"[vsml] the run's θ (meta-test, theta.safetensors): {avg.describe()} (--average_every {avg.every})")
    res = metric.meta_test(cfg, learner, avg.value(theta), step, logger, rd, final=True, progress=_say)
    _say(f"[vsml] final meta-test done ({time.time() - t_eval:.1f} s)")
    logger.summary(metric.summary(res))
    logger.close()
    write_finished(rd, step)          # a later --resume of this run has nothing left to do
    curves = _write_curves(rd)
    print("\n[vsml] final meta-test (test split, θ frozen):")
    print(metric.report(res, cfg))
    print(f"\n[vsml] run directory: {rd}")
    for k, p in res.get("_paths", {}).items():
        print(f"[vsml]   {'results' if k == 'json' else 'plot ' + k}: {p}")
    if curves is not None:
        print(f"[vsml]   meta-training curves: {curves}")
    return rd
