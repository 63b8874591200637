"""The estimator registry: name -> builder ``(cfg, problem) -> MetaGradientEstimator``.

Built in: ``es``, ``bptt``, ``tbptt`` (vsml/estimators/core.py), ``pes``, ``tes`` (pes.py), ``bmg`` (bmg.py) and
``clone`` (cloning_deep.py: shallow or deep learning-algorithm cloning).  A new estimator registers
itself with ``@vsml.estimators.base.register("name")`` in its module and gets imported here; the
training loop never changes.
"""

from __future__ import annotations

from typing import Any

from vsml.estimators import bmg, cloning_deep, core, pes  # noqa: F401  (their @register builders)
from vsml.estimators.base import REGISTRY, MetaGradientEstimator, Problem

__all__ = ["build", "names"]


def names() -> list[str]:
    """The registered estimator names."""
    return sorted(REGISTRY)


def build(name: str, cfg: Any, problem: Problem) -> MetaGradientEstimator:
    """The estimator ``name`` for a run config (a TrainConfig) and its problem."""
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; registered: {', '.join(names())}")
    return REGISTRY[name](cfg, problem)
