"""Baseline learners under VSML's online protocol (vsml.md §3.6), with the learner interface.

Every learner here runs episodes online with inner batch 1: at tick t it predicts ŷ_t from x_t
(before y_t is used), pays CE(ŷ_t, y_t), then learns from y_t.  Logits are tanh-bounded,
ŷ = bound·tanh(z/bound) (bound 100, as VSML).  All are vectorised over episodes E (no Python
loop over episodes; the only Python loop is over time) and satisfy :class:`vsml.learners.base.Learner`.

* :class:`OnlineSGD` — hand-designed: a 1-layer linear softmax or 2-layer tanh MLP trained by
  plain SGD or Adam (optax semantics) on each example; same initial weights in every episode
  (a fixed seed, reference PRNGKey 22).  Not meta-trainable (θ is empty).
* :class:`HebbianLearner` — one plastic linear layer with Oja fast weights (meta-trained).
* :class:`MetaRNN` — an LSTM fed [x_t, e_{t−1}, y_{t−1}] (Hochreiter et al. 2001; meta-trained).

Padding (reference ``configs/pad.yaml``, inputs 784, outputs 62): the meta-trained baselines have
a fixed maximum input size ``max_in_dim`` and class count ``max_classes`` so one θ serves every
task.  Inputs are zero-padded to ``max_in_dim``.  Classes beyond the task's C are *masked*: their
logits are treated as −inf (the learners return only the C real logits [E, T, C] and the softmax
/ error / label slots use the C real classes only).  The reference instead lets the padded
classes compete in the softmax.  Because padded inputs, errors and labels are exactly zero, the
computation is done in the reduced space (only the θ rows/columns of the D real inputs and C real
classes are read), which is equivalent to padding but cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from vsml.engine.cell import _linear

from vsml.engine.state import EpisodeOutput
from vsml.engine.params import truncated_normal

__all__ = [
    "HebbianLearner",
    "HebbianState",
    "MetaRNN",
    "MetaRNNConfig",
    "MetaRNNState",
    "OnlineSGD",
    "OnlineSGDState",
]


# --------------------------------------------------------------------------------------------
# shared helpers


def _bound(z: torch.Tensor, bound: float) -> torch.Tensor:
    """ŷ = bound · tanh(z / bound)."""
    return bound * torch.tanh(z / bound)


def _check_xy(who: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating-point tensor [E, T, D], got "
                        f"{type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() < 3:
        raise ValueError(f"{who}: x must have shape [E, T, D] (or [E, T, H, W, ...]); got {list(x.shape)}")
    x = x.reshape(x.shape[0], x.shape[1], -1)                               # [E, T, D]
    if not torch.is_tensor(y) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{who}: y must be an integer tensor [E, T] of class indices")
    if tuple(y.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{who}: y has shape {list(y.shape)} but x has [E, T] = {list(x.shape[:2])}")
    return x


def _resolve_classes(who: str, y: torch.Tensor, num_classes: int | None, state_classes: int | None) -> int:
    if state_classes is not None:
        if num_classes is not None and num_classes != state_classes:
            raise ValueError(f"{who}: num_classes={num_classes} but the carried state has {state_classes}")
        num_classes = state_classes
    if num_classes is None:
        raise ValueError(f"{who}: num_classes is required when no state is passed in")
    if num_classes < 2:
        raise ValueError(f"{who}: num_classes must be >= 2, got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return num_classes


def _finish(logits: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, num_classes: int,
            state: Any) -> EpisodeOutput:
    e, t_len = y.shape
    lg = torch.stack(logits, 1) if logits else x.new_zeros(e, 0, num_classes)     # [E, T, C]
    loss = F.cross_entropy(lg.reshape(-1, num_classes), y.reshape(-1), reduction="none").reshape(e, t_len)
    return EpisodeOutput(lg, loss, lg.argmax(-1) == y, state)


def _split_flat(theta: torch.Tensor, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Named views of a flat θ [P] or [E, P] -> {name: [*b, *shape]} (no copies)."""
    batch = theta.shape[:-1]
    out, off = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        out[name] = theta[..., off:off + size].reshape(*batch, *shape)
        off += size
    return out


