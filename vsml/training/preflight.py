"""Checks run before a meta-training run creates its folder (and by ``eval.py`` before it starts).

Every ordinary mistake — an unknown task, a device this torch cannot use, wandb asked for but not
installed, an ``init_from`` θ of the wrong shape, an unknown baseline, an unwritable ``--out_dir``,
a missing dataset file, a torchrun launch of an estimator that declares it cannot run on that
many processes — is a :class:`~vsml.engine.config.ConfigError` (or ``DatasetError`` /
``CheckpointError``) with one line saying what is wrong and how to fix it, raised before anything
is written.  ``train.py`` / ``eval.py`` turn them into ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from vsml.engine.config import ConfigError


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """``torch.device(device)`` if this torch build and machine can use it, else a ConfigError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{flag} {str(device)!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ConfigError(f"{flag} {device}: this PyTorch build ({torch.__version__}) has no CUDA support; "
                              f"use {flag} cpu, or install a CUDA build of PyTorch")
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: no CUDA GPU is visible to PyTorch; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) are visible; "
                              f"use {flag} cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{flag} mps: the Apple-GPU backend is not available here; use {flag} cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"{flag} {device}: vsml runs on cpu or cuda; use {flag} cpu")
    return dev


def launched_world_size() -> int:
    """The number of processes of a torchrun launch (``RANK`` and ``WORLD_SIZE`` set), else 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def check_distributed(cfg, world: int | None = None) -> None:
    """Every phase that runs can run on ``world`` processes (default: the torchrun launch's), by what its
    estimator declares at registration (:class:`vsml.estimators.base.Capabilities`): not ``"refuse"``, and
    at least one part (ES pair, episode) per process."""
    world = launched_world_size() if world is None else world
    if world <= 1:
        return
    from vsml.estimators.base import capabilities
    from vsml.estimators.registry import names
    for phase in cfg.phases:
        if phase.steps <= 0 and phase.name != "meta":
            continue                                   # a skipped phase (e.g. clone.steps 0)
        if phase.estimator not in names():
            continue                                   # unknown names are the config's error
        cap = capabilities(phase.estimator)
        if cap.distributed == "refuse":
            raise ConfigError(f"estimator={phase.estimator} cannot run on {world} processes: {cap.why}")
        if cap.parts is not None:
            flag, n = cap.parts(cfg)
            if n < world:
                skip = "" if phase.name == "meta" else f" or skip the {phase.name} phase (--{phase.name}.steps 0)"
                raise ConfigError(f"{flag}={n} is smaller than the number of processes ({world}); every process "
                                  f"needs at least one of its parts: raise --{flag}{skip}")


def check_wandb(mode: str) -> None:
    """wandb must be importable when a run asks for it (unless ``WANDB_MODE=disabled`` switches it off)."""
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(f"--log.wandb {mode} needs the wandb package, which is not installed; install it "
                          "(pip install wandb) or pass --log.wandb disabled") from None


def check_task_spec(spec: str, flag: str, data_dir: str | None = None):
    """The task family of ``spec`` (a ConfigError naming ``flag`` for an unknown or malformed spec)."""
    from tasks import make_family
    try:
        return make_family(spec, data_dir=data_dir)
    except (KeyError, ValueError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ConfigError(f"{flag} {spec!r}: {msg} (see python -m tasks list)") from None


@dataclass
class Preflight:
    family: Any                       # the meta-training task family (datasets loaded)
    init_theta: torch.Tensor | None   # θ of cfg.init_from (shape checked), or None


def preflight(cfg, *, resume: str | None = None) -> Preflight:
    """Validate everything a run needs before its folder is created (see module docstring)."""
    from vsml.evaluation.evaluate import parse_task_list
    check_device(cfg.device)
    check_distributed(cfg)
    check_wandb(cfg.log.wandb)
    family = check_task_spec(cfg.task, "--task", cfg.data_dir)
    evals = [(s, check_task_spec(s, "--eval.tasks", cfg.data_dir)) for s in parse_task_list(cfg.eval.tasks)]
    if not evals:
        raise ConfigError(f"--eval.tasks {cfg.eval.tasks!r} names no task; give one, e.g. --eval.tasks digits")
    if cfg.eval.baselines:
        from vsml.learners import registry
        for b in [s.strip() for s in cfg.eval.baselines.split(",") if s.strip()]:
            try:
                registry.build(b)
            except (KeyError, ValueError) as exc:
                msg = exc.args[0] if exc.args else str(exc)
                raise ConfigError(f"--eval.baselines: {msg}") from None
    # load (or fail on) every dataset the run needs
    family.prepare(("train",))
    for _, fam in evals:
        fam.prepare(("train", "test"))
    init = None
    if cfg.init_from and resume is None:
        init = load_init_theta(cfg)
    if resume is None:
        from vsml.training.rundir import check_out_dir
        check_out_dir(cfg.out_dir)
    return Preflight(family=family, init_theta=init)


def load_init_theta(cfg) -> torch.Tensor:
    """θ of ``cfg.init_from`` (a θ file, run directory, checkpoint, ``pretrained:NAME`` or a hand-built
    ``analytic:NAME``, vsml/engine/analytic.py), shape-checked."""
    from pathlib import Path

    from vsml.learners.registry import build_learner
    from vsml.training.checkpoint import CheckpointError, load_checkpoint, load_theta
    src = cfg.init_from
    if src.startswith("analytic:"):
        if cfg.learner != "vsml":
            raise ConfigError(f"--init_from {src} builds a VSML θ; it needs --learner vsml (got {cfg.learner})")
        from vsml.engine.analytic import analytic_theta
        try:
            return analytic_theta(src, cfg.vsml)
        except ConfigError as exc:
            raise ConfigError(f"--init_from {exc}") from None
    if src.startswith("pretrained:"):
        from vsml.pretrained import path as pretrained_path
        try:
            p = pretrained_path(src.split(":", 1)[1])
        except KeyError as exc:
            raise CheckpointError(f"--init_from {src}: {exc.args[0]}") from None
    else:
        p = Path(src)
    if p.is_dir():
        p = p / "theta.safetensors"
    from vsml.training.averaging import checkpoint_theta     # θ̄ of a run that averages (--average_every)
    theta = load_theta(p)[0] if p.suffix == ".safetensors" else checkpoint_theta(load_checkpoint(p))
    want = tuple(build_learner(cfg).init_theta().shape)
    if cfg.learner == "vsml" and cfg.vsml.cell.bilinear and tuple(theta.shape) != want:
        from vsml.engine.params import extend_theta
        try:                                # a plain θ: the bilinear paths start at zero (the same learner)
            theta = extend_theta(theta, cfg.vsml.cell)
        except ValueError:
            pass                            # reported below
        else:
            print(f"[vsml] --init_from {src}: a plain-cell θ; the bilinear paths (w_xe, W_xphi, b_xphi) start at "
                  f"zero, i.e. the same learner", file=sys.stderr)
    if tuple(theta.shape) != want:
        raise CheckpointError(f"--init_from {src}: its θ has shape {list(theta.shape)} but this config "
                              f"({cfg.learner}) needs {list(want)}; pass a θ trained with the same learner "
                              "config (--learner, --vsml.*), or drop --init_from")
    return theta
