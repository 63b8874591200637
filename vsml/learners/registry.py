"""The one learner registry: name -> how to build the learner, and the meta-test metric it is judged by.

Every place that turns a name into a learner (the trainer, ``eval.py``, the studies, the baselines of
a meta-test) calls :func:`build`::

    build("vsml", run_cfg)              # from a run config (TrainConfig): its vsml section and backend
    build("adam")                       # a baseline with the reference defaults (vsml.md §3.6)
    build("sgd2", lr=0.5)               # ... with overrides
    build("vsml", micro_ticks=3)        # VSMLConfig fields (or cfg=VSMLConfig(...))

``metric`` names the meta-test a learner is judged by (vsml/evaluation/metrics.py): "classification"
(online accuracy curves) for the classifiers, "guessing" (Guessing-Game error) for Micro-Badger.  A
new learner registers here with :func:`register`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

__all__ = ["LearnerSpec", "build", "build_learner", "names", "register", "spec"]


@dataclass(frozen=True)
class LearnerSpec:
    """A registered learner.

    factory: ``factory(run, **kw)`` with ``run`` a TrainConfig (its learner section is used) or None
        (reference defaults), ``kw`` overrides.
    metric: the meta-test metric's name (vsml.evaluation.metrics).
    """

    name: str
    factory: Callable[..., Any]
    metric: str = "classification"


_REGISTRY: dict[str, LearnerSpec] = {}


def register(name: str, factory: Callable[..., Any], metric: str = "classification") -> None:
    """Register ``factory(run, **kw)`` under ``name``, meta-tested by the metric ``metric``."""
    if name in _REGISTRY:
        raise ValueError(f"learner {name!r} is already registered")
    _REGISTRY[name] = LearnerSpec(name, factory, metric)


def names() -> list[str]:
    """The registered learner names."""
    return sorted(_REGISTRY)


def spec(name: str) -> LearnerSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown learner {name!r}; valid names: {names()}") from None


def build(name: str, run: Any = None, **kw: Any) -> Any:
    """The learner ``name``: from a run config ``run`` (TrainConfig) or the reference defaults, ``kw`` on top."""
    return spec(name).factory(run, **kw)


def build_learner(cfg: Any) -> Any:
    """The learner a run config names (``cfg.learner``), built from its config sections."""
    return build(cfg.learner, cfg)


# --------------------------------------------------------------------------------------------
# the built-in learners


def _vsml(run: Any = None, cfg: Any = None, **kw: Any) -> Any:
    from vsml.engine.config import VSMLConfig
    from vsml.engine.network import VSMLNetwork
    if run is not None and cfg is None and not kw:
        return VSMLNetwork(run.vsml, backend=run.backend)
    if cfg is None:
        cfg = VSMLConfig(**kw)
    elif kw:
        raise ValueError(f"build('vsml'): pass either cfg=VSMLConfig(...) or VSMLConfig fields, "
                         f"not both (got extra {sorted(kw)})")
    elif isinstance(cfg, dict):
        cfg = VSMLConfig.from_dict(cfg)
    return VSMLNetwork(cfg)


def _badger(run: Any = None, **kw: Any) -> Any:
    from vsml.learners.badger import BadgerConfig, MicroBadger
    return MicroBadger(run.badger if run is not None and not kw else BadgerConfig(**kw))


def _metarnn(run: Any = None, **kw: Any) -> Any:
    from vsml.learners.baselines import MetaRNN
    return run.metarnn.build() if run is not None and not kw else MetaRNN(**kw)


def _hebbian(run: Any = None, **kw: Any) -> Any:
    from vsml.learners.baselines import HebbianLearner
    return HebbianLearner(**kw)


def _online(run: Any = None, **kw: Any) -> Any:
    from vsml.learners.baselines import OnlineSGD
    return OnlineSGD(**kw)


register("vsml", _vsml)
register("badger", _badger, metric="guessing")
register("metarnn", _metarnn)
register("hebbian", _hebbian)
# hand-designed online learners with the reference learning rates / widths (vsml.md §3.6)
register("sgd", partial(_online, hidden=None, lr=0.01, optimizer="sgd"))
register("adam", partial(_online, hidden=None, lr=1e-3, optimizer="adam"))
register("sgd2", partial(_online, hidden=160, lr=0.01, optimizer="sgd"))
register("adam2", partial(_online, hidden=160, lr=1e-3, optimizer="adam"))
