"""Deep learning-algorithm cloning: every sub-LSTM of every layer of a dense VSML stack imitates one
weight of a multi-layer perceptron trained by online backprop (vsml.md §3.7, "VSML can implement
backprop"); the shallow, forward-only case stays in ``vsml/estimators/cloning.py``.

Schedule.  The student runs the backward-pass schedule (vsml.md §1.5) with ``bwd_reset`` (every
stored backward message is zeroed after the reverse sweep): per example a forward sweep with no
error input anywhere, then a reverse sweep carrying the error down.  So "an error is present" means
exactly "this is the backward pass: propagate and update", which a sub-LSTM can tell from its
inputs.  (With the reference's schedule the lower layers keep their last backward message during
the next forward sweep, and a sub-LSTM cannot tell a fresh error from a stale one.)

Teacher (``mlp_sgd_step``) for layers k = 0..K−1 with A_k inputs, B_k outputs, per-synapse weights
w_k[a, b], and the same mean aggregation as the student (vsml.md §1.3):

    a_0 = x_t;   z_k[b] = mean_a w_k[a, b] a_k[a];   a_{k+1} = tanh(γ_k z_k)   (logits = z_{K−1})
    δ_{K−1} = e_t = softmax(z_{K−1}) − onehot(y_t)
    g_k[a, b] = γ_{k−1} tanh'(γ_{k−1} z_{k−1}[a]) · w_k[a, b] · δ_k[b]   (k >= 1: the weight's share of the error)
    δ_{k−1}[a] = mean_b g_k[a, b]
    w_k[a, b] ← w_k[a, b] − α_k · a_k[a] · δ_k[b]

with the gain γ_k = √A_k (``mlp_sgd_step(gain=True)``, the default: it undoes the mean's 1/A_k down to
the usual 1/√fan-in scale, so the hidden units start in a useful range) or γ_k = 1.
This is exact online backprop on the MLP z_k = W_kᵀ a_k with W_k = w_k / A_k, except that the mean
over b (instead of the sum) scales the propagated error by A_k / B_k per layer: i.e. exact backprop
with the per-layer learning rates η_k = (α_k / A_k) · Π_{j>k} A_j / B_j.  w_k starts from the student's own
random initial cell element 0 of layer k (vsml.md §1.6), so teacher and student start from the same
random network.

Sub-LSTM (a, b) of layer k sees a_k[a] in forward element ``input_idx`` (k = 0, the pixel) or the
pre-activation γ_{k−1} z_{k−1}[a] in element ``output_idx`` (k >= 1: the mean of the previous layer's φ),
and δ_k[b] in backward element ``error_idx``.  Targets (all regressions, normalised by the target's
mean square):

    forward sweep   φ_ab[output_idx] = γ_k w_k[a, b] · a_k[a]             (its forward contribution)
    reverse sweep   ψ_ab[error_idx]  = g_k[a, b]           (k >= 1)       (its backward contribution)
                    φ_ab[output_idx] = γ_k w_k'[a, b] · a_k[a]            (after the update: the state
                                                                           has moved by the gradient step)

with γ_k the hidden gain below (γ_{K−1} = 1 for the logits), so a hidden layer's outgoing message
carries the unit-scale pre-activation γ_k z_k (≈ 0.05-1) rather than z_k (≈ 0.005 at the start):
the next layer's sub-LSTM cannot resolve inputs 100x below unit scale with weights of order 1.

Teacher forcing: the error entering the last layer is the teacher's; every other message is the
student's own (so errors compound across layers and ticks, as at meta-test time).

Teacher burn-in (``clone.window`` = W > 0): the teacher's logits stay tiny for the first ~100
examples (small random initial weights) and only grow later, so a student cloned on short windows
from the initial state never sees the large-weight phase of learning.  Each cloning step therefore
lets the teacher learn alone for a random B ∈ [0, length − W] examples of the episode, starts the
student from the teacher's weights in its cell element 0 (the same encoding as the random initial
state, vsml.md §1.6) and clones on the next W examples.  After cloning,
θ is frozen and ``VSMLNetwork.unroll`` runs it as a learner with its own errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vsml.estimators.base import EpisodeBatchEstimator, Problem, clip_grad, grad_norm, register
from vsml.estimators.cloning import CloneConfig, CloneEstimator, prepare_clone_batch
from vsml.engine.config import ConfigError, VSMLConfig
from vsml.engine.cell import _linear, forward_phi, lstm_micro_steps
from vsml.engine.state import EpisodeOutput
from vsml.engine.network import VSMLNetwork

__all__ = ["DeepCloneEstimator", "TeacherLearner", "analytic_teacher", "check_deep_cloneable",
           "make_clone_estimator", "mlp_sgd_step", "teacher_alphas"]


def check_deep_cloneable(cfg: VSMLConfig) -> None:
    if cfg.conv or not cfg.backward_pass or not cfg.bwd_reset or cfg.cell.layer_norm or cfg.feed_label:
        raise ConfigError(
            "deep learning-algorithm cloning needs dense layers only, the backward-pass schedule with "
            "bwd_reset, no LayerNorm (it removes the magnitude that carries w·x) and no label feeding; got "
            f"conv={tuple(map(str, cfg.conv))}, backward_pass={cfg.backward_pass}, bwd_reset={cfg.bwd_reset}, "
            f"layer_norm={cfg.cell.layer_norm}, feed_label={cfg.feed_label} "
            "(e.g. --vsml.backward_pass true --vsml.bwd_reset true --vsml.layerwise true)")


def teacher_alphas(cfg: VSMLConfig, clone: CloneConfig) -> list[float]:
    """α_k per layer: ``clone.hidden_alpha`` (``clone.alpha`` when 0) below the last layer, ``clone.alpha``
    for the last one."""
    return [clone.hidden_alpha or clone.alpha] * (cfg.num_layers - 1) + [clone.alpha]


@dataclass
class TeacherStep:
    """One example of the teacher: per layer k, tensors with the episode axis first."""

    fwd_target: list[torch.Tensor]    # [E, A_k, B_k]  γ_k w_k · a_k (before the update; γ_{K-1} = 1)
    post_target: list[torch.Tensor]   # [E, A_k, B_k]  γ_k w_k' · a_k (after the update)
    bwd_target: list[torch.Tensor | None]   # [E, A_k, B_k] g_k (None for k = 0)
    new_w: list[torch.Tensor]         # [E, A_k, B_k]
    logits: torch.Tensor              # [E, C]
    error: torch.Tensor               # [E, C]


def mlp_sgd_step(ws: list[torch.Tensor], x_t: torch.Tensor, y_t: torch.Tensor, num_classes: int,
                 alphas: list[float], gain: bool | float = True, logit_scale: float = 1.0) -> TeacherStep:
    """One online-backprop step of the teacher in the module docstring (predict, then update).

    ws: per layer [E, A_k, B_k]; x_t [E, D]; y_t [E].  ``gain``: True: hidden units a_{k+1} = tanh(√A_k z_k)
    (the mean over a_k inputs rescaled to the usual 1/√fan-in scale, so hidden units are not stuck in
    their linear range at ~0.01 of unit scale); False: tanh(z_k); a number γ: tanh(γ z_k) (``analytic:backprop``).
    ``logit_scale``: κ of the student's read-out (VSMLConfig.logit_scale); the teacher's logits are κ·z_{K-1}.
    """
    acts, gains = [x_t], []
    z = x_t
    for k, w in enumerate(ws):
        z = (w * acts[k][:, :, None]).mean(1)                              # [E, B_k]
        if k < len(ws) - 1:
            gains.append(float(gain) if not isinstance(gain, bool) else math.sqrt(w.shape[1]) if gain else 1.0)
            acts.append(torch.tanh(gains[k] * z))
    z = z * logit_scale                                                   # the logits [E, C]
    err = torch.softmax(z, -1) - F.one_hot(y_t, num_classes).to(z.dtype)  # [E, C]
    scale = gains + [1.0]                                                 # hidden messages carry γ_k z_k
    fwd_t = [s * w * a[:, :, None] for s, w, a in zip(scale, ws, acts)]
    post_t, bwd_t, new_w = [None] * len(ws), [None] * len(ws), [None] * len(ws)
    delta = err
    for k in range(len(ws) - 1, -1, -1):
        new_w[k] = ws[k] - alphas[k] * acts[k][:, :, None] * delta[:, None, :]   # [E, A_k, B_k]
        post_t[k] = scale[k] * new_w[k] * acts[k][:, :, None]
        if k > 0:
            dact = gains[k - 1] * (1.0 - acts[k].square())                # d a_k / d z_{k-1} [E, A_k]
            bwd_t[k] = dact[:, :, None] * ws[k] * delta[:, None, :]       # [E, A_k, B_k]
            delta = bwd_t[k].mean(2)                                      # [E, A_k] = δ_{k-1}
    return TeacherStep(fwd_t, post_t, bwd_t, new_w, z, err)


def _rel_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square().mean() / (target.square().mean() + 1e-6)


class DeepCloneEstimator:
    """Gradient of the deep cloning loss (module docstring), behind the ``estimate`` interface of ES and
    BPTT (the episode preparation, length cut and random-input episodes, is the shallow estimator's
    :func:`vsml.estimators.cloning.prepare_clone_batch`).  Not sharded (no ``partial``): under several
    processes every rank computes the same full gradient (deterministic)."""

    distributed = "replicate"

    def __init__(self, net: VSMLNetwork, cfg: CloneConfig, seed: int = 0):
        check_deep_cloneable(net.cfg)
        self.net, self.cfg, self.seed = net, cfg, seed
        self.alphas = teacher_alphas(net.cfg, cfg)

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             generator: torch.Generator | None, episodes: slice | None = None, teacher_forcing: bool = True,
             return_logits: bool = False, state=None, burn_in: int = 0):
        """Mean over ticks and targets of the relative squared errors.  ``episodes`` is accepted for
        interface compatibility with the shallow estimator and must be None (no sharding here).
        ``teacher_forcing=False`` feeds the student its own errors (used by the tests to check that the
        student unroll here is exactly ``VSMLNetwork.unroll``).  ``state``: start from this VSMLState
        instead of a fresh draw with ``generator``.  ``burn_in`` = B: the teacher first learns alone on
        x[:, :B] (from the fresh state's weights); the student then starts with its cell element 0 set to
        the teacher's weights (h = 0, the other cell dims as drawn) and both run on x[:, B:]."""
        if episodes is not None:
            raise ValueError("DeepCloneEstimator does not shard episodes")
        net, cfg = self.net, self.net.cfg
        e_num, t_len, d = x.shape
        st = state if state is not None else net.init_state(e_num, d, num_classes, generator, theta.dtype,
                                                            theta.device)
        ws = [c[..., 0].clone() for c in st.c]                            # teacher starts at the student's w
        params = net.layer_params(theta)
        h, c = list(st.h), list(st.c)
        if burn_in:
            with torch.no_grad():
                for t in range(burn_in):                                  # the teacher learns alone
                    ws = mlp_sgd_step(ws, x[:, t], y[:, t], num_classes, self.alphas,
                                      logit_scale=cfg.logit_scale).new_w
            c = [torch.cat([w[..., None], ck[..., 1:]], -1) for w, ck in zip(ws, c)]   # [E, A, B, N]
            x, y = x[:, burn_in:], y[:, burn_in:]
            t_len = x.shape[1]
        k_num = cfg.num_layers
        total, n_terms, logits_all = x.new_zeros(()), 0, []
        for t in range(t_len):
            with torch.no_grad():
                tt = mlp_sgd_step(ws, x[:, t], y[:, t], num_classes, self.alphas, logit_scale=cfg.logit_scale)
            fwd = net.embed_input(x[:, t])                                 # [E, D, M]
            fwd_ins = []
            for k in range(k_num):                                        # forward sweep, no error input
                p = params[k]
                fwd_ins.append(fwd)
                zero = x.new_zeros(e_num, h[k].shape[2], cfg.cell.msg)    # [E, B_k, M]
                h[k], c[k] = lstm_micro_steps(p, fwd, zero, h[k], c[k], cfg.micro_ticks)
                phi = forward_phi(p, h[k], fwd[..., 0])                   # [E, A_k, B_k, M]
                total = total + _rel_mse(phi[..., cfg.output_idx], tt.fwd_target[k])
                n_terms += 1
                fwd = phi.mean(1)                                         # [E, B_k, M]
            logits = net.logits_from(fwd)
            logits_all.append(logits)
            msg = net.error_message(tt.logits if teacher_forcing else logits, y[:, t])   # [E, C, M]
            for k in range(k_num - 1, -1, -1):                            # reverse sweep
                p = params[k]
                h[k], c[k] = lstm_micro_steps(p, fwd_ins[k], msg, h[k], c[k], cfg.micro_ticks)
                phi = forward_phi(p, h[k], fwd_ins[k][..., 0])
                total = total + _rel_mse(phi[..., cfg.output_idx], tt.post_target[k])
                n_terms += 1
                if k > 0:
                    psi = _linear(h[k], p.W_bwd, p.b_bwd)                 # [E, A_k, B_k, M]
                    total = total + _rel_mse(psi[..., cfg.error_idx], tt.bwd_target[k])
                    n_terms += 1
                    msg = psi.mean(2)                                     # [E, A_k, M]
            ws = tt.new_w
        loss = total / max(n_terms, 1)
        return (loss, torch.stack(logits_all, 1)) if return_logits else loss


    def estimate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int):
        """Gradient and metrics of one cloning step; with ``clone.window`` = W > 0 the teacher's burn-in B
        is drawn uniformly from 0..length−W (from the step's generator) and BPTT covers the W ticks after it."""
        x, y, gen = prepare_clone_batch(self.cfg, self.seed, x, y, step)   # as the shallow estimator
        burn = 0
        if self.cfg.window:
            burn = int(torch.randint(0, x.shape[1] - self.cfg.window + 1, (), generator=gen))
            x, y = x[:, :burn + self.cfg.window], y[:, :burn + self.cfg.window]
        th = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(th, x, y, num_classes, gen, burn_in=burn)
            (grad,) = torch.autograd.grad(loss, th)
        norm = grad_norm(grad)
        return clip_grad(grad, self.cfg.clip_grad_norm), {"clone_loss": loss.item(), "grad_norm": norm,
                                                          "burn_in": burn}


