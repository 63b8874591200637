"""Learning-algorithm cloning: meta-train θ by supervised learning so that every sub-LSTM behaves
like one weight of a linear model trained by online gradient descent (vsml.md §3.7, "VSML can
implement backprop").

The teacher, for a dense layer with A inputs and B outputs in the forward-only schedule (§1.5):
at tick t the sub-LSTM (a, b) sees x_t[a] (forward element 0) and the error e_{t-1}[b] of the
previous example (backward element 0), and the teacher weight evolves as

    w_t[a, b] = w_{t-1}[a, b] − α · x_{t-1}[a] · e_{t-1}[b]         (the SGD step of example t−1)
    ŷ_t[b]    = mean_a w_t[a, b] · x_t[a]                          (the layer's mean aggregation)
    e_t       = softmax(ŷ_t) − onehot(y_t)

i.e. online SGD on the linear model W = w / A with learning rate α / A (mean aggregation makes the
effective rate shrink with the input count).  w_0 is the sub-LSTM's random initial cell element 0,
so the teacher starts from the same random state the student starts from.  The clone is trained
to emit φ_t[a, b][output_idx] = w_t[a, b] · x_t[a] (its contribution to logit b), under teacher
forcing: the errors fed to the student are the teacher's.

After cloning, the frozen θ is a learner: run through ``VSMLNetwork.unroll`` it learns new tasks
online purely in its forward dynamics, and ES / BPTT meta-training can start from it.

Scope: one dense layer, forward-only schedule, no LayerNorm on the messages (LayerNorm removes the
magnitude that carries w·x).  Deep stacks (online backprop teacher): ``vsml/estimators/cloning_deep.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vsml.engine.config import ConfigError, VSMLConfig
from vsml.estimators.base import ShardableEstimator, clip_grad, grad_norm
from vsml.engine.cell import _linear, lstm_micro_steps
from vsml.engine.network import VSMLNetwork


@dataclass(frozen=True)
class CloneConfig:
    """Cloning phase of a training run (``steps = 0``: none).

    Attributes:
        steps: supervised cloning steps before the meta-training estimator takes over.
        alpha: the teacher's per-synapse step size α (see the module docstring).
        hidden_alpha: deep cloning (vsml/estimators/cloning_deep.py): α of the hidden layers; 0 = ``alpha``.
        window: deep cloning: BPTT window in ticks; the teacher first learns alone for a random
            0..length−window examples of the episode and the student starts from its weights, so the
            student also sees late, large-weight phases of learning (0 = window of ``length``: none).
        lr: Adam learning rate of the cloning phase.
        clip_grad_norm: global gradient-norm clip (0: none).
        random_frac: fraction of episodes whose inputs are replaced by N(0, 1) noise (random
            inputs with the same labels and teacher), for robustness beyond the task's inputs.
        episodes: episodes per cloning step.
        length: ticks per cloning episode (BPTT through all of them).
    """

    steps: int = 0
    alpha: float = 1.0
    hidden_alpha: float = 0.0
    window: int = 0
    lr: float = 3e-3
    clip_grad_norm: float = 1.0
    random_frac: float = 0.25
    episodes: int = 8
    length: int = 30

    def __post_init__(self):
        if self.steps < 0 or self.episodes < 1 or self.length < 2:
            raise ConfigError(f"clone.steps >= 0, clone.episodes >= 1 and clone.length >= 2 required; got "
                              f"{self.steps}, {self.episodes}, {self.length}")
        if not (self.alpha > 0 and self.lr > 0):
            raise ConfigError(f"clone.alpha and clone.lr must be > 0; got {self.alpha}, {self.lr}")
        if self.hidden_alpha < 0:
            raise ConfigError(f"clone.hidden_alpha must be >= 0 (0: use clone.alpha), got {self.hidden_alpha}")
        if not 0 <= self.window <= self.length:
            raise ConfigError(f"clone.window must lie in [0, clone.length={self.length}] (0: no teacher burn-in), "
                              f"got {self.window}")
        if not 0.0 <= self.random_frac <= 1.0:
            raise ConfigError(f"clone.random_frac must lie in [0, 1], got {self.random_frac}")


def check_cloneable(cfg: VSMLConfig) -> None:
    if cfg.num_layers != 1 or cfg.backward_pass or cfg.cell.layer_norm or cfg.feed_label:
        raise ConfigError(
            "learning-algorithm cloning supports one dense layer in the forward-only schedule without "
            f"LayerNorm or label feeding; got hidden_sizes={cfg.hidden_sizes}, backward_pass={cfg.backward_pass}, "
            f"layer_norm={cfg.cell.layer_norm}, feed_label={cfg.feed_label} (set clone.steps 0 or change these)")


def sgd_teacher(x: torch.Tensor, y: torch.Tensor, num_classes: int, w0: torch.Tensor, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the online-SGD teacher of the module docstring.

    x [E, T, D], y [E, T], w0 [E, D, C] -> (w [E, T, D, C] the weight used at tick t,
    e [E, T, C] the error of example t, logits [E, T, C]).
    """
    e_num, t_len, _ = x.shape
    w = w0
    ws, es, zs = [], [], []
    for t in range(t_len):
        if t > 0:
            w = w - alpha * x[:, t - 1, :, None] * es[-1][:, None, :]       # [E, D, C]
        ws.append(w)
        z = (w * x[:, t, :, None]).mean(1)                                   # [E, C]
        zs.append(z)
        es.append(torch.softmax(z, -1) - F.one_hot(y[:, t], num_classes).to(z.dtype))
    return torch.stack(ws, 1), torch.stack(es, 1), torch.stack(zs, 1)


