"""Typed configuration of the VSML engine.

Every field mirrors a key of the reference code (``configs/default.yaml`` of
louiskirsch/vsml-neurips2021); the conventions are listed in
``shared/reference/vsml.md`` ("Conventions this project follows").  Configs are
frozen dataclasses: validate once in ``__post_init__``, then pass around freely.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SubLSTMConfig:
    """The sub-LSTM shared by every weight of the host network (vsml.md §1.2).

    Attributes:
        hidden: N, size of h and of c (reference 16).
        msg: M, size of the forward and of the backward message (reference 8).
        layer_norm: LayerNorm over the M message dims of both readouts (eps ``ln_eps``).
        init_rand_proportion: fraction of the cell dims drawn at random per episode (§1.6).
        ln_eps: LayerNorm epsilon.
    """

    hidden: int = 16
    msg: int = 8
    layer_norm: bool = False
    init_rand_proportion: float = 0.5
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.hidden >= 1, f"SubLSTMConfig.hidden must be >= 1, got {self.hidden}")
        _check(self.msg >= 2, f"SubLSTMConfig.msg must be >= 2 (element 0 carries the input/error, "
               f"element 1 the logit/label), got {self.msg}")
        _check(0.0 <= self.init_rand_proportion <= 1.0,
               f"SubLSTMConfig.init_rand_proportion must lie in [0, 1], got {self.init_rand_proportion}")
        _check(self.ln_eps > 0, f"SubLSTMConfig.ln_eps must be > 0, got {self.ln_eps}")

    @property
    def gates(self) -> int:
        """4N: pre-activations i, g, f, o."""
        return 4 * self.hidden

    @property
    def num_rand(self) -> int:
        """Cell dims drawn at random per episode: int(N * init_rand_proportion) (§1.6)."""
        return int(self.hidden * self.init_rand_proportion)


@dataclass(frozen=True)
class VSMLConfig:
    """A VSML network: a stack of dense VSML layers, each a grid of sub-LSTMs.

    The host network maps D inputs through ``hidden_sizes`` to the number of classes;
    D and the class count are *not* part of the config: one θ runs any input size and
    any class count (vsml.md §1.8).

    Attributes:
        cell: the sub-LSTM.
        hidden_sizes: widths of the hidden dense layers; ``()`` is the reference default
            (one layer D -> classes); ``(32,)`` is the ``deep`` config (D -> 32 -> classes).
        micro_ticks: micro-steps per layer update, incoming messages frozen (§1.3).
        backward_pass: two sweeps per example instead of the forward-only schedule (§1.5).
        feed_label: put the label in element 1 of the error message (λ = 1) (§1.4).
        layerwise: one θ per layer instead of one θ shared by every layer (§1.1).
        tanh_bound: logits are ``tanh_bound * tanh(m / tanh_bound)``.
        input_idx: forward-message element carrying the input pixel (reference 0).
        output_idx: forward-message element read out as the logit (reference 1).
        error_idx: backward-message element carrying the error (reference 0).
        label_idx: backward-message element carrying the label when ``feed_label`` (reference 1).
    """

    cell: SubLSTMConfig = field(default_factory=SubLSTMConfig)
    hidden_sizes: tuple[int, ...] = ()
    micro_ticks: int = 2
    backward_pass: bool = False
    feed_label: bool = False
    layerwise: bool = False
    tanh_bound: float = 100.0
    input_idx: int = 0
    output_idx: int = 1
    error_idx: int = 0
    label_idx: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.cell, dict):  # built from JSON
            object.__setattr__(self, "cell", SubLSTMConfig(**self.cell))
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        _check(all(h >= 1 for h in self.hidden_sizes),
               f"VSMLConfig.hidden_sizes must be positive, got {self.hidden_sizes}")
        _check(self.micro_ticks >= 1, f"VSMLConfig.micro_ticks must be >= 1, got {self.micro_ticks}")
        _check(self.tanh_bound > 0, f"VSMLConfig.tanh_bound must be > 0, got {self.tanh_bound}")
        m = self.cell.msg
        for name in ("input_idx", "output_idx", "error_idx", "label_idx"):
            v = getattr(self, name)
            _check(0 <= v < m, f"VSMLConfig.{name}={v} must index a message element in [0, {m})")
        _check(self.error_idx != self.label_idx,
               "VSMLConfig.error_idx and label_idx must differ (both live in the backward message)")

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes) + 1

    @property
    def num_theta_sets(self) -> int:
        """L: how many θ sets there are (K when layerwise, else 1)."""
        return self.num_layers if self.layerwise else 1

    def layer_dims(self, in_dim: int, num_classes: int) -> list[tuple[int, int]]:
        """[(A_k, B_k)] for every layer k, with B_k = A_{k+1}."""
        sizes = [in_dim, *self.hidden_sizes, num_classes]
        return list(zip(sizes[:-1], sizes[1:]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VSMLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown VSMLConfig keys {sorted(unknown)}; known keys: {sorted(known)}")
        d = dict(d)
        if "cell" in d and isinstance(d["cell"], dict):
            d["cell"] = SubLSTMConfig(**d["cell"])
        return cls(**d)