def make_clone_estimator(net: VSMLNetwork, cfg: CloneConfig, seed: int = 0):
    """The shallow estimator (vsml/estimators/cloning.py) for one forward-only dense layer, the deep one for the
    backward-pass schedule with ``bwd_reset``; a clear ConfigError otherwise."""
    if net.cfg.backward_pass and net.cfg.bwd_reset:
        return DeepCloneEstimator(net, cfg, seed)
    return CloneEstimator(net, cfg, seed)


# shallow cloning shards its episodes; deep cloning (DeepCloneEstimator.distributed) replicates them
@register("clone", distributed="shard", parts=lambda cfg: ("clone.episodes", cfg.clone.episodes))
def _build_clone(cfg: Any, problem: Problem) -> EpisodeBatchEstimator:
    """Learning-algorithm cloning (shallow or deep): clone.episodes episodes of clone.length per step."""
    est = make_clone_estimator(problem.learner, cfg.clone, seed=cfg.seed)
    if isinstance(est, CloneEstimator) and cfg.clone.long:     # long-horizon cloning carries its episodes
        from vsml.estimators.cloning import LongCloneEstimator
        return LongCloneEstimator(est, problem, cfg.clone.episodes, cfg.clone.length)
    return EpisodeBatchEstimator(est, problem, cfg.clone.episodes, cfg.clone.length, loss_metric="clone_loss")


