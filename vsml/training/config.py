"""The typed configuration of a meta-training run (``TrainConfig`` and its sections), one place for
validation, and the dict round trip used by ``config.json`` and every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vsml.engine.config import ConfigError, VSMLConfig
from vsml.estimators.bmg import BMGConfig
from vsml.estimators.bptt import BPTTConfig
from vsml.estimators.cloning import CloneConfig
from vsml.estimators.es import ESConfig
from vsml.estimators.pes import PESConfig
from vsml.learners.badger import BadgerConfig
from vsml.learners.baselines import MetaRNNConfig
from vsml.training.checkpoint import CheckpointError
from vsml.training.distributed import DistConfig


_MAX_LR = 3.4e37          # float32 max (3.4e38) x (1 - β1); see TrainConfig.__post_init__


@dataclass(frozen=True)
class EvalConfig:
    """Meta-test during training (held-out families, test split)."""

    tasks: str = "digits"             # task specs separated by ';'
    every: int = 100                  # meta-steps between meta-tests (0: only at the end)
    episodes: int = 16
    length: int = 500
    seed: int = 22
    baselines: str = ""               # e.g. "sgd,adam": also run these at the final meta-test

    def __post_init__(self):
        if self.every < 0 or self.episodes < 1 or self.length < 1:
            raise ConfigError(f"eval.every >= 0, eval.episodes >= 1, eval.length >= 1 required; got "
                              f"{self.every}, {self.episodes}, {self.length}")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10                   # meta-steps between log lines / metrics rows
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "vsml"
    progress: bool = True             # tqdm bar (off automatically when not a TTY)

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"log.every must be >= 1, got {self.every}")


@dataclass(frozen=True)
class Phase:
    """One stretch of meta-training: ``steps`` meta-steps of the registered estimator ``estimator``
    (vsml/estimators/registry.py) with its own Adam(W) at ``lr``; ``name`` keys the optimiser and
    the estimator state in checkpoints."""

    name: str
    estimator: str
    steps: int
    lr: float
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """One meta-training run.  ``lr`` defaults by estimator (ES 0.025, BPTT/BMG 1e-3) when None.

    ``steps`` counts the meta-training steps after the cloning phase: a run makes ``clone.steps``
    cloning steps, then ``steps`` ES/BPTT/... steps (``total_steps`` = both)."""

    name: str = "run"
    learner: Literal["vsml", "metarnn", "hebbian", "badger"] = "vsml"
    vsml: VSMLConfig = field(default_factory=VSMLConfig)
    badger: BadgerConfig = field(default_factory=BadgerConfig)   # Micro-Badger (vsml/learners/badger.py)
    metarnn: MetaRNNConfig = field(default_factory=MetaRNNConfig)   # learner=metarnn (vsml/learners/baselines.py)
    estimator: Literal["es", "bptt", "tbptt", "pes", "tes", "bmg", "clone"] = "es"   # tes: truncated ES; bmg: bootstrapped; tbptt: one BPTT window per step, state carried
    es: ESConfig = field(default_factory=ESConfig)
    pes: PESConfig = field(default_factory=lambda: PESConfig(particles=32, truncation=20, horizon=100))
    bptt: BPTTConfig = field(default_factory=BPTTConfig)
    bmg: BMGConfig = field(default_factory=BMGConfig)   # estimator=bmg (vsml/estimators/bmg.py)
    clone: CloneConfig = field(default_factory=CloneConfig)   # supervised warm start (steps 0: none)
    init_from: str | None = None      # start θ from a θ file / run directory (e.g. a shipped learner) or analytic:sgd / analytic:backprop (online SGD / backprop written into θ)
    lr: float | None = None
    weight_decay: float = 0.0
    task: str = "digits+proj"         # meta-training family spec (train split)
    episode_length: int = 100
    meta_batch: int = 16              # BPTT: episodes per meta-step (ES: es.pairs data episodes)
    steps: int = 200                  # meta-training steps AFTER the clone.steps cloning steps (the run makes clone.steps + steps steps in all)
    seed: int = 0
    device: str = "cpu"
    # no-grad unroll path of the VSML network (ES members, PES particles, meta-tests; kernels/backend.py):
    # auto = fused Triton kernel on CUDA, C++ kernel on CPU; torch = eager; compile; cpu; triton.
    # Gradients always take the autograd path.  Replaces the older ``compile`` flag (False -> torch,
    # True -> auto; still read from old config.json / checkpoints).
    backend: Literal["auto", "torch", "compile", "cpu", "triton"] = "auto"
    data_dir: str | None = None
    out_dir: str = "runs"
    ckpt_every: int = 50
    keep_checkpoints: bool = False    # also keep step_<n>.pt next to last.pt
    average_every: int = 0            # >0: the run's θ is the mean of θ at every K-th meta-step after cloning (vsml/training/averaging.py)
    max_nonfinite_steps: int = 5      # stop (exit 3) after this many consecutive steps with no finite member loss (0: never)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)   # torchrun settings (vsml/training/distributed.py)

    def __post_init__(self):
        if (self.clone.steps or self.estimator == "clone") and (self.learner != "vsml"):
            raise ConfigError("clone.steps > 0 needs learner=vsml, as does estimator=clone (cloning makes "
                              "sub-LSTMs imitate SGD weights)")
        from tasks.guessing import is_guessing_spec     # Guessing-Game learners <-> Guessing-Game tasks
        from vsml.learners.registry import names, spec
        plays_guessing = spec(self.learner).metric == "guessing"
        if plays_guessing and not is_guessing_spec(self.task):
            raise ConfigError(f"learner={self.learner} needs a Guessing-Game task (guessing[n=3], guessing[n=3-6], "
                              f"sinusoid[n=41,k=1-5]); got task={self.task!r}. Try --preset badger")
        if not plays_guessing and is_guessing_spec(self.task):
            players = [n for n in names() if spec(n).metric == "guessing"]
            raise ConfigError(f"task={self.task!r} is a Guessing-Game task: it needs --learner "
                              f"{' / '.join(players)} (the other learners are classifiers)")
        for name in ("episode_length", "meta_batch", "steps"):
            if getattr(self, name) < (0 if name == "steps" and self.clone.steps else 1):  # steps 0: cloning only
                raise ConfigError(f"{name} must be >= 1 (steps >= 0 with clone.steps > 0), got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.average_every < 0:
            raise ConfigError(f"average_every must be >= 0 (0: no averaging; K: the mean of θ every K meta-steps), "
                              f"got {self.average_every}")
        if self.estimator == "tbptt" and not 0 < self.bptt.truncation < self.episode_length:
            raise ConfigError(f"estimator=tbptt runs one bptt.truncation window of each episode per meta-step: it "
                              f"needs 0 < bptt.truncation < episode_length, got {self.bptt.truncation} and "
                              f"{self.episode_length} (use --estimator bptt for whole episodes)")
        if self.bptt.streams != 1 and (self.estimator != "tbptt" or self.meta_batch % self.bptt.streams):
            raise ConfigError(f"bptt.streams={self.bptt.streams} splits the meta-batch of --estimator tbptt into "
                              f"staggered streams: it needs --estimator tbptt and meta_batch divisible by it, got "
                              f"estimator={self.estimator}, meta_batch={self.meta_batch} (or set --bptt.streams 1)")
        if self.estimator == "bmg" and self.episode_length < self.bmg.episode_length:
            raise ConfigError(f"estimator=bmg needs episode_length >= bmg.k_steps + bmg.l_steps + bmg.probe = "
                              f"{self.bmg.episode_length}, got {self.episode_length}")
        for name, lr in (("lr", self.resolved_lr), ("clone.lr", self.clone.lr)):
            # Adam's first step is lr / (1 - β1) = 10·lr, computed in float32: larger overflows inside Adam
            if math.isfinite(lr) and lr > _MAX_LR:
                raise ConfigError(f"{name}={lr:g} is too large: Adam's first step (10 x {name}) overflows float32; "
                                  f"use {name} <= {_MAX_LR:.1e} (useful values are below 1; the ES default is 0.025)")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps must be >= 0 (0: never stop), got {self.max_nonfinite_steps}")
        if self.ckpt_every < 0:
            raise ConfigError(f"ckpt_every must be >= 0, got {self.ckpt_every}")
        if self.backend not in ("auto", "torch", "compile", "cpu", "triton"):
            raise ConfigError(f"backend must be one of auto, torch, compile, cpu, triton; got {self.backend!r}")

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return {"bptt": 1e-3, "tbptt": 1e-3, "bmg": 1e-3, "clone": self.clone.lr}.get(self.estimator, 0.025)

    @property
    def phases(self) -> tuple[Phase, ...]:
        """Cloning (``clone.steps``, Adam at ``clone.lr``), then ``steps`` steps of ``estimator``."""
        return (Phase("clone", "clone", self.clone.steps, self.clone.lr),
                Phase("meta", self.estimator, self.steps, self.resolved_lr, self.weight_decay))

    @property
    def total_steps(self) -> int:
        return self.clone.steps + self.steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resolved_lr"] = self.resolved_lr
        return d


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its ``to_dict`` (tolerates derived keys; rejects unknown ones)."""
    d = {k: v for k, v in d.items() if k != "resolved_lr"}
    if "compile" in d:              # configs written before the backend switch: compile=False -> torch, True -> auto
        compiled = d.pop("compile")
        d.setdefault("backend", "auto" if compiled else "torch")
    sub = {"vsml": VSMLConfig.from_dict, "es": lambda v: ESConfig(**v), "bptt": lambda v: BPTTConfig(**v),
           "clone": lambda v: CloneConfig(**v), "pes": lambda v: PESConfig(**v), "bmg": lambda v: BMGConfig(**v),
           "eval": lambda v: EvalConfig(**v), "log": lambda v: LogConfig(**v),
           "dist": lambda v: DistConfig(**v)}
    sub["badger"] = BadgerConfig.from_dict
    sub["metarnn"] = lambda v: MetaRNNConfig(**v)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"config has unknown keys {sorted(unknown)}; it was written by another vsml version")
    for k, fn in sub.items():
        if k in d and isinstance(d[k], dict):
            d[k] = fn(d[k])
    return TrainConfig(**d)