def _check_flat_theta(who: str, theta: torch.Tensor, size: int, e: int) -> bool:
    """Validate a flat θ; returns True when it is per-episode ([E, size])."""
    if not torch.is_tensor(theta) or not theta.is_floating_point():
        raise TypeError(f"{who}: θ must be a floating-point tensor")
    if theta.dim() == 1 and theta.shape[0] == size:
        return False
    if theta.dim() == 2 and theta.shape == (e, size):
        return True
    raise ValueError(f"{who}: θ has shape {list(theta.shape)}; expected [{size}] (shared) or "
                     f"[E={e}, {size}] (one θ per episode)")


def _pad_limits(who: str, d: int, c: int, max_in: int, max_c: int) -> None:
    if d > max_in:
        raise ValueError(f"{who}: input dim D={d} exceeds max_in_dim={max_in}; raise max_in_dim")
    if c > max_c:
        raise ValueError(f"{who}: num_classes={c} exceeds max_classes={max_c}; raise max_classes")


def _aug_rows(d: int, c: int, max_in: int, max_c: int, device) -> torch.Tensor:
    """Indices of the real rows of the padded input [x (max_in), e-slot (max_c), y-slot (max_c)]."""
    return torch.cat([torch.arange(d), max_in + torch.arange(c), max_in + max_c + torch.arange(c)]).to(device)


# --------------------------------------------------------------------------------------------
# online SGD / Adam


@dataclass
class OnlineSGDState:
    """Per-episode weights and optimiser state of :class:`OnlineSGD`.

    params  [W1 [E, D, H], b1 [E, H], W2 [E, H, C], b2 [E, C]] (2 layers) or [W [E, D, C], b [E, C]]
    m, v    Adam moments, same shapes as params (empty lists for SGD)
    count   [E] number of updates so far (Adam bias correction)
    """

    params: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    count: torch.Tensor

    @property
    def num_episodes(self) -> int:
        return self.params[0].shape[0]

    @property
    def in_dim(self) -> int:
        return self.params[0].shape[1]

    @property
    def num_classes(self) -> int:
        return self.params[-1].shape[-1]