class TeacherLearner:
    """The gradient-descent teacher as a learner (the ``Learner`` protocol of vsml/learners/base.py), for
    side-by-side meta-tests with its clone on the *same streams and the same initial weights*.

    ``unroll`` draws the VSML initial state with the generator exactly as ``VSMLNetwork.unroll`` does
    and starts the teacher's weights from its cell element 0, so with equal generators the clone and
    the teacher start from the same random network.  Shallow forward-only configs run the shallow
    teacher (``cloning.sgd_teacher``, errors one tick late as the student sees them); backward-pass
    configs run :func:`mlp_sgd_step`.
    """

    meta_trainable = False

    def __init__(self, cfg: VSMLConfig, alphas: list[float], gain: bool | float = True,
                 initial_weights: Callable[[Any], list[torch.Tensor]] | None = None):
        """``gain``: the hidden gain of :func:`mlp_sgd_step`; ``initial_weights``: state -> the weights per layer
        [E, A_k, B_k] (default: every layer's cell element 0; ``analytic.backprop_initial_weights`` for
        ``analytic:backprop``)."""
        if cfg.conv or len(alphas) != cfg.num_layers:
            raise ConfigError(f"TeacherLearner needs a dense config and one α per layer; got "
                              f"{cfg.num_layers} layers, alphas={alphas}")
        self.cfg, self.alphas, self.gain = cfg, list(alphas), gain
        self.initial_weights = initial_weights or (lambda st: [c[..., 0].clone() for c in st.c])
        self.net = VSMLNetwork(cfg)

    def init_theta(self, generator=None, dtype=torch.float32, device=None):
        return torch.zeros(0, dtype=dtype, device=device)

    def init_state(self, num_episodes, in_dim, num_classes, generator=None, dtype=torch.float32, device=None):
        return self.net.init_state(num_episodes, in_dim, num_classes, generator, dtype, device)

    def unroll(self, theta, x, y, num_classes=None, state=None, generator=None) -> EpisodeOutput:
        from vsml.estimators.cloning import sgd_teacher
        x = x.reshape(x.shape[0], x.shape[1], -1)                         # [E, T, D]
        e_num, t_len, d = x.shape
        if state is None:
            state = self.init_state(e_num, d, num_classes, generator, x.dtype, x.device)
        num_classes = state.num_classes
        ws = self.initial_weights(state)
        y = y.long()
        if not self.cfg.backward_pass:
            if self.cfg.num_layers != 1:
                raise ConfigError("the forward-only teacher is the shallow one (one dense layer)")
            _, _, logits = sgd_teacher(x, y, num_classes, ws[0], self.alphas[0],
                                       logit_scale=self.cfg.logit_scale)
        else:
            out = []
            for t in range(t_len):
                tt = mlp_sgd_step(ws, x[:, t], y[:, t], num_classes, self.alphas, gain=self.gain,
                                  logit_scale=self.cfg.logit_scale)
                out.append(tt.logits)
                ws = tt.new_w
            logits = torch.stack(out, 1)                                  # [E, T, C]
        loss = F.cross_entropy(logits.reshape(-1, num_classes), y.reshape(-1), reduction="none").reshape(e_num, t_len)
        return EpisodeOutput(logits, loss, logits.argmax(-1) == y, state)


