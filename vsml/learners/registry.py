"""One place that turns a run config's ``learner`` name into a learner object."""

from __future__ import annotations

from typing import Any


def build_learner(cfg: Any):
    """The learner a run config names (``cfg.learner``), built from its config sections."""
    from vsml.learners.baselines import make_learner
    from vsml.engine.network import VSMLNetwork
    if cfg.learner == "vsml":
        return VSMLNetwork(cfg.vsml, backend=cfg.backend)
    if cfg.learner == "badger":
        from vsml.learners.badger import MicroBadger
        return MicroBadger(cfg.badger)
    if cfg.learner == "metarnn":
        return cfg.metarnn.build()
    return make_learner(cfg.learner)