class OnlineSGD:
    """Online SGD / Adam baseline (vsml.md §3.6; reference ``models.SGD``).

    Network: ``hidden=None`` → linear softmax z = x W + b; ``hidden=H`` → z = tanh(x W1 + b1) W2 + b2
    (reference H = 160).  Logits ŷ = bound·tanh(z/bound).  Weights TruncatedNormal(1/√fan_in) at
    ±2σ, biases 0 (haiku's Linear), drawn from ``Generator().manual_seed(seed)`` so every episode
    starts from the same weights (reference: PRNGKey 22); ``seed=None`` draws a fresh init per
    episode from the ``generator`` passed to ``init_state``.

    At tick t, per episode: predict ŷ_t, then one step on CE(ŷ_t, y_t) with the gradient written
    out by hand (∂CE/∂ŷ = softmax(ŷ) − onehot(y); ∂ŷ/∂z = 1 − (ŷ/bound)²; then the chain rule
    through the layers), vectorised over E with per-episode weights:
    SGD p ← p − lr·g (reference lr 0.01); Adam (optax.adam: m, v EMAs with bias correction,
    p ← p − lr·m̂/(√v̂ + eps), reference lr 1e-3).  θ is empty: ``meta_trainable = False``.
    """

    meta_trainable = False

    def __init__(self, hidden: int | None = None, lr: float = 0.01, optimizer: str = "sgd",
                 tanh_bound: float = 100.0, seed: int | None = 22,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if hidden is not None and hidden < 1:
            raise ValueError(f"OnlineSGD.hidden must be None (1 layer) or >= 1, got {hidden}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"OnlineSGD.lr must be a finite number > 0, got {lr}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"OnlineSGD.optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if not tanh_bound > 0:
            raise ValueError(f"OnlineSGD.tanh_bound must be > 0, got {tanh_bound}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"OnlineSGD.betas must lie in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"OnlineSGD.eps must be > 0, got {eps}")
        self.hidden, self.lr, self.optimizer = hidden, float(lr), optimizer
        self.tanh_bound, self.seed, self.betas, self.eps = float(tanh_bound), seed, betas, float(eps)

    def init_theta(self, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.zeros(0, dtype=dtype, device=device)

    def layer_sizes(self, in_dim: int, num_classes: int) -> list[tuple[int, int]]:
        if self.hidden is None:
            return [(in_dim, num_classes)]
        return [(in_dim, self.hidden), (self.hidden, num_classes)]

    def init_state(self, num_episodes: int, in_dim: int, num_classes: int, generator=None,
                   dtype=torch.float32, device=None) -> OnlineSGDState:
        if num_episodes < 1 or in_dim < 1 or num_classes < 2:
            raise ValueError(f"OnlineSGD.init_state needs num_episodes >= 1, in_dim >= 1, num_classes >= 2; "
                             f"got {num_episodes}, {in_dim}, {num_classes}")
        shared = self.seed is not None
        gen = torch.Generator().manual_seed(int(self.seed)) if shared else generator
        params = []
        for a, b in self.layer_sizes(in_dim, num_classes):
            if shared:
                w = truncated_normal((a, b), 1.0 / math.sqrt(a), gen, dtype, device)
                w = w.expand(num_episodes, a, b).clone()                     # [E, A, B], same in every episode
            else:
                w = truncated_normal((num_episodes, a, b), 1.0 / math.sqrt(a), gen, dtype, device)
            params += [w, torch.zeros(num_episodes, b, dtype=dtype, device=device)]
        adam = self.optimizer == "adam"
        m = [torch.zeros_like(p) for p in params] if adam else []
        v = [torch.zeros_like(p) for p in params] if adam else []
        return OnlineSGDState(params, m, v, torch.zeros(num_episodes, dtype=dtype, device=device))

    def forward(self, params: list[torch.Tensor], x_t: torch.Tensor):
        """x_t [E, D] -> (logits [E, C], hidden activations or None)."""
        if self.hidden is None:
            w, b = params
            return _bound(torch.einsum("ed,edc->ec", x_t, w) + b, self.tanh_bound), None
        w1, b1, w2, b2 = params
        h = torch.tanh(torch.einsum("ed,edh->eh", x_t, w1) + b1)              # [E, H]
        return _bound(torch.einsum("eh,ehc->ec", h, w2) + b2, self.tanh_bound), h

    def grads(self, params: list[torch.Tensor], x_t: torch.Tensor, logits: torch.Tensor, h: torch.Tensor | None,
              y_t: torch.Tensor) -> list[torch.Tensor]:
        """∂CE(ŷ_t, y_t)/∂params per episode, by hand (batch 1)."""
        onehot = F.one_hot(y_t, logits.shape[-1]).to(logits.dtype)
        err = torch.softmax(logits, -1) - onehot                             # ∂CE/∂ŷ      [E, C]
        gz = err * (1.0 - (logits / self.tanh_bound).square())               # ∂CE/∂z      [E, C]
        if self.hidden is None:
            return [torch.einsum("ed,ec->edc", x_t, gz), gz]
        w2 = params[2]
        gh = torch.einsum("ec,ehc->eh", gz, w2)                              # ∂CE/∂h      [E, H]
        ga = gh * (1.0 - h.square())                                         # ∂CE/∂(xW1+b1)
        return [torch.einsum("ed,eh->edh", x_t, ga), ga, torch.einsum("eh,ec->ehc", h, gz), gz]

    def unroll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
               state: OnlineSGDState | None = None, generator=None) -> EpisodeOutput:
        who = "OnlineSGD"
        x = _check_xy(who, x, y)
        if theta is not None and theta.numel() != 0:
            raise ValueError(f"{who} has no meta-parameters: θ must be empty (init_theta()), got {list(theta.shape)}")
        num_classes = _resolve_classes(who, y, num_classes, None if state is None else state.num_classes)
        e, t_len, d = x.shape
        y = y.long()
        if state is None:
            state = self.init_state(e, d, num_classes, generator, x.dtype, x.device)
        elif state.num_episodes != e or state.in_dim != d:
            raise ValueError(f"{who}: the carried state is for E={state.num_episodes}, D={state.in_dim} but x "
                             f"has E={e}, D={d}")
        params, m, v, count = list(state.params), list(state.m), list(state.v), state.count
        b1, b2 = self.betas
        logits = []
        for t in range(t_len):
            x_t = x[:, t]
            lg, h = self.forward(params, x_t)                               # predict first
            logits.append(lg)
            gs = self.grads(params, x_t, lg, h, y[:, t])                     # then learn from y_t
            count = count + 1
            if self.optimizer == "sgd":
                params = [p - self.lr * g for p, g in zip(params, gs)]
            else:
                c1 = 1.0 - torch.pow(b1, count)                              # [E]
                c2 = 1.0 - torch.pow(b2, count)
                new_p = []
                for i, (p, g) in enumerate(zip(params, gs)):
                    m[i] = b1 * m[i] + (1.0 - b1) * g
                    v[i] = b2 * v[i] + (1.0 - b2) * g.square()
                    shape = (e,) + (1,) * (p.dim() - 1)
                    mh = m[i] / c1.reshape(shape)
                    vh = v[i] / c2.reshape(shape)
                    new_p.append(p - self.lr * mh / (vh.sqrt() + self.eps))
                params = new_p
        return _finish(logits, x, y, num_classes, OnlineSGDState(params, m, v, count))


# --------------------------------------------------------------------------------------------
# Hebbian fast weights


@dataclass
class HebbianState:
    """Fast weights F [E, D + 2C, C] (rows: the D real inputs, then the C error and C label slots)."""

    F: torch.Tensor

    @property
    def num_episodes(self) -> int:
        return self.F.shape[0]

    @property
    def num_classes(self) -> int:
        return self.F.shape[2]

    @property
    def in_dim(self) -> int:
        return self.F.shape[1] - 2 * self.F.shape[2]


class HebbianLearner:
    """One plastic linear layer with Oja fast weights (vsml.md §3.6; reference ``HebbianFW`` with
    ``use_oja: True``).

    With x_aug = [x (max_in_dim), e-slot (max_classes), y-slot (max_classes)] and θ = (W, C, b, ρ):

        z = x_aug · (W + C ⊙ F) + b,        ŷ = bound · tanh(z / bound)

    At tick t: (1) prediction pass with the e- and y-slots zero → ŷ_t; (2) e_t = softmax(ŷ_t) −
    onehot(y_t); (3) a second pass with x_aug = [x_t, e_t, onehot(y_t)] gives z'; with
    s = softmax(z') (unbounded, as the reference) and η = sigmoid(ρ), Oja's rule

        F_ij ← F_ij + η · s_j · (x_aug,i − s_j · F_ij)

    F = 0 at the start of every episode.  Init (haiku): W ~ TN(0, 1/√I) at ±2σ with
    I = max_in_dim + 2·max_classes, C = 0.01, b = 0, ρ = −4.5.  θ is one flat vector
    (W [I, Cmax], C [I, Cmax], b [Cmax], ρ [1]), shared [|θ|] or per-episode [E, |θ|].
    """

    meta_trainable = True

    def __init__(self, max_in_dim: int = 784, max_classes: int = 62, tanh_bound: float = 100.0,
                 coeff_init: float = 0.01, rate_init: float = -4.5):
        if max_in_dim < 1:
            raise ValueError(f"HebbianLearner.max_in_dim must be >= 1, got {max_in_dim}")
        if max_classes < 2:
            raise ValueError(f"HebbianLearner.max_classes must be >= 2, got {max_classes}")
        if not tanh_bound > 0:
            raise ValueError(f"HebbianLearner.tanh_bound must be > 0, got {tanh_bound}")
        self.max_in_dim, self.max_classes = int(max_in_dim), int(max_classes)
        self.tanh_bound, self.coeff_init, self.rate_init = float(tanh_bound), float(coeff_init), float(rate_init)

    @property
    def aug_dim(self) -> int:
        return self.max_in_dim + 2 * self.max_classes

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        i, c = self.aug_dim, self.max_classes
        return [("W", (i, c)), ("C", (i, c)), ("b", (c,)), ("rho", (1,))]

    @property
    def theta_size(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes())

    def init_theta(self, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        i, c = self.aug_dim, self.max_classes
        w = truncated_normal((i, c), 1.0 / math.sqrt(i), generator, dtype, device)
        return torch.cat([w.flatten(), torch.full((i * c,), self.coeff_init, dtype=dtype, device=device),
                          torch.zeros(c, dtype=dtype, device=device),
                          torch.full((1,), self.rate_init, dtype=dtype, device=device)])   # [|θ|]

    def init_state(self, num_episodes: int, in_dim: int, num_classes: int, generator=None,
                   dtype=torch.float32, device=None) -> HebbianState:
        if num_episodes < 1 or in_dim < 1 or num_classes < 2:
            raise ValueError(f"HebbianLearner.init_state needs num_episodes >= 1, in_dim >= 1, num_classes >= 2; "
                             f"got {num_episodes}, {in_dim}, {num_classes}")
        _pad_limits("HebbianLearner", in_dim, num_classes, self.max_in_dim, self.max_classes)
        return HebbianState(torch.zeros(num_episodes, in_dim + 2 * num_classes, num_classes,
                                        dtype=dtype, device=device))

    def unroll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
               state: HebbianState | None = None, generator=None) -> EpisodeOutput:
        who = "HebbianLearner"
        x = _check_xy(who, x, y)
        num_classes = _resolve_classes(who, y, num_classes, None if state is None else state.num_classes)
        e, t_len, d = x.shape
        c = num_classes
        _pad_limits(who, d, c, self.max_in_dim, self.max_classes)
        per_ep = _check_flat_theta(who, theta, self.theta_size, e)
        if x.dtype != theta.dtype:
            raise TypeError(f"{who}: x has dtype {x.dtype} but θ has {theta.dtype}")
        y = y.long()
        if state is None:
            state = self.init_state(e, d, c, generator, theta.dtype, theta.device)
        elif state.num_episodes != e or state.in_dim != d:
            raise ValueError(f"{who}: the carried state is for E={state.num_episodes}, D={state.in_dim} but x "
                             f"has E={e}, D={d}")
        p = _split_flat(theta, self.param_shapes())
        rows = _aug_rows(d, c, self.max_in_dim, self.max_classes, theta.device)
        W = p["W"][..., rows, :c]                                            # [*b, D+2C, C]
        Cf = p["C"][..., rows, :c]                                           # [*b, D+2C, C]
        bias = p["b"][..., :c]                                               # [*b, C]
        eta = torch.sigmoid(p["rho"])                                        # [*b, 1]
        if per_ep:
            eta = eta[:, :, None]                                            # [E, 1, 1]
        Fw = state.F                                                         # [E, D+2C, C]
        logits = []
        for t in range(t_len):
            x_t = x[:, t]                                                    # [E, D]
            w_eff = W + Cf * Fw                                              # [E, D+2C, C]
            z = torch.einsum("ed,edc->ec", x_t, w_eff[:, :d]) + bias         # e-, y-slots are zero
            lg = _bound(z, self.tanh_bound)                                  # [E, C]
            logits.append(lg)
            onehot = F.one_hot(y[:, t], c).to(lg.dtype)
            err = torch.softmax(lg, -1) - onehot                             # e_t   [E, C]
            x_aug = torch.cat([x_t, err, onehot], -1)                        # [E, D+2C]
            z2 = torch.einsum("ei,eic->ec", x_aug, w_eff) + bias             # [E, C]
            s = torch.softmax(z2, -1)                                        # [E, C]
            Fw = Fw + eta * (x_aug[:, :, None] * s[:, None, :] - s.square()[:, None, :] * Fw)   # Oja
        return _finish(logits, x, y, c, HebbianState(Fw))


# --------------------------------------------------------------------------------------------
# Meta-RNN


@dataclass
class MetaRNNState:
    """h, c [E, H] LSTM state; err [E, C] e_{t−1}; label [E, C] onehot(y_{t−1})."""

    h: torch.Tensor
    c: torch.Tensor
    err: torch.Tensor
    label: torch.Tensor

    @property
    def num_episodes(self) -> int:
        return self.h.shape[0]

    @property
    def num_classes(self) -> int:
        return self.err.shape[1]


@dataclass(frozen=True)
class MetaRNNConfig:
    """Typed architecture of the Meta-RNN baseline (``TrainConfig.metarnn``; vsml.md §3.6).

    The defaults are the reference padding (``configs/pad.yaml``: inputs 784, outputs 62) and the
    constructor defaults of :class:`MetaRNN`, so a config without this field (old checkpoints)
    builds the same learner.  ``max_in_dim`` / ``max_classes`` bound the tasks one θ can run; they
    also set the init scale of the LSTM input weights (TN(0, 1/√(max_in_dim + 2·max_classes +
    hidden))), so the padded defaults start the 64-d, 10-class family with ~2.2x smaller input
    weights than a compact ``max_in_dim=64, max_classes=10`` learner and carry a ~5x larger θ
    (padding costs no forward compute: only the D real columns of θ are read).

    Attributes:
        hidden: LSTM state size H.
        micro_ticks: LSTM steps per example on the same input (reference 2).
        max_in_dim: largest input size D this θ accepts (inputs are zero-padded to it).
        max_classes: largest class count C this θ accepts (padded classes are masked).
        tanh_bound: logits ŷ = bound·tanh(z/bound).
        forget_bias: added to the forget-gate pre-activation (haiku LSTM: 1).
    """

    hidden: int = 128
    micro_ticks: int = 2
    max_in_dim: int = 784
    max_classes: int = 62
    tanh_bound: float = 100.0
    forget_bias: float = 1.0

    def __post_init__(self) -> None:
        from vsml.engine.config import ConfigError
        for name, lo in (("hidden", 1), ("micro_ticks", 1), ("max_in_dim", 1), ("max_classes", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"metarnn.{name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.tanh_bound, (int, float)) and math.isfinite(self.tanh_bound) and self.tanh_bound > 0):
            raise ConfigError(f"metarnn.tanh_bound must be a finite number > 0, got {self.tanh_bound!r}")
        if not (isinstance(self.forget_bias, (int, float)) and math.isfinite(self.forget_bias)):
            raise ConfigError(f"metarnn.forget_bias must be a finite number, got {self.forget_bias!r}")

    def build(self) -> "MetaRNN":
        """The :class:`MetaRNN` with these settings."""
        return MetaRNN(hidden=self.hidden, micro_ticks=self.micro_ticks, max_in_dim=self.max_in_dim,
                       max_classes=self.max_classes, tanh_bound=float(self.tanh_bound),
                       forget_bias=float(self.forget_bias))


class MetaRNN:
    """Meta-RNN baseline (vsml.md §3.6; Hochreiter et al. 2001; reference ``models.MetaRNN``).

    An LSTM (haiku semantics: one affine map of [input, h] to gates in the order i, g, f, o;
    c' = σ(f + 1)⊙c + σ(i)⊙tanh(g), h' = σ(o)⊙tanh(c'), forget bias +1) fed at tick t the input
    u_t = [x_t padded to max_in_dim, e_{t−1} padded to max_classes, onehot(y_{t−1}) padded] for
    ``micro_ticks`` steps (reference 2, same u_t), then a linear readout to max_classes logits
    (padded classes masked), ŷ_t = bound·tanh(z/bound), and e_t = softmax(ŷ_t) − onehot(y_t).
    h, c, e, y start at zero.  Init: LSTM weight TN(0, 1/√(I + H)) at ±2σ (I = max_in_dim +
    2·max_classes), readout TN(0, 1/√H), biases 0.  θ = flat (W_x [4H, I], W_h [4H, H], b [4H],
    W_out [Cmax, H], b_out [Cmax]); shared [|θ|] or per-episode [E, |θ|] (batched matmuls).
    """

    meta_trainable = True

    def __init__(self, hidden: int = 128, micro_ticks: int = 2, max_in_dim: int = 784, max_classes: int = 62,
                 tanh_bound: float = 100.0, forget_bias: float = 1.0):
        if hidden < 1:
            raise ValueError(f"MetaRNN.hidden must be >= 1, got {hidden}")
        if micro_ticks < 1:
            raise ValueError(f"MetaRNN.micro_ticks must be >= 1, got {micro_ticks}")
        if max_in_dim < 1:
            raise ValueError(f"MetaRNN.max_in_dim must be >= 1, got {max_in_dim}")
        if max_classes < 2:
            raise ValueError(f"MetaRNN.max_classes must be >= 2, got {max_classes}")
        if not tanh_bound > 0:
            raise ValueError(f"MetaRNN.tanh_bound must be > 0, got {tanh_bound}")
        self.hidden, self.micro_ticks = int(hidden), int(micro_ticks)
        self.max_in_dim, self.max_classes = int(max_in_dim), int(max_classes)
        self.tanh_bound, self.forget_bias = float(tanh_bound), float(forget_bias)

    @property
    def in_size(self) -> int:
        return self.max_in_dim + 2 * self.max_classes

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, c = self.hidden, self.in_size, self.max_classes
        return [("W_x", (4 * h, i)), ("W_h", (4 * h, h)), ("b", (4 * h,)), ("W_out", (c, h)), ("b_out", (c,))]

    @property
    def theta_size(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes())

    def init_theta(self, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
        h, i, c = self.hidden, self.in_size, self.max_classes
        std = 1.0 / math.sqrt(i + h)
        w = truncated_normal((4 * h, i + h), std, generator, dtype, device)  # haiku Linear on [u, h]
        parts = [w[:, :i].flatten(), w[:, i:].flatten(), torch.zeros(4 * h, dtype=dtype, device=device),
                 truncated_normal((c, h), 1.0 / math.sqrt(h), generator, dtype, device).flatten(),
                 torch.zeros(c, dtype=dtype, device=device)]
        return torch.cat(parts)                                              # [|θ|]

    def init_state(self, num_episodes: int, in_dim: int, num_classes: int, generator=None,
                   dtype=torch.float32, device=None) -> MetaRNNState:
        if num_episodes < 1 or in_dim < 1 or num_classes < 2:
            raise ValueError(f"MetaRNN.init_state needs num_episodes >= 1, in_dim >= 1, num_classes >= 2; "
                             f"got {num_episodes}, {in_dim}, {num_classes}")
        _pad_limits("MetaRNN", in_dim, num_classes, self.max_in_dim, self.max_classes)
        z = partial(torch.zeros, dtype=dtype, device=device)
        return MetaRNNState(z(num_episodes, self.hidden), z(num_episodes, self.hidden),
                            z(num_episodes, num_classes), z(num_episodes, num_classes))

    def unroll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
               state: MetaRNNState | None = None, generator=None) -> EpisodeOutput:
        who = "MetaRNN"
        x = _check_xy(who, x, y)
        num_classes = _resolve_classes(who, y, num_classes, None if state is None else state.num_classes)
        e, t_len, d = x.shape
        c, hd = num_classes, self.hidden
        _pad_limits(who, d, c, self.max_in_dim, self.max_classes)
        _check_flat_theta(who, theta, self.theta_size, e)
        if x.dtype != theta.dtype:
            raise TypeError(f"{who}: x has dtype {x.dtype} but θ has {theta.dtype}")
        y = y.long()
        if state is None:
            state = self.init_state(e, d, c, generator, theta.dtype, theta.device)
        elif state.num_episodes != e:
            raise ValueError(f"{who}: the carried state is for E={state.num_episodes} but x has E={e}")
        p = _split_flat(theta, self.param_shapes())
        mi, mc = self.max_in_dim, self.max_classes
        w_in = p["W_x"][..., :d]                                             # [*b, 4H, D]
        w_err = p["W_x"][..., mi:mi + c]                                     # [*b, 4H, C]
        w_lab = p["W_x"][..., mi + mc:mi + mc + c]                           # [*b, 4H, C]
        w_out, b_out = p["W_out"][..., :c, :], p["b_out"][..., :c]           # [*b, C, H], [*b, C]
        x_term = _linear(x, w_in, p["b"])                                    # [E, T, 4H], β folded in
        h, cc, err, lab = state.h, state.c, state.err, state.label
        logits = []
        for t in range(t_len):
            u_term = x_term[:, t] + _linear(err, w_err) + _linear(lab, w_lab)  # [E, 4H], fixed over micro-ticks
            for _ in range(self.micro_ticks):
                gates = u_term + _linear(h, p["W_h"])                        # [E, 4H]
                gi, gg, gf, go = gates.split(hd, dim=-1)                     # order i, g, f, o
                cc = torch.sigmoid(gf + self.forget_bias) * cc + torch.sigmoid(gi) * torch.tanh(gg)
                h = torch.sigmoid(go) * torch.tanh(cc)
            lg = _bound(_linear(h, w_out, b_out), self.tanh_bound)           # [E, C]
            logits.append(lg)
            lab = F.one_hot(y[:, t], c).to(lg.dtype)
            err = torch.softmax(lg, -1) - lab                                # e_t, fed at t+1
        return _finish(logits, x, y, c, MetaRNNState(h, cc, err, lab))