# --------------------------------------------------------------------------------------------
# side-by-side meta-test: the clone and the teacher it cloned, on the same streams


def compare_with_teacher(checkpoint: str, tasks: str, episodes: int, length: int, seed: int = 22,
                         data_dir: str | None = None, alpha: float | None = None, out_dir: str | None = None,
                         baselines: str = "") -> dict:
    """Meta-test a cloned θ (run dir, checkpoint, θ file or ``pretrained:NAME``) next to its teacher.

    Both see the same test-split episodes (``vsml.evaluation.evaluate.evaluate``) and, per batch of episodes, the
    same generator, so the teacher's weights start from the clone's own random initial cell state.
    ``alpha``: the teacher's α (default: the run's ``clone.alpha``).  ``baselines``: e.g. "sgd,adam"
    (the standard linear baselines of vsml/learners/baselines.py, for reference).  Returns evaluate()'s dict.
    """
    from vsml.evaluation.load import load_learner

    from vsml.evaluation.evaluate import FrozenLearner, evaluate, parse_task_list, summary_table, write_results
    from vsml.training.config import config_from_dict
    name, learner, theta, cfg_dict = load_learner(checkpoint)
    cfg = config_from_dict(cfg_dict)
    alphas = teacher_alphas(cfg.vsml, cfg.clone) if alpha is None else [alpha] * cfg.vsml.num_layers
    # a hand-built analytic:NAME θ is compared with the learner it implements
    teacher = (analytic_teacher(checkpoint, cfg.vsml) if checkpoint.startswith("analytic:")
               else TeacherLearner(cfg.vsml, alphas))
    a = "/".join(f"{v:g}" for v in teacher.alphas)
    learners = [FrozenLearner("vsml-clone", learner, theta),
                FrozenLearner(f"teacher (online {'SGD' if cfg.vsml.num_layers == 1 else 'backprop'}, α={a})",
                              teacher, torch.zeros(0))]
    if baselines:
        from vsml.learners import registry
        for b in [s.strip() for s in baselines.split(",") if s.strip()]:
            bl = registry.build(b)
            learners.append(FrozenLearner(b, bl, bl.init_theta()))
    res = evaluate(learners, parse_task_list(tasks), episodes, length, seed, data_dir)
    print(summary_table(res))
    if out_dir:
        paths = write_results(res, out_dir)
        print(f"results: {paths['json']}")
    return res


