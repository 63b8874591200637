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
from typing import Any

import torch
import torch.nn.functional as F

from vsml.engine.config import ConfigError, VSMLConfig
from vsml.estimators.base import ShardableEstimator, clip_grad, grad_norm
from vsml.engine.cell import forward_phi, lstm_micro_steps
from vsml.engine.network import VSMLNetwork, read_logits


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
        length: ticks per cloning episode (BPTT through all of them unless ``truncation`` > 0).
        truncation: long-horizon cloning (issue 15).  0 (default): every step clones fresh episodes
            of ``length`` ticks with BPTT through all of them.  > 0: the ``episodes`` episodes of
            ``length`` ticks (e.g. 2000, the meta-test horizon) are cloned ``truncation`` ticks per
            step with truncated BPTT; the student's state, the teacher's weights and the last fed
            error are carried from step to step, and a new batch of episodes starts every
            ceil(length / truncation) steps (all episodes in phase).  The carried state is saved
            in checkpoints (``state_dict``), so a resumed run continues bit for bit.
        own_error_max: scheduled sampling: the probability that the error fed to the student at a
            tick is its *own* (softmax of its logits − onehot, as at meta-test) rather than the
            teacher's, reached after ``own_error_ramp`` steps (linear ramp from 0).  The teacher's
            weights integrate exactly the errors fed to the student, so the target stays "what SGD
            would hold after these errors" (DAgger-style).  0: teacher forcing (the old behaviour).
        own_error_ramp: cloning steps over which the own-error probability ramps up (0: from step 0).
        teacher_decay: the teacher's weight decay λ per tick, w ← (1 − λ) w − α x e (0: plain SGD).
        teacher_clip: clip the teacher's weights to ±teacher_clip after every update (0: none).
        ce_weight: long-horizon mode: add ce_weight × the student's online cross-entropy on the labels
            (its logits before the label is revealed, as at meta-test) to the cloning loss, i.e. truncated
            BPTT on the meta-test objective over the long episodes, with cloning as a regulariser (0: none).
        teacher_errors: which error the teacher integrates when the student is fed its own errors
            (own_error_max > 0).  "fed" (default, DAgger): the error fed to the student, so the target is
            "SGD after the student's errors" -- a target that falls behind the student once the student
            predicts better than SGD would (its errors are small, the teacher learns little; issue 15
            measured teacher accuracy 0.36 vs student 0.67 at ticks 1800-2000).  "own": the teacher's own
            error softmax(κ·mean_a w·x) − onehot, i.e. the target is the trajectory of online SGD on the same
            stream from the same initial weights; a perfect clone is fed exactly these errors, so both
            choices agree there.  Same as "fed" under teacher forcing.
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
    truncation: int = 0
    own_error_max: float = 0.0
    own_error_ramp: int = 0
    teacher_decay: float = 0.0
    teacher_clip: float = 0.0
    ce_weight: float = 0.0
    teacher_errors: str = "fed"

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
        if not 0 <= self.truncation <= self.length:
            raise ConfigError(f"clone.truncation must lie in [0, clone.length={self.length}] (0: full BPTT), "
                              f"got {self.truncation}")
        if not 0.0 <= self.own_error_max <= 1.0 or self.own_error_ramp < 0:
            raise ConfigError(f"clone.own_error_max must lie in [0, 1] and clone.own_error_ramp >= 0; got "
                              f"{self.own_error_max}, {self.own_error_ramp}")
        if self.ce_weight < 0:
            raise ConfigError(f"clone.ce_weight must be >= 0, got {self.ce_weight}")
        if self.teacher_errors not in ("fed", "own"):
            raise ConfigError(f"clone.teacher_errors must be 'fed' or 'own', got {self.teacher_errors!r}")
        if not (0.0 <= self.teacher_decay < 1.0 and self.teacher_clip >= 0.0):
            raise ConfigError(f"clone.teacher_decay must lie in [0, 1) and clone.teacher_clip >= 0; got "
                              f"{self.teacher_decay}, {self.teacher_clip}")

    @property
    def long(self) -> bool:
        """Whether the long-horizon / scheduled-sampling / bounded-teacher loss is used (issue 15)."""
        return bool(self.truncation or self.own_error_max or self.teacher_decay or self.teacher_clip or self.ce_weight)

    def own_error_prob(self, step: int) -> float:
        if not self.own_error_max:
            return 0.0
        if not self.own_error_ramp:
            return self.own_error_max
        return self.own_error_max * min(1.0, step / self.own_error_ramp)