def prepare_clone_batch(cfg: CloneConfig, seed: int, x: torch.Tensor, y: torch.Tensor, step: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """The episodes of cloning step ``step`` (cut to ``cfg.length``, the first ``random_frac`` of them with
    N(0, 1) inputs) and the generator that then draws the initial states; shared by the shallow and the
    deep cloning estimator (vsml/estimators/cloning_deep.py)."""
    from tasks.base import derive_seed
    gen = torch.Generator().manual_seed(derive_seed(seed, "clone", step))
    x = x[:, : cfg.length]
    y = y[:, : cfg.length]
    n_rand = int(round(cfg.random_frac * x.shape[0]))
    if n_rand:
        x = x.clone()
        x[:n_rand] = torch.randn(x[:n_rand].shape, generator=gen, dtype=x.dtype).to(x.device)
    return x, y, gen


class CloneEstimator(ShardableEstimator):
    """Gradient of the cloning loss, behind the same ``estimate`` interface as ES and BPTT
    (sharded over episodes: :class:`vsml.estimators.base.ShardableEstimator`).

    loss = mean_t mean_{e,a,b} (φ_t[a,b][output_idx] − w_t[a,b] x_t[a])² / Var(target), with BPTT
    through the episode and the teacher's errors fed to the student (teacher forcing).
    """

    def __init__(self, net: VSMLNetwork, cfg: CloneConfig, seed: int = 0):
        check_cloneable(net.cfg)
        self.net, self.cfg, self.seed = net, cfg, seed

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             generator: torch.Generator, episodes: slice | None = None) -> torch.Tensor:
        """The cloning loss of the class docstring over x [E, T, D].

        ``episodes`` (vsml/training/distributed.py): unroll the student on these episodes only and return
        their share of the loss, Σ_{e in episodes} / (E·A·B) per tick, with the initial states,
        the teacher and the target variance still those of all E episodes, so that the shares of
        a partition of the episodes sum to the full loss.
        """
        net, cfg = self.net, self.net.cfg
        e_num, t_len, d = x.shape
        st = net.init_state(e_num, d, num_classes, generator, theta.dtype, theta.device)
        w_seq, e_seq, _ = sgd_teacher(x, y, num_classes, st.c[0][..., 0], self.cfg.alpha)
        sl = slice(None) if episodes is None else episodes
        p = net.layer_params(theta)[0]
        h, c = st.h[0][sl], st.c[0][sl]
        total = x.new_zeros(())
        for t in range(t_len):
            fwd = net.embed_input(x[sl, t])                                  # [E', A, M]
            bwd = x.new_zeros(fwd.shape[0], num_classes, cfg.cell.msg)       # [E', B, M]
            if t > 0:
                bwd[..., cfg.error_idx] = e_seq[sl, t - 1]
            h, c = lstm_micro_steps(p, fwd, bwd, h, c, cfg.micro_ticks)
            phi = _linear(h, p.W_fwd, p.b_fwd)[..., cfg.output_idx]          # [E', A, B]
            target = w_seq[:, t] * x[:, t, :, None]                          # [E, A, B]
            if episodes is None:
                total = total + (phi - target).square().mean() / (target.var() + 1e-3)
            else:
                total = total + (phi - target[sl]).square().sum() / target.numel() / (target.var() + 1e-3)
        return total / t_len

    def prepare(self, x: torch.Tensor, y: torch.Tensor, step: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """:func:`prepare_clone_batch` with this estimator's config and seed."""
        return prepare_clone_batch(self.cfg, self.seed, x, y, step)

    def num_parts(self, x: torch.Tensor) -> int:
        return x.shape[0]

    def partial(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int,
                part: range) -> torch.Tensor:
        """The unclipped gradient and the loss share of the episodes in ``part``, packed [|θ| + 1] in
        float64 (the teacher, states and target variance are those of all episodes, see :meth:`loss`)."""
        x, y, gen = self.prepare(x, y, step)                                 # [E, T, D], [E, T]
        episodes = None if len(part) == x.shape[0] else slice(part.start, part.stop)
        th = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(th, x, y, num_classes, gen, episodes=episodes)
            (grad,) = torch.autograd.grad(loss, th)
        return torch.cat([grad.reshape(-1).double(), loss.detach().double().reshape(1)])   # [|θ| + 1]

    def reduce(self, theta: torch.Tensor, total: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        grad = total[:-1].to(theta.dtype).reshape(theta.shape)
        norm = grad_norm(grad)
        return clip_grad(grad, self.cfg.clip_grad_norm), {"clone_loss": float(total[-1]), "grad_norm": norm}