def analytic_teacher(spec: str, cfg: VSMLConfig) -> TeacherLearner:
    """The online learner a hand-built ``analytic:NAME[...]`` θ implements (vsml/engine/analytic.py), as a
    :class:`TeacherLearner` on the same initial state: ``analytic:backprop`` the MLP of ``backprop_theta``
    (w_0 = tanh(c_0), w_1 = 0, gain γ), ``analytic:sgd`` (without a schedule) online SGD on w = 0."""
    from vsml.engine.analytic import backprop_initial_weights, resolved_options
    name, kw = resolved_options(spec)                   # the builder's defaults where the spec is silent
    if name == "backprop":
        return TeacherLearner(cfg, [kw["hidden_alpha"], kw["alpha"]], gain=kw["gain"],
                              initial_weights=backprop_initial_weights)
    if kw["boost"] != 1.0:
        raise ConfigError(f"{spec}: the step-size schedule (boost > 1) has no gradient-descent teacher to "
                          f"compare with")
    return TeacherLearner(cfg, [kw["alpha"]], initial_weights=lambda st: [torch.zeros_like(st.c[0][..., 0])])


@torch.no_grad()
def teacher_forced_drift(net: VSMLNetwork, theta: torch.Tensor, alphas: list[float], x: torch.Tensor,
                         y: torch.Tensor, num_classes: int, generator: torch.Generator,
                         free_running: bool = False,
                         teacher: TeacherLearner | None = None) -> dict[str, torch.Tensor]:
    """How far the clone's predictions drift from the teacher's when both see the *teacher's* errors.

    Both start from the same random network (the clone's initial state).  Returns per tick t, averaged
    over episodes: ``rel_err`` = ||ŷ_clone − ŷ_teacher|| / ||ŷ_teacher|| (logits centred over classes)
    and ``agree`` = fraction of episodes where both predict the same class; ``teacher_acc`` the teacher's
    accuracy; with ``free_running`` also ``student_acc`` (the clone with its own errors, as at meta-test)
    and ``free_agree`` (its agreement with the teacher).  The free-running clone (its own errors) can only do
    worse, so this separates imitation error from error feedback.  x [E, T, D], y [E, T].

    ``teacher``: compare with this learner instead of ``TeacherLearner(net.cfg, alphas)`` (a hand-built θ,
    :func:`analytic_teacher`).  Then there is no teacher forcing: ``rel_err`` and ``agree`` are those of the
    learner run on its own errors (``VSMLNetwork.unroll``, the meta-test path), which is what an exact
    learner must match.
    """
    cfg = net.cfg
    e_num, t_len, d = x.shape
    st = net.init_state(e_num, d, num_classes, generator, theta.dtype, theta.device)
    tout = (teacher or TeacherLearner(cfg, alphas)).unroll(torch.zeros(0), x, y, state=st)
    free = net.unroll(theta, x, y, state=st) if free_running or teacher is not None else None
    if teacher is not None:
        logits = free.logits
    elif cfg.backward_pass:
        est = DeepCloneEstimator(net, CloneConfig(steps=1, alpha=alphas[0]))
        est.alphas = list(alphas)
        _, logits = est.loss(theta, x, y, num_classes, generator=None, state=st, return_logits=True)
    else:
        from vsml.engine.cell import readout_fwd
        p = net.layer_params(theta)[0]
        h, c = st.h[0], st.c[0]
        err = torch.softmax(tout.logits, -1) - F.one_hot(y, num_classes).to(x.dtype)   # teacher's e_t
        out = []
        for t in range(t_len):
            bwd = x.new_zeros(e_num, num_classes, cfg.cell.msg)
            if t > 0:
                bwd[..., cfg.error_idx] = err[:, t - 1]
            h, c = lstm_micro_steps(p, net.embed_input(x[:, t]), bwd, h, c, cfg.micro_ticks)
            out.append(net.logits_from(readout_fwd(p, h, cfg.cell.ln_eps, x[:, t])))
        logits = torch.stack(out, 1)                                      # [E, T, C]
    # logits centred over classes first: a shift common to all classes changes neither softmax nor argmax
    lc, tc = logits - logits.mean(-1, keepdim=True), tout.logits - tout.logits.mean(-1, keepdim=True)
    rel = (lc - tc).norm(dim=-1) / tc.norm(dim=-1).clamp(min=1e-8)
    agree = (logits.argmax(-1) == tout.logits.argmax(-1)).to(x.dtype)
    out = {"rel_err": rel.mean(0), "agree": agree.mean(0), "teacher_acc": tout.correct.to(x.dtype).mean(0)}
    if free is not None:
        # the clone as at meta-test (its own errors), from the same initial state: the accuracy gap
        out["student_acc"] = free.correct.to(x.dtype).mean(0)
        out["free_agree"] = (free.logits.argmax(-1) == tout.logits.argmax(-1)).to(x.dtype).mean(0)
    return out


