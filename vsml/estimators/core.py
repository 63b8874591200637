"""The batch-level estimators ES and BPTT, and the meta-optimiser.

Each maps (θ, a batch of data episodes, step) to (ĝ ≈ ∇_θ L(θ), metrics) with L the mean online
cross-entropy (vsml.md §2.1) (:class:`vsml.estimators.base.BatchEstimator`); registered as
``es`` and ``bptt`` (:mod:`vsml.estimators.registry`), the training loop runs them through the
:class:`vsml.estimators.base.MetaGradientEstimator` protocol.

* :class:`ESEstimator` — antithetic ES (vsml.md §2.2) over a population evaluated in one batched
  ``learner.unroll`` with per-episode θ.
* :class:`BPTTEstimator` — (truncated, checkpointed) backprop (vsml.md §2.3), clipped.
* :class:`CarriedBPTTEstimator` (``tbptt``) — online truncated BPTT over long episodes: one window per
  meta-step, the learner's state carried from step to step (issue 15).
* :func:`make_optimizer` — Adam(W) on θ.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from tasks.base import derive_seed
from vsml.estimators.base import (EpisodeBatchEstimator, Problem, ShardableEstimator, clip_grad, grad_norm,
                                  register)
from vsml.estimators.bptt import BPTTConfig, bptt_gradient, unroll_chunked
from vsml.estimators.es import ESConfig, es_ask, es_tell, pair_seed
from vsml.learners.base import (is_meta_trainable, state_cat, state_detach, state_from_leaves, state_generator,
                                state_index, state_repeat_interleave, tree_flatten)

__all__ = ["BPTTEstimator", "CarriedBPTTEstimator", "ESEstimator", "make_optimizer", "per_episode_init_state", "state_seed"]


def state_seed(seed: int, step: int, index: int) -> int:
    """Seed of pair ``index``'s initial inner state at meta-step ``step`` (per-pair streams)."""
    return pair_seed(pair_seed(seed, step, -1), index, -1)


def per_episode_init_state(learner: Any, seeds: list[int], in_dim: int, num_classes: int,
                           dtype: torch.dtype, device: torch.device) -> Any:
    """``len(seeds)`` initial states, state i drawn from its own generator on ``device`` seeded ``seeds[i]``.

    The VSML network takes the generators at once (one batched draw); other learners are drawn one
    episode at a time and concatenated."""
    from vsml.engine.params import episode_generators
    from vsml.learners.base import state_cat
    if getattr(learner, "device_generators", False):               # the VSML network: one batched draw
        return learner.init_state(len(seeds), in_dim, num_classes, episode_generators(seeds, device), dtype,
                                  device)
    return state_cat([learner.init_state(1, in_dim, num_classes, state_generator(learner, s, device), dtype, device)
                      for s in seeds])


def _check_meta_trainable(learner: Any, who: str) -> None:
    if not is_meta_trainable(learner):
        raise ValueError(f"{who}: learner {type(learner).__name__} is not meta-trainable "
                         f"(meta_trainable=False, empty θ); evaluate it without an estimator")


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dim() < 3:
        raise ValueError(f"x must have shape [E, T, D] (or [E, T, H, W, ...]); got {list(x.shape)}")
    x = x.reshape(x.shape[0], x.shape[1], -1)                               # [E, T, D]
    if tuple(y.shape) != tuple(x.shape[:2]):
        raise ValueError(f"y has shape {list(y.shape)} but x has [E, T] = {list(x.shape[:2])}")
    return x