def check_cloneable(cfg: VSMLConfig) -> None:
    if cfg.num_layers != 1 or cfg.backward_pass or cfg.cell.layer_norm or cfg.feed_label:
        raise ConfigError(
            "learning-algorithm cloning supports one dense layer in the forward-only schedule without "
            f"LayerNorm or label feeding; got hidden_sizes={cfg.hidden_sizes}, backward_pass={cfg.backward_pass}, "
            f"layer_norm={cfg.cell.layer_norm}, feed_label={cfg.feed_label} (set clone.steps 0 or change these)")


def teacher_update(w: torch.Tensor, x_t: torch.Tensor, e_t: torch.Tensor, alpha: float, decay: float = 0.0,
                   clip: float = 0.0) -> torch.Tensor:
    """One step of the (optionally weight-decayed / clipped) online-SGD teacher: w [E, D, C], x_t [E, D],
    e_t [E, C].  With decay = clip = 0 exactly the plain SGD step of the module docstring."""
    w = w - alpha * x_t[:, :, None] * e_t[:, None, :]
    if decay:
        w = w * (1.0 - decay)
    if clip:
        w = w.clamp(-clip, clip)
    return w


def sgd_teacher(x: torch.Tensor, y: torch.Tensor, num_classes: int, w0: torch.Tensor, alpha: float,
                decay: float = 0.0, clip: float = 0.0, logit_scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the online-SGD teacher of the module docstring.

    x [E, T, D], y [E, T], w0 [E, D, C] -> (w [E, T, D, C] the weight used at tick t,
    e [E, T, C] the error of example t, logits [E, T, C]).  ``decay`` / ``clip``: see
    :func:`teacher_update` (CloneConfig.teacher_decay / teacher_clip).  ``logit_scale``: κ of the
    student's read-out (VSMLConfig.logit_scale); the teacher's logits are κ·mean_a w·x.
    """
    e_num, t_len, _ = x.shape
    w = w0
    ws, es, zs = [], [], []
    for t in range(t_len):
        if t > 0:
            if decay or clip:
                w = teacher_update(w, x[:, t - 1], es[-1], alpha, decay, clip)
            else:
                w = w - alpha * x[:, t - 1, :, None] * es[-1][:, None, :]   # [E, D, C]
        ws.append(w)
        z = (w * x[:, t, :, None]).mean(1) * logit_scale                     # [E, C]
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
        if self.cfg.long:
            raise ConfigError("long-horizon cloning (clone.truncation / own_error_max / teacher_decay / "
                              "teacher_clip) runs through estimate() on one process; it is not sharded")
        net, cfg = self.net, self.net.cfg
        e_num, t_len, d = x.shape
        st = net.init_state(e_num, d, num_classes, generator, theta.dtype, theta.device)
        w_seq, e_seq, _ = sgd_teacher(x, y, num_classes, st.c[0][..., 0], self.cfg.alpha,
                                      logit_scale=cfg.logit_scale)
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
            phi = forward_phi(p, h, x[sl, t])[..., cfg.output_idx]          # [E', A, B]
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

    # -- long-horizon cloning (issue 15): truncated BPTT over long episodes, state carried ------------

    def _start_block(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int, dtype) -> None:
        """New episodes (the step's batch): fresh random student state, the teacher's weights from the
        student's cell element 0, no error fed yet."""
        x, y, gen = self.prepare(x, y, step)
        e_num, _, d = x.shape
        st = self.net.init_state(e_num, d, num_classes, gen, dtype, x.device)
        sgen = torch.Generator().manual_seed(gen.initial_seed() + 1)      # scheduled-sampling coin flips
        self._carry = {"x": x, "y": y, "pos": 0, "h": st.h[0], "c": st.c[0], "w": st.c[0][..., 0].clone(),
                       "e": None, "num_classes": num_classes, "gen_state": sgen.get_state()}

    def loss_long(self, theta: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Cloning loss of one truncation of the carried episodes (advances the carried state).

        Per tick: the student sees x_t and the error fed at t − 1, emits φ_t; target w_t·x_t where w_t
        is the teacher's weight; then the fed error e_t is, per episode, the student's own
        (softmax(ŷ_student) − onehot, detached) with probability p = own_error_prob(step), else the
        teacher's (softmax(κ·mean_a w_t x_t) − onehot), and the teacher integrates the *fed* error
        (``teacher_errors`` "fed") or its own (``teacher_errors`` "own")."""
        net, cfg, cc = self.net, self.net.cfg, self.cfg
        k = self._carry
        x, y, c_num = k["x"], k["y"], k["num_classes"]
        t0 = k["pos"]
        t1 = min(x.shape[1], t0 + (cc.truncation or x.shape[1]))
        gen = torch.Generator()
        gen.set_state(k["gen_state"])
        p_own = cc.own_error_prob(step)
        prm = net.layer_params(theta)[0]
        h, c, w, e_fed = k["h"].detach(), k["c"].detach(), k["w"], k["e"]
        total = x.new_zeros(())
        acc_s = acc_t = own = ce_sum = 0.0
        for t in range(t0, t1):
            xt = x[:, t]
            fwd = net.embed_input(xt)
            bwd = x.new_zeros(fwd.shape[0], c_num, cfg.cell.msg)
            if e_fed is not None:
                bwd[..., cfg.error_idx] = e_fed
            h, c = lstm_micro_steps(prm, fwd, bwd, h, c, cfg.micro_ticks)
            phi = forward_phi(prm, h, xt)[..., cfg.output_idx]             # [E, A, B]
            target = w * xt[:, :, None]
            total = total + (phi - target).square().mean() / (target.var() + 1e-3)
            z_s = read_logits(cfg, phi.mean(1))                             # the student's logits [E, B]
            if cc.ce_weight:
                ce = F.cross_entropy(z_s, y[:, t])
                total = total + cc.ce_weight * ce
                ce_sum += ce.item()
            with torch.no_grad():
                onehot = F.one_hot(y[:, t], c_num).to(x.dtype)
                z_s = z_s.detach()
                z_t = target.mean(1) * cfg.logit_scale                     # the teacher's, same read-out
                acc_s += (z_s.argmax(-1) == y[:, t]).float().mean().item()
                acc_t += (z_t.argmax(-1) == y[:, t]).float().mean().item()
                e_teacher = torch.softmax(z_t, -1) - onehot                 # [E, B]
                e_fed = e_teacher
                if p_own > 0:
                    m = torch.rand(x.shape[0], generator=gen) < p_own
                    own += m.float().mean().item()
                    e_fed = torch.where(m.to(x.device)[:, None], torch.softmax(z_s, -1) - onehot, e_fed)
                w = teacher_update(w, xt, e_teacher if cc.teacher_errors == "own" else e_fed, cc.alpha,
                                   cc.teacher_decay, cc.teacher_clip)
        n = t1 - t0
        k.update(pos=t1, h=h.detach(), c=c.detach(), w=w, e=e_fed, gen_state=gen.get_state())
        info = {"clone_acc_student": acc_s / n, "clone_acc_teacher": acc_t / n, "own_error_frac": own / n,
                "own_error_p": p_own, "clone_pos": t0, "teacher_w_std": w.std().item(),
                "student_ce": ce_sum / n}
        return total / n, info

    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int):
        if self.cfg.long:
            k = getattr(self, "_carry", None)
            if k is None or k["pos"] >= k["x"].shape[1]:
                self._start_block(x, y, num_classes, step, theta.dtype)
            th = theta.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss, info = self.loss_long(th, step)
                (grad,) = torch.autograd.grad(loss, th)
            norm = grad.norm().item()
            if self.cfg.clip_grad_norm > 0 and norm > self.cfg.clip_grad_norm:
                grad = grad * (self.cfg.clip_grad_norm / norm)
            return grad, {"clone_loss": loss.item(), "grad_norm": norm, **info}
        return super().estimate(theta, x, y, num_classes, step)


@dataclass
class LongCloneEstimator:
    """Long-horizon cloning (``CloneConfig.long``) as a :class:`vsml.estimators.base.MetaGradientEstimator`
    with explicit state: the carried episodes (data, the student's (h, c), the teacher's weights, the last
    fed error, the position and the scheduled-sampling generator).  A new batch of ``episodes`` x
    ``length`` training episodes is drawn (``Problem.batch`` of that step) only when the carried ones are
    used up; the state goes into every checkpoint, so a resume mid-episode is bit for bit."""

    inner: CloneEstimator
    problem: Any
    episodes: int
    length: int
    loss_metric: str = "clone_loss"

    def init(self, theta: torch.Tensor) -> None:
        return None

    def step(self, theta: torch.Tensor, state: dict | None, step: int) -> tuple[torch.Tensor, dict, dict]:
        self.inner._carry = state
        if state is None or state["pos"] >= state["x"].shape[1]:
            b = self.problem.batch(self.episodes, self.length, step)
            self.inner._start_block(b.x, b.y, b.num_classes, step, theta.dtype)
        grad, metrics = self.inner.estimate(theta, None, None, self.inner._carry["num_classes"], step)
        return grad, metrics, self.inner._carry

    def state_dict(self, state: dict | None) -> dict:
        if state is None:
            return {}
        return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}

    def load_state_dict(self, theta: torch.Tensor, d: dict) -> dict | None:
        if not d:
            return None
        return {k: (v.to(theta.device) if torch.is_tensor(v) and k != "gen_state" else v) for k, v in d.items()}