def drift_report(checkpoint: str, task: str, episodes: int, length: int, seed: int = 22,
                 data_dir: str | None = None, alpha: float | None = None, free_running: bool = True,
                 split: str = "test", out_json: str | None = None) -> dict[str, list[float]]:
    """:func:`teacher_forced_drift` of a cloned θ on ``split`` episodes of ``task``, averaged over the
    tick windows [0, 10), [10, 30), [30, 100), [100, 300), [300, 1000), [1000, 2000), [2000, 5000),
    [5000, 10000) that fit ``length``; with ``free_running`` also the accuracy of the clone run on its own
    errors and of the teacher in each window (the accuracy gap to the teacher).  A hand-built
    ``analytic:NAME`` θ is compared with the learner it implements (:func:`analytic_teacher`), on its own
    errors."""
    from vsml.evaluation.load import load_learner

    from tasks import make_family

    from vsml.training.config import config_from_dict
    _, net, theta, cfg_dict = load_learner(checkpoint, compile=checkpoint.startswith("analytic:"))
    cfg = config_from_dict(cfg_dict)
    alphas = teacher_alphas(cfg.vsml, cfg.clone) if alpha is None else [alpha] * cfg.vsml.num_layers
    teacher = analytic_teacher(checkpoint, cfg.vsml) if checkpoint.startswith("analytic:") else None
    b = make_family(task, data_dir=data_dir).sample(episodes, length, seed=seed, split=split)
    r = teacher_forced_drift(net, theta, alphas, b.x, b.y, b.num_classes,
                             torch.Generator().manual_seed(seed), teacher=teacher,
                             free_running=free_running and (teacher is not None or not cfg.vsml.backward_pass))
    edges = [e for e in (0, 10, 30, 100, 300, 1000, 2000, 5000, 10000) if e < length] + [length]
    keys = [k for k in ("rel_err", "agree", "teacher_acc", "student_acc", "free_agree") if k in r]
    out = {"window": [], **{k: [] for k in keys}}
    for lo, hi in zip(edges[:-1], edges[1:]):
        out["window"].append(f"[{lo}, {hi})")
        for k in keys:
            out[k].append(float(r[k][lo:hi].mean()))
    kind = "drift (on its own errors)" if teacher is not None else "teacher-forced drift"
    print(f"{kind} of {checkpoint} on {task} ({episodes} episodes, {split} split):")
    for i, w in enumerate(out["window"]):
        line = (f"  ticks {w:<14} |ŷ_clone − ŷ_teacher| / |ŷ_teacher| = {out['rel_err'][i]:.3g}   same prediction "
                f"{out['agree'][i]:.3f}")
        if "student_acc" in out:
            line += (f"   free-running: same prediction {out['free_agree'][i]:.3f}, acc clone "
                     f"{out['student_acc'][i]:.3f} vs teacher {out['teacher_acc'][i]:.3f} "
                     f"(gap {out['teacher_acc'][i] - out['student_acc'][i]:+.3f})")
        print(line)
    if out_json:
        import json
        from pathlib import Path
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps({"checkpoint": checkpoint, "task": task, "episodes": episodes,
                                              "length": length, "seed": seed, "split": split, **out}, indent=1))
    return out