class ESEstimator(ShardableEstimator):
    """Antithetic ES on the online meta-loss (vsml.md §2.2).

    ``estimate(theta, x, y, C, step)`` with x [P, T, ...], y [P, T]: one data episode per pair.
    It builds the 2P perturbed θ ± σε_i (noise regenerated from (cfg.seed, step, i)) as ONE
    per-episode θ tensor [2P, *θ], repeats every data episode twice (x.repeat_interleave(2, 0))
    and draws P initial states from a generator seeded by (cfg.seed, step), each repeated for
    both members of its pair (common random numbers: both members share data and initial state).
    The whole population runs in one ``learner.unroll`` under ``torch.no_grad`` (or in chunks of
    ``max_batch`` members, an even number, to bound memory).  Member loss = mean over t of the
    online CE.  Metrics: those of :func:`vsml.estimators.es.es_tell` plus ``accuracy`` (mean online accuracy
    over the population).

    Sharding (:class:`vsml.estimators.base.ShardableEstimator`): the parts are the P pairs;
    ``partial`` returns the (loss, accuracy) rows of a slice of pairs' members, ``reduce`` is
    :func:`vsml.estimators.es.es_tell` on all 2P rows.
    """

    combine = "gather"
    rows_per_part = 2                 # the + and − member of each pair
    takes_own_share = True            # one episode per pair: a rank may hold only its pairs' episodes

    def __init__(self, learner: Any, cfg: ESConfig, max_batch: int | None = None):
        _check_meta_trainable(learner, "ESEstimator")
        if max_batch is not None and (max_batch < 2 or max_batch % 2):
            raise ValueError(f"max_batch must be an even integer >= 2 (whole antithetic pairs) or None, "
                             f"got {max_batch}")
        self.learner = learner
        self.cfg = cfg
        self.max_batch = max_batch

    def initial_state(self, num_pairs: int, in_dim: int, num_classes: int, step: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                      pairs: range | None = None) -> Any:
        """The per-pair initial states of meta-step ``step`` (before repeat_interleave(2)).

        On the CPU (``pairs`` None): all P drawn from one ``Generator().manual_seed(pair_seed(cfg.seed,
        step, -1))`` (reproducible on any machine; the numbers of every earlier version).  On any other
        device, or for a subset ``pairs`` of the P pairs (one rank's share): per-pair streams, pair i from
        its own generator on ``device`` seeded by :func:`state_seed` (cfg.seed, step, i), so a rank draws
        only its own pairs, on the GPU, and the draw does not depend on how the pairs are split.
        """
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if pairs is None and dev.type == "cpu":
            gen = torch.Generator().manual_seed(pair_seed(self.cfg.seed, step, -1))
            return self.learner.init_state(num_pairs, in_dim, num_classes, gen, dtype, device)
        idx = range(num_pairs) if pairs is None else pairs
        return per_episode_init_state(self.learner, [state_seed(self.cfg.seed, step, i) for i in idx], in_dim,
                                      num_classes, dtype, dev)

    def member_losses(self, population: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                      step: int, pairs: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean online CE and accuracy of every member of the pairs ``pairs`` (default: all P).

        population [2p, *θ] (the members of those pairs, interleaved ±), x [p, T, D] their episodes
        -> ([2p], [2p]).  Initial states: all pairs: :meth:`initial_state`; a slice of the P pairs (one
        rank's share): on the CPU the global draw, sliced (the numbers of the one-process run), on
        another device those pairs' own streams (what the one-process run draws there too).
        """
        p = x.shape[0]
        if pairs is None or len(pairs) == self.cfg.pairs:
            state = self.initial_state(p, x.shape[2], num_classes, step, population.dtype, population.device)
        elif population.device.type == "cpu":
            state = self.initial_state(self.cfg.pairs, x.shape[2], num_classes, step, population.dtype,
                                       population.device)
            state = state_index(state, slice(pairs.start, pairs.stop))       # [p, ...]
        else:
            state = self.initial_state(self.cfg.pairs, x.shape[2], num_classes, step, population.dtype,
                                       population.device, pairs=pairs)     # [p, ...]
        state = state_repeat_interleave(state, 2)                          # [2p, ...]
        x2 = x.repeat_interleave(2, 0)                                      # [2p, T, D]
        y2 = y.repeat_interleave(2, 0)                                      # [2p, T]
        n = 2 * p
        mb = n if self.max_batch is None else self.max_batch
        losses, accs = [], []
        with torch.no_grad():
            for m0 in range(0, n, mb):
                m1 = min(n, m0 + mb)
                st = state if (m0 == 0 and m1 == n) else state_index(state, slice(m0, m1))
                out = self.learner.unroll(population[m0:m1], x2[m0:m1], y2[m0:m1], num_classes, state=st)
                losses.append(out.loss.mean(1))                             # [m]
                accs.append(out.correct.to(population.dtype).mean(1))
        return torch.cat(losses), torch.cat(accs)

    def num_parts(self, x: torch.Tensor) -> int:
        return self.cfg.pairs

    def partial(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int,
                part: range) -> torch.Tensor:
        """(loss, accuracy) rows [2p, 2] of the members of the pairs in ``part``; x [P, T, ...] holds one
        episode per pair (the global batch) or only those of ``part`` (a GPU rank's own share)."""
        x = _check_batch(x, y)
        if x.shape[0] not in (self.cfg.pairs, len(part)):
            raise ValueError(f"ESEstimator needs one data episode per antithetic pair (or this rank's share): x "
                             f"has {x.shape[0]} episodes but ESConfig.pairs = {self.cfg.pairs} and the pairs "
                             f"evaluated here are {part.start}..{part.stop - 1}")
        if x.shape[0] != len(part):                                          # the global batch: keep the slice
            x, y = x[part.start:part.stop], y[part.start:part.stop]          # [p, T, D], [p, T]
        pop = es_ask(theta.detach(), self.cfg, step, pair_indices=part)     # [2p, *θ]
        losses, accs = self.member_losses(pop, x, y, num_classes, step, pairs=part)
        return torch.stack([losses, accs], 1)                               # [2p, (loss, acc)]

    def reduce(self, theta: torch.Tensor, total: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        grad, metrics = es_tell(theta.detach(), total[:, 0], self.cfg, step)
        metrics["accuracy"] = float(total[:, 1].mean())
        return grad, metrics


class BPTTEstimator(ShardableEstimator):
    """Backprop through the online episode (vsml.md §2.3), see :func:`vsml.estimators.bptt.bptt_gradient`.

    ``estimate(theta, x, y, C, step)`` with x [E, T, ...] a meta-batch evaluated with shared θ;
    initial states drawn from ``Generator().manual_seed(pair_seed(seed, step, -1))``.  The
    returned gradient is clipped to ``cfg.clip_grad_norm``; ``metrics["grad_norm"]`` is the
    unclipped norm.

    Sharding: the parts are the E episodes; ``partial`` is the unclipped gradient of a slice's
    loss scaled by E_r/E (with its metrics, packed [|θ| + 4] in float64), so the sum over a
    partition is the mean meta-gradient and ``reduce`` clips the *global* norm.
    """

    def __init__(self, learner: Any, cfg: BPTTConfig, seed: int = 0):
        _check_meta_trainable(learner, "BPTTEstimator")
        self.learner = learner
        self.cfg = cfg
        self.seed = int(seed)

    def num_parts(self, x: torch.Tensor) -> int:
        return x.shape[0]

    def partial(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int, step: int,
                part: range) -> torch.Tensor:
        x = _check_batch(x, y)                                              # [E, T, D]
        e = x.shape[0]
        # on the run's device for the VSML network (a CPU generator on the CPU: the earlier numbers)
        gen = state_generator(self.learner, pair_seed(self.seed, step, -1), theta.device)
        state = self.learner.init_state(e, x.shape[2], num_classes, gen, theta.dtype, theta.device)
        if len(part) != e:
            state = state_index(state, slice(part.start, part.stop))        # [E_r, ...]
        g, m = bptt_gradient(self.learner, theta.detach(), x[part.start:part.stop], y[part.start:part.stop],
                             num_classes, replace(self.cfg, clip_grad_norm=0.0), state=state)
        w = len(part) / e                                                   # E_r / E
        stats = [m["loss"] * w, m["accuracy"] * w, m["nonfinite"], m["truncations"] * w]
        return torch.cat([g.reshape(-1).double() * w,
                          torch.tensor(stats, dtype=torch.float64, device=g.device)])   # [|θ| + 4]

    def reduce(self, theta: torch.Tensor, total: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        grad = total[:-4].to(theta.dtype).reshape(theta.shape)
        loss, acc, nonfinite, truncations = (float(v) for v in total[-4:])
        norm = grad_norm(grad)
        if nonfinite > 0 or not math.isfinite(norm):
            grad, norm, nonfinite = torch.zeros_like(grad), float("nan"), 1.0
        clipped = self.cfg.clip_grad_norm > 0 and norm > self.cfg.clip_grad_norm
        return clip_grad(grad, self.cfg.clip_grad_norm), {
            "loss": loss, "accuracy": acc, "grad_norm": norm, "clipped": float(clipped),
            "nonfinite": float(nonfinite > 0), "truncations": float(round(truncations))}


@register("es", distributed="shard", parts=lambda cfg: ("es.pairs", cfg.es.pairs))
def _build_es(cfg: Any, problem: Problem) -> EpisodeBatchEstimator:
    """Antithetic ES: es.pairs episodes of episode_length per meta-step; noise seed derived from the run seed."""
    es_cfg = replace(cfg.es, seed=derive_seed(cfg.seed, "es-noise", cfg.es.seed))
    est = ESEstimator(problem.learner, es_cfg, max_batch=cfg.dist.member_batch or None)
    return EpisodeBatchEstimator(est, problem, cfg.es.pairs, cfg.episode_length, loss_metric="loss_mean")


@register("bptt", distributed="shard", parts=lambda cfg: ("meta_batch", cfg.meta_batch))
def _build_bptt(cfg: Any, problem: Problem) -> EpisodeBatchEstimator:
    """(Truncated) BPTT: meta_batch episodes of episode_length per meta-step."""
    est = BPTTEstimator(problem.learner, cfg.bptt, seed=cfg.seed)
    return EpisodeBatchEstimator(est, problem, cfg.meta_batch, cfg.episode_length, loss_metric="loss")


class CarriedBPTTEstimator:
    """Online truncated BPTT over long episodes (``--estimator tbptt``).

    ``meta_batch`` episodes of ``episode_length`` T are drawn and unrolled ``bptt.truncation`` = K ticks
    per meta-step; the learner's state at the end of a window is carried (detached) into the next
    meta-step, so θ is updated every K ticks instead of once per episode (``bptt``: the gradients of all
    ceil(T / K) windows are summed into one update).  Meta-step s minimises the windows' mean online CE

        L_s(θ) = 1/(E·K) Σ_e Σ_{t ∈ [t_{s,e}, t_{s,e} + K)} CE(ŷ_{e,t}, y_{e,t})   (vsml.md §2.1 on windows)

    with ∇_θ through the windows only (the carried state is a constant), clipped to ``bptt.clip_grad_norm``.

    Streams (``bptt.streams`` = G): the E episodes are G streams of E/G.  With G = 1 every episode sits at
    the same window, so successive steps optimise "early" and then "late" windows in turn.  With G > 1,
    stream g's first episodes are burned in (forward only, no gradient) to window ⌊g·W/G⌋ (W = ceil(T/K)),
    so each meta-step mixes G window positions (learned_optimization's random initial iteration offset,
    made deterministic); a stream draws new episodes when its own are used up.  Streams whose windows have
    the same shapes (classes, window length, state) run in one batched unroll (the gradient is the same sum).

    Data: with G = 1 the episodes started at meta-step s are :meth:`Problem.batch` of s (as before streams
    existed); stream g of G > 1 draws ``derive_seed(seed, "meta-train-data", s, "stream", g)``.  Initial
    states: ``pair_seed(seed, s, -1 - g)``.  The carried episodes, positions and states go into every
    checkpoint (:meth:`state_dict`), so a resumed run continues bit for bit.  One process (no sharding).
    """

    loss_metric = "loss"

    def __init__(self, learner: Any, cfg: BPTTConfig, problem: Problem, episodes: int, length: int, seed: int = 0):
        _check_meta_trainable(learner, "CarriedBPTTEstimator")
        if not 0 < cfg.truncation < length:
            raise ValueError(f"estimator tbptt needs 0 < bptt.truncation < episode_length (one window per "
                             f"meta-step), got truncation={cfg.truncation}, episode_length={length}; use "
                             "--estimator bptt for whole episodes")
        if episodes % cfg.streams:
            raise ValueError(f"estimator tbptt splits meta_batch={episodes} episodes into bptt.streams="
                             f"{cfg.streams} streams: it must divide meta_batch")
        self.learner, self.cfg, self.problem = learner, cfg, problem
        self.episodes, self.length, self.seed = episodes, length, int(seed)
        self.streams = int(cfg.streams)
        windows = -(-length // cfg.truncation)
        # the window stream g's first episodes start at (burned in): 0 for stream 0
        self.offsets = [(g * windows // self.streams) * cfg.truncation for g in range(self.streams)]

    def init(self, theta: torch.Tensor) -> None:
        return None

    def _start(self, theta: torch.Tensor, step: int, g: int, burn_in: int = 0) -> dict:
        n = self.episodes // self.streams
        if self.streams == 1:
            b = self.problem.batch(n, self.length, step)
        else:
            b = self.problem.sample(n, self.length, derive_seed(self.problem.seed, "meta-train-data", step, "stream", g))
        x = _check_batch(b.x, b.y)                                          # [E/G, T, D]
        gen = state_generator(self.learner, pair_seed(self.seed, step, -1 - g), theta.device)
        st = self.learner.init_state(x.shape[0], x.shape[2], b.num_classes, gen, theta.dtype, theta.device)
        if burn_in:                    # forward only to the stream's first window, in windows of K ticks
            with torch.no_grad():
                for t0 in range(0, burn_in, self.cfg.truncation):
                    t1 = min(burn_in, t0 + self.cfg.truncation)
                    st = self.learner.unroll(theta, x[:, t0:t1], b.y[:, t0:t1], int(b.num_classes), state=st).state
        return {"x": x, "y": b.y, "num_classes": int(b.num_classes), "pos": burn_in, "state": st}

    def _windows(self, th: torch.Tensor, group: list[dict]) -> tuple[torch.Tensor, list[tuple[float, float, int, Any]]]:
        """The next window of streams whose windows and states have the same shapes, in one unroll:
        (∇_θ of their summed CE, per stream (summed CE, number correct, ticks, new state))."""
        t0s = [s["pos"] for s in group]
        k = min(group[0]["x"].shape[1] - t0s[0], self.cfg.truncation)
        x = torch.cat([s["x"][:, t0:t0 + k] for s, t0 in zip(group, t0s)])        # [ΣE_g, k, D]
        y = torch.cat([s["y"][:, t0:t0 + k] for s, t0 in zip(group, t0s)])        # [ΣE_g, k]
        st = state_detach(state_cat([s["state"] for s in group]))
        with torch.enable_grad():
            loss_ep, correct_ep, new = unroll_chunked(self.learner, th, x, y, group[0]["num_classes"], st,
                                                      self.cfg.checkpoint_chunk, per_episode=True)   # [ΣE_g] each
            (grad,) = torch.autograd.grad(loss_ep.sum(), th, allow_unused=True)
        grad = torch.zeros_like(th) if grad is None else grad.detach()
        out, e0 = [], 0
        for s in group:
            e1 = e0 + s["x"].shape[0]
            out.append((float(loss_ep[e0:e1].detach().sum()), float(correct_ep[e0:e1].sum()), (e1 - e0) * k,
                        state_detach(state_index(new, slice(e0, e1)))))
            e0 = e1
        return grad, out

    def _group_key(self, s: dict) -> tuple:
        """Streams with equal keys share one unroll: same classes, window length and state shapes."""
        leaves, _ = tree_flatten(s["state"])
        return (s["num_classes"], min(s["x"].shape[1] - s["pos"], self.cfg.truncation), tuple(s["x"].shape[2:]),
                tuple(tuple(t.shape[1:]) for t in leaves))

    def step(self, theta: torch.Tensor, state: list[dict] | None, step: int) -> tuple[torch.Tensor, dict, list[dict]]:
        if state is None:
            state = [self._start(theta, step, g, burn_in=off) for g, off in enumerate(self.offsets)]
        state = [self._start(theta, step, g) if s["pos"] >= s["x"].shape[1] else s for g, s in enumerate(state)]
        groups: dict[tuple, list[int]] = {}
        for g, s in enumerate(state):
            groups.setdefault(self._group_key(s), []).append(g)
        th = theta.detach().clone().requires_grad_(True)
        grad, per_stream = torch.zeros_like(th), [None] * len(state)
        for idx in groups.values():
            gg, outs = self._windows(th, [state[g] for g in idx])
            grad = grad + gg
            for g, o in zip(idx, outs):
                per_stream[g] = o
        denom = sum(o[2] for o in per_stream)
        loss, n_correct = sum(o[0] for o in per_stream) / denom, sum(o[1] for o in per_stream) / denom
        grad = grad / denom
        metrics = {}
        for g, (s, o) in enumerate(zip(state, per_stream)):
            if self.streams == 1:
                metrics["window_start"] = float(s["pos"])
            else:                      # each stream's window and loss: the meta-loss along the episode
                metrics[f"window_start_s{g}"], metrics[f"loss_s{g}"] = float(s["pos"]), o[0] / o[2]
        new_state = [dict(s, pos=min(s["x"].shape[1], s["pos"] + self.cfg.truncation), state=o[3])
                     for s, o in zip(state, per_stream)]
        norm = grad_norm(grad)
        nonfinite = not (math.isfinite(loss) and math.isfinite(norm))
        if nonfinite:                  # a zero step; the carried states are dropped and new episodes start
            grad, norm = torch.zeros_like(grad), float("nan")
            new_state = [dict(s, pos=s["x"].shape[1]) for s in new_state]
        clipped = not nonfinite and self.cfg.clip_grad_norm > 0 and norm > self.cfg.clip_grad_norm
        if clipped:
            grad = clip_grad(grad, self.cfg.clip_grad_norm)
        return grad, {"loss": loss, "accuracy": n_correct, "grad_norm": norm, "clipped": float(clipped),
                      "nonfinite": float(nonfinite), **metrics}, new_state

    def state_dict(self, state: list[dict] | None) -> dict:
        if state is None:
            return {}
        out = []
        for s in state:
            leaves, _ = tree_flatten(s["state"])
            out.append({"x": s["x"].cpu(), "y": s["y"].cpu(), "num_classes": s["num_classes"], "pos": int(s["pos"]),
                        "leaves": [t.detach().cpu().clone() for t in leaves]})
        return {"streams": out}

    def load_state_dict(self, theta: torch.Tensor, d: dict) -> list[dict] | None:
        if not d:
            return None
        streams = d["streams"] if "streams" in d else [d]      # a checkpoint from before streams: one stream
        if len(streams) != self.streams:
            raise ValueError(f"the checkpoint carries {len(streams)} tbptt streams but bptt.streams={self.streams}; "
                             "resume with the run's own bptt.streams")
        out = []
        for s in streams:
            x = s["x"].to(theta.device)
            tmpl = self.learner.init_state(x.shape[0], x.shape[2], s["num_classes"], torch.Generator().manual_seed(0),
                                           theta.dtype, theta.device)
            out.append({"x": x, "y": s["y"].to(theta.device), "num_classes": s["num_classes"], "pos": s["pos"],
                        "state": state_from_leaves(tmpl, s["leaves"], "the carried tbptt state")})
        return out


@register("tbptt", why="its episodes are carried from step to step on one process")
def _build_tbptt(cfg: Any, problem: Problem) -> CarriedBPTTEstimator:
    """Online truncated BPTT: meta_batch episodes of episode_length, one bptt.truncation window per meta-step."""
    return CarriedBPTTEstimator(problem.learner, cfg.bptt, problem, cfg.meta_batch, cfg.episode_length, seed=cfg.seed)


# --------------------------------------------------------------------------------------------
# meta-optimiser


def make_optimizer(theta_param: torch.nn.Parameter, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam on θ (vsml.md §2.2: lr 0.025, β (0.9, 0.999), eps 1e-8 for ES; §2.3: lr 1e-3 for BPTT).

    With ``weight_decay > 0`` it is AdamW: decoupled decay θ ← θ − lr·wd·θ applied besides the Adam
    step (not added to the gradient, so it is not rescaled by Adam's second moment).  The
    reference uses no weight decay.  Usage: ``theta.grad = grad; opt.step()``.
    """
    if not isinstance(theta_param, torch.Tensor) or not theta_param.is_leaf:
        raise TypeError("make_optimizer needs a leaf tensor / torch.nn.Parameter θ")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if weight_decay > 0:
        return torch.optim.AdamW([theta_param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.Adam([theta_param], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