@dataclass(frozen=True)
class CompareArgs:
    """Meta-test a cloned VSML learner next to the gradient-descent teacher it cloned, on the same streams
    and initial weights."""

    checkpoint: str                   # run directory, .pt, θ .safetensors or pretrained:NAME
    tasks: str = "mnist+resize14;fashion_mnist+resize14"
    episodes: int = 16
    length: int = 2000
    seed: int = 22
    alpha: float | None = None        # teacher α (default: the run's clone.alpha)
    baselines: str = ""               # e.g. "sgd,adam"
    data_dir: str | None = None
    out_dir: str | None = None        # write results.json and curve PNGs here
    drift: bool = False               # instead: the teacher-forced drift of the clone from its teacher on the first task
    split: str = "test"               # --drift: data split (train for recipe selection)
    json: str | None = None           # --drift: also write the windows to this JSON file


def main(argv: list[str] | None = None) -> int:
    """The CLI; bad input (an unknown checkpoint or analytic spec, a task that cannot load) is one line on stderr
    and exit code 2."""
    import sys

    from tasks import DatasetError
    from vsml.training.checkpoint import CheckpointError
    from vsml.training.cli import parse
    args = parse(CompareArgs, argv, prog="python -m vsml.estimators.cloning_deep")
    try:
        if args.drift:
            from vsml.evaluation.evaluate import parse_task_list
            drift_report(args.checkpoint, parse_task_list(args.tasks)[0], args.episodes, args.length, args.seed,
                         args.data_dir, args.alpha, split=args.split, out_json=args.json)
        else:
            compare_with_teacher(args.checkpoint, args.tasks, args.episodes, args.length, args.seed, args.data_dir,
                                 args.alpha, args.out_dir, args.baselines)
    except (CheckpointError, DatasetError, ValueError) as exc:    # ValueError covers ConfigError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
