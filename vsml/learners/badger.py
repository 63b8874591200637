"""Micro-Badger: homogeneous experts on a communication graph (badger-bmg-es.md §A.3).

n experts share ONE gated recurrent cell (θ) but each keeps its own hidden state h_i ∈ R^H.  At
every inner step t of an episode (batched over E tasks; the only Python loop is over t):

1. feedback   e_t = c · mean_d (g_{t−1,d} − y_d)²  of the previous guess (g_0 = 0), one scalar per
              task, broadcast to every expert (§A.2 / §A.3 step 3; c = 3 makes chance = 1 for
              y ~ U[−1, 1]);
2. messages   m_j = tanh(W_m h_j + b_m)             ("each expert sends its output", §A.3 step 1);
3. aggregate  a_i = Σ_j A_ij m_j / max(1, deg_in(i))  (mean; ``sum`` drops the division;
              ``attention`` is a softmax over the in-neighbours of q_i·k_j/√K);  A_ij = 1 when
              expert j sends to expert i, no self-loops;
4. observe    x_i = [e_t, a_i, id_i (optional), m_i (optional own previous output)];
5. update     z = σ(W_z x + U_z h + b_z),  r = σ(W_r x + U_r h + b_r) (optional reset gate),
              v = tanh(W_v x + U_v (r ⊙ h) + b_v)  (or linear, as the 2019 cell),
              h ← z ⊙ h + (1 − z) ⊙ v                                   (``update="gru"``)
              h ← a · h₀ᵢ + b · (z ⊙ h + (1 − z) ⊙ v)                   (``update="exp"``, [P],
              (a, b) = (0.5, 0.7) in the source; h₀ᵢ is expert i's initial state in this episode);
6. readout    g_t ∈ R^N:  ``pooled`` g = W_o mean_i h_i + b_o (R2);  ``designated`` g_d = w_o·h_{d mod n} + b_o
              (R1);  ``attention`` g_d = w_o · Σ_i softmax_i(β q_d·k_i/√K) W_v' h_i + b_o with
              q_d = [learned stub, random address_d] (R3, the 2019 readout);
7. error      err_t = c · mean_d (g_{t,d} − y_d)²  — the *per-step loss*; it becomes e_{t+1}.

Symmetry breakers (the blog attributes plateaus to symmetry, §A.1, §A.3): a shared learned h₀ with
optional per-expert noise ``init_noise`` · N(0, 1) (resampled per episode), random per-expert
identity vectors (``id_dim`` > 0, N(0, 1) per episode, as 2019), and the random topology itself.

Topologies (§A.3): ``kout`` (each expert picks k random receivers), ``er`` (Erdős–Rényi p),
``ring`` (k nearest on a ring, both directions), ``complete``, ``fixed`` (a user-given edge list
"j>i,..."), resampled per episode or drawn once per run (``resample_topology=False``, from
``topology_seed``).

The learner follows :class:`vsml.learners.base.Learner` so that the estimators and ``train()`` drive it
unchanged.  The Guessing Game (``tasks/guessing.py``) encodes an episode as
``x [E, T, N_max]`` = the hidden targets y_d at every step (zero beyond the episode's N) and
``y [E, T]`` = N_e − 1 (the number of active coordinates, so N can differ per episode);
``num_classes`` = N_max.  The learner never sees x directly: only the feedback e_t.

Meta-loss weighting (§A.3): L = Σ_t w_t err_t / Σ_t w_t with ``last`` (w = one-hot on the last
step, 2019), ``mean`` (w = 1), ``exp`` (w_t = base^{−(T−1−t)} over the last ``exp_window`` steps,
the 2019 search experiment).  Every estimator reads ``loss.mean(1)``, so ``loss[e, t]`` is
returned as T · w_t / Σw · err_t; the raw feedback err_t is ``out.error``.  With truncated BPTT the
weights apply within each unroll call (use full BPTT, ``bptt.truncation 0``, for ``last``/``exp``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from vsml.engine.config import ConfigError
from vsml.engine.state import EpisodeOutput

__all__ = [
    "BadgerConfig",
    "BadgerOutput",
    "BadgerState",
    "MicroBadger",
    "parse_edges",
    "sample_topology",
    "meta_loss_weights",
]

Topology = Literal["kout", "er", "ring", "complete", "fixed"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class BadgerConfig:
    """Micro-Badger learner (badger-bmg-es.md §A.3).  Every field is a CLI flag ``--badger.<name>``.

    Attributes:
        n_experts: number of experts n (the minimum when ``n_experts_max`` is set).
        n_experts_max: 0 = fixed n; else n is drawn per episode uniformly from
            [n_experts, n_experts_max] (unused experts are masked out of the graph and the readout).
        hidden: H, size of each expert's hidden state.
        msg: M, size of the message an expert sends.
        id_dim: size of the random per-expert identity vector (0 = none).
        init_noise: s, std of the per-expert noise added to the shared learned h₀ (0 = symmetric).
        topology: kout | er | ring | complete | fixed.
        k: out-degree (kout) or neighbours per side (ring).
        p: edge probability (er).
        edges: the fixed graph as "j>i,j>i,..." (sender > receiver), for ``topology=fixed``.
        resample_topology: True = a new graph per episode; False = one graph per run (topology_seed).
        topology_seed: seed of the per-run graph.
        aggregation: mean | sum | attention over in-neighbours.
        key_dim: K, key/query size of the attention aggregation and readout.
        update: gru | exp (the anchored "exponential" update, §A.3).
        exp_a, exp_b: (a, b) of the exponential update.
        candidate: tanh | linear (the 2019 cell's candidate was linear).
        reset_gate: use a reset gate r in the candidate.
        feed_own_output: append the expert's own previous message to its observation.
        readout: pooled | designated | attention.
        max_outputs: N_max the pooled readout can write (W_o has this many rows).
        attn_beta: β, inverse temperature of the attention readout (2019: 2.5).
        feedback_scale: c in e = c · MSE (3 for targets with E[y²] = 1/3: chance = 1).
        log_feedback: also feed log(e_t + 1e-4) (resolves small errors late in the episode).
        meta_loss: last | mean | exp.
        exp_base, exp_window: weights base^{−(T−1−t)} over the last ``exp_window`` steps (0 = all).
        solved_threshold: an inner step counts as "correct" when err_t < this (the accuracy metric).
        init_gain: multiplies the initial cell weights (2019 used 1.65).
    """

    n_experts: int = 10
    n_experts_max: int = 0
    hidden: int = 16
    msg: int = 8
    id_dim: int = 0
    init_noise: float = 0.0
    topology: Topology = "kout"
    k: int = 3
    p: float = 0.3
    edges: str = ""
    resample_topology: bool = True
    topology_seed: int = 0
    aggregation: Literal["mean", "sum", "attention"] = "mean"
    key_dim: int = 8
    update: Literal["gru", "exp"] = "gru"
    exp_a: float = 0.5
    exp_b: float = 0.7
    candidate: Literal["tanh", "linear"] = "tanh"
    reset_gate: bool = True
    feed_own_output: bool = False
    readout: Literal["pooled", "designated", "attention"] = "pooled"
    max_outputs: int = 8
    attn_beta: float = 2.5
    feedback_scale: float = 3.0
    log_feedback: bool = True
    meta_loss: Literal["last", "mean", "exp"] = "mean"
    exp_base: float = 2.0
    exp_window: int = 0
    solved_threshold: float = 0.05
    init_gain: float = 1.0

    def __post_init__(self) -> None:
        _check(self.n_experts >= 1, f"badger.n_experts must be >= 1, got {self.n_experts}")
        _check(self.n_experts_max == 0 or self.n_experts_max >= self.n_experts,
               f"badger.n_experts_max must be 0 (fixed n) or >= n_experts={self.n_experts}, got {self.n_experts_max}")
        for name in ("hidden", "msg", "key_dim", "max_outputs"):
            _check(getattr(self, name) >= 1, f"badger.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.id_dim >= 0, f"badger.id_dim must be >= 0 (0 = no identity vectors), got {self.id_dim}")
        _check(self.init_noise >= 0 and math.isfinite(self.init_noise),
               f"badger.init_noise must be a finite number >= 0, got {self.init_noise}")
        _check(self.topology in ("kout", "er", "ring", "complete", "fixed"),
               f"badger.topology must be kout|er|ring|complete|fixed, got {self.topology!r}")
        _check(self.k >= 1, f"badger.k must be >= 1, got {self.k}")
        _check(0.0 <= self.p <= 1.0, f"badger.p must lie in [0, 1], got {self.p}")
        if self.topology == "fixed":
            _check(bool(self.edges.strip()), "badger.topology=fixed needs badger.edges, e.g. '0>1,1>2,2>0' "
                   "(sender>receiver)")
            _check(self.n_experts_max == 0, "badger.topology=fixed needs a fixed number of experts "
                   "(badger.n_experts_max 0)")
            parse_edges(self.edges, self.n_experts)        # raises ConfigError on a bad edge list
        _check(self.aggregation in ("mean", "sum", "attention"),
               f"badger.aggregation must be mean|sum|attention, got {self.aggregation!r}")
        _check(self.update in ("gru", "exp"), f"badger.update must be gru|exp, got {self.update!r}")
        _check(self.candidate in ("tanh", "linear"), f"badger.candidate must be tanh|linear, got {self.candidate!r}")
        _check(self.readout in ("pooled", "designated", "attention"),
               f"badger.readout must be pooled|designated|attention, got {self.readout!r}")
        _check(self.meta_loss in ("last", "mean", "exp"),
               f"badger.meta_loss must be last|mean|exp, got {self.meta_loss!r}")
        _check(self.exp_base >= 1.0, f"badger.exp_base must be >= 1, got {self.exp_base}")
        _check(self.exp_window >= 0, f"badger.exp_window must be >= 0 (0 = every step), got {self.exp_window}")
        _check(self.feedback_scale > 0, f"badger.feedback_scale must be > 0, got {self.feedback_scale}")
        _check(self.attn_beta > 0, f"badger.attn_beta must be > 0, got {self.attn_beta}")
        _check(self.solved_threshold > 0, f"badger.solved_threshold must be > 0, got {self.solved_threshold}")
        _check(self.init_gain > 0, f"badger.init_gain must be > 0, got {self.init_gain}")
        _check(math.isfinite(self.exp_a) and math.isfinite(self.exp_b),
               f"badger.exp_a / exp_b must be finite, got {self.exp_a}, {self.exp_b}")

    @property
    def max_experts(self) -> int:
        return self.n_experts_max or self.n_experts

    @property
    def obs_dim(self) -> int:
        """X = 1 (feedback) [+ 1 log feedback] + M (aggregate) + id_dim [+ M own output]."""
        return 1 + int(self.log_feedback) + self.msg + self.id_dim + (self.msg if self.feed_own_output else 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BadgerConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"BadgerConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# topology samplers


_EDGE_RE = re.compile(r"^\s*(\d+)\s*>\s*(\d+)\s*$")


def parse_edges(edges: str, n: int) -> torch.Tensor:
    """"j>i,j>i,..." (sender j sends to receiver i) -> adjacency A [n, n] float with A[i, j] = 1."""
    a = torch.zeros(n, n)
    for tok in [t for t in edges.split(",") if t.strip()]:
        m = _EDGE_RE.match(tok)
        if not m:
            raise ConfigError(f"badger.edges: cannot parse {tok.strip()!r}; write edges as 'sender>receiver', "
                              f"comma-separated, e.g. '0>1,1>2'")
        j, i = int(m.group(1)), int(m.group(2))
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(f"badger.edges: edge {j}>{i} names an expert outside 0..{n - 1}")
        if i == j:
            raise ConfigError(f"badger.edges: self-loop {j}>{i} is not allowed (an expert keeps its own state)")
        a[i, j] = 1.0
    return a


def sample_topology(kind: str, num: int, n: int, *, k: int = 3, p: float = 0.3, edges: str = "",
                    alive: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``num`` adjacency matrices A [num, n, n] (A[b, i, j] = 1: j sends to i; zero diagonal).

    ``alive`` [num, n] bool marks the experts that exist in each graph (the first n_b of n); edges
    touching a dead expert are removed and the samplers work on the alive experts only (kout picks
    min(k, n_b − 1) receivers among the alive ones; ring uses n_b).  All samplers are vectorised.
    """
    if alive is None:
        alive = torch.ones(num, n, dtype=torch.bool)
    alive = alive.to(torch.bool)                                            # [num, n]
    pair = alive[:, :, None] & alive[:, None, :]                             # [num, n(recv), n(send)]
    eye = torch.eye(n, dtype=torch.bool)
    if kind == "complete":
        adj = pair & ~eye
    elif kind == "er":
        u = torch.rand(num, n, n, generator=generator)
        adj = (u < p) & pair & ~eye
    elif kind == "kout":
        # each sender j ranks the receivers i by a random score; dead / self get -inf
        score = torch.rand(num, n, n, generator=generator)                   # [num, n(send), n(recv)]
        ok = pair.transpose(1, 2) & ~eye                                     # [num, send, recv]
        score = score.masked_fill(~ok, -1.0)
        kk = min(k, max(n - 1, 1))
        top = score.topk(kk, dim=2).indices                                  # [num, send, kk]
        chosen = torch.zeros(num, n, n, dtype=torch.bool)
        chosen.scatter_(2, top, True)
        chosen &= ok                                                         # drop picks with score -1
        adj = chosen.transpose(1, 2)                                         # [num, recv, send]
    elif kind == "ring":
        nb = alive.sum(1).clamp(min=1)                                       # [num]
        idx = torch.arange(n)
        diff = (idx[:, None] - idx[None, :])[None] % nb[:, None, None]       # [num, n, n] (i - j) mod n_b
        dist = torch.minimum(diff, nb[:, None, None] - diff)                 # ring distance
        adj = (dist >= 1) & (dist <= k) & pair
    elif kind == "fixed":
        adj = parse_edges(edges, n).to(torch.bool)[None].expand(num, n, n) & pair
    else:
        raise ConfigError(f"unknown topology {kind!r}; use kout|er|ring|complete|fixed")
    return adj.to(dtype)


def meta_loss_weights(kind: str, t_len: int, base: float = 2.0, window: int = 0,
                      dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """Normalised inner-step weights w [T] (Σ w = 1) of the meta-loss L = Σ_t w_t err_t (§A.3)."""
    w = torch.zeros(t_len, dtype=dtype, device=device)
    if kind == "last":
        w[-1] = 1.0
    elif kind == "mean":
        w[:] = 1.0
    elif kind == "exp":
        t = torch.arange(t_len, dtype=dtype, device=device)
        w = base ** (-(t_len - 1 - t))
        if window:
            w = torch.where(t >= t_len - window, w, torch.zeros_like(w))
    else:
        raise ConfigError(f"unknown meta_loss {kind!r}; use last|mean|exp")
    return w / w.sum()


# --------------------------------------------------------------------------------------------
# state and output


@dataclass
class BadgerState:
    """Inner-loop state of E episodes (every tensor has the episode axis first).

    h      [E, n, H]   expert hidden states (zeros before the first step: filled with h₀ then)
    eps    [E, n, H]   per-expert initial-state noise (N(0, 1); scaled by init_noise)
    ids    [E, n, I]   identity vectors (I = id_dim, may be 0)
    adj    [E, n, n]   adjacency, adj[e, i, j] = 1 when j sends to i
    alive  [E, n]      1 for the experts of this episode (n_e ≤ n), 0 for padding
    addr   [E, N, K']  random output addresses of the attention readout (K' = K // 2)
    guess  [E, N]      the last guess g_{t−1} (zeros at the start)
    msg    [E, n, M]   the last messages (own-output feedback)
    t      [E]         inner steps done
    """

    h: torch.Tensor
    eps: torch.Tensor
    ids: torch.Tensor
    adj: torch.Tensor
    alive: torch.Tensor
    addr: torch.Tensor
    guess: torch.Tensor
    msg: torch.Tensor
    t: torch.Tensor


@dataclass
class BadgerOutput(EpisodeOutput):
    """:class:`EpisodeOutput` plus the Badger-specific records.

    logits  [E, T, N]        the guesses g_t
    loss    [E, T]           T · w_t · err_t (``loss.mean(1)`` = the weighted meta-loss)
    correct [E, T]           err_t < solved_threshold
    error   [E, T]           err_t = c · mean_d (g_t − y)² (the raw feedback)
    hidden  [E, T, n, H]     expert states after every step (only with ``record=True``, else None)
    """

    error: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# the learner


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ (+ b) with a shared weight w [out, in] or one per episode w [E, out, in].

    x: [E, *, in] -> [E, *, out]; b: [out] or [E, out].
    """
    if w.dim() == 2:
        y = x @ w.transpose(0, 1)
        return y if b is None else y + b
    e = x.shape[0]
    y = (x.reshape(e, -1, x.shape[-1]) @ w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])  # [E, *, out]
    if b is not None:
        y = y + b.reshape(e, *([1] * (x.dim() - 2)), b.shape[-1])
    return y


def _vec(p: torch.Tensor, x_dim: int) -> torch.Tensor:
    """A parameter vector [D] (shared) or [E, D] (per episode) shaped to broadcast against [E, ..., D]
    tensors of ``x_dim`` dims."""
    if p.dim() == 1:
        return p
    return p.reshape(p.shape[0], *([1] * (x_dim - 2)), p.shape[-1])


class MicroBadger:
    """The Micro-Badger learner (module docstring); satisfies :class:`vsml.learners.base.Learner`.

    θ is one flat vector [P] (``layout`` lists its named blocks) or [E, P] per episode (ES).
    ``record_states=True`` makes ``unroll`` return the hidden states of every step (``out.hidden``)
    for the analyses of ``vsml.analysis``.
    """

    meta_trainable = True

    def __init__(self, cfg: BadgerConfig | None = None, record_states: bool = False):
        self.cfg = cfg or BadgerConfig()
        self.record_states = record_states
        c = self.cfg
        h, x, m, kd = c.hidden, c.obs_dim, c.msg, c.key_dim
        ng = 3 if c.reset_gate else 2                  # z, (r), v blocks of the input weights
        lay: list[tuple[str, tuple[int, ...]]] = [
            ("h0", (h,)),
            ("W_x", (ng * h, x)),                      # [z; r; v] input weights
            ("U_g", ((ng - 1) * h, h)),                # [z; r] recurrent weights
            ("U_v", (h, h)),                           # candidate recurrent weights
            ("b", (ng * h,)),
            ("W_m", (m, h)),
            ("b_m", (m,)),
        ]
        if c.aggregation == "attention":
            lay += [("W_q", (kd, h)), ("W_k", (kd, h))]
        if c.readout == "pooled":
            lay += [("W_o", (c.max_outputs, h)), ("b_o", (c.max_outputs,))]
        elif c.readout == "designated":
            lay += [("w_o", (h,)), ("b_o", (1,))]
        else:
            ks = kd - kd // 2
            lay += [("q_stub", (ks,)), ("W_rk", (kd, h)), ("W_rv", (h, h)), ("w_o", (h,)), ("b_o", (1,))]
        self.layout = lay
        self.sizes = [math.prod(s) for _, s in lay]
        self.num_params = sum(self.sizes)
        self._fixed_adj: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------- θ

    def init_theta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """θ [P]: weights U(−g/√fan_in, g/√fan_in) (PyTorch's Linear default, g = init_gain), biases
        zero, h₀ ~ N(0, 0.1²), the attention stub ~ N(0, 1)."""
        parts = []
        for (name, shape), size in zip(self.layout, self.sizes):
            if name == "h0":
                p = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
            elif name == "q_stub":
                p = torch.randn(shape, generator=generator, dtype=torch.float64)
            elif name.startswith("b"):
                p = torch.zeros(shape, dtype=torch.float64)
            else:
                fan_in = shape[-1]
                bound = self.cfg.init_gain / math.sqrt(fan_in)
                p = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            parts.append(p.reshape(-1))
        return torch.cat(parts).to(dtype=dtype, device=device)

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of θ [P] or [E, P]: {name: [*shape]} or {name: [E, *shape]}."""
        if theta.shape[-1] != self.num_params or theta.dim() not in (1, 2):
            raise ValueError(f"MicroBadger θ must be [{self.num_params}] or [E, {self.num_params}], "
                             f"got {list(theta.shape)}")
        lead = tuple(theta.shape[:-1])
        out, off = {}, 0
        for (name, shape), size in zip(self.layout, self.sizes):
            out[name] = theta[..., off:off + size].reshape(*lead, *shape)   # [(E,) *shape]
            off += size
        return out

    # ---------------------------------------------------------------------------------- state

    def fixed_adjacency(self) -> torch.Tensor:
        """The per-run graph [n_max, n_max] (``resample_topology=False``), drawn once from topology_seed."""
        if self._fixed_adj is None:
            c = self.cfg
            gen = torch.Generator().manual_seed(c.topology_seed)
            self._fixed_adj = sample_topology(c.topology, 1, c.max_experts, k=c.k, p=c.p, edges=c.edges,
                                              generator=gen)[0]
        return self._fixed_adj

    def init_state(self, num_episodes: int, in_dim: int, num_classes: int | None = None,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> BadgerState:
        """A fresh state for E episodes of an N-number guessing task (N = ``in_dim``).

        Draws (on the CPU, from ``generator``): the number of experts per episode, the graph, the
        initial-state noise, the identity vectors and the attention-readout addresses.
        """
        c = self.cfg
        e, n, nmax_out = int(num_episodes), c.max_experts, int(in_dim)
        if e < 1 or nmax_out < 1:
            raise ValueError(f"init_state needs num_episodes >= 1 and in_dim (N) >= 1, got {e}, {nmax_out}")
        if c.n_experts_max:
            n_e = torch.randint(c.n_experts, c.n_experts_max + 1, (e,), generator=generator)   # [E]
        else:
            n_e = torch.full((e,), n, dtype=torch.long)
        alive = torch.arange(n)[None, :] < n_e[:, None]                        # [E, n]
        if c.resample_topology:
            adj = sample_topology(c.topology, e, n, k=c.k, p=c.p, edges=c.edges, alive=alive, generator=generator)
        else:
            adj = self.fixed_adjacency()[None].expand(e, n, n) * (alive[:, :, None] & alive[:, None, :])
        eps = torch.randn(e, n, c.hidden, generator=generator)
        ids = torch.randn(e, n, c.id_dim, generator=generator)
        addr = torch.randn(e, nmax_out, c.key_dim // 2, generator=generator)
        kw = dict(dtype=dtype, device=device)
        return BadgerState(
            h=torch.zeros(e, n, c.hidden, **kw), eps=eps.to(**kw), ids=ids.to(**kw), adj=adj.to(**kw),
            alive=alive.to(**kw), addr=addr.to(**kw), guess=torch.zeros(e, nmax_out, **kw),
            msg=torch.zeros(e, n, c.msg, **kw), t=torch.zeros(e, dtype=torch.long, device=device))

    # ---------------------------------------------------------------------------------- dynamics

    def _aggregate(self, p: dict, h: torch.Tensor, m: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """a [E, n, M] from messages m [E, n, M] over in-neighbours (adj [E, n(recv), n(send)])."""
        agg = self.cfg.aggregation
        if agg in ("mean", "sum"):
            a = adj @ m                                                        # [E, n, M]
            if agg == "mean":
                a = a / adj.sum(2, keepdim=True).clamp(min=1.0)
            return a
        q = _lin(h, p["W_q"])                                                  # [E, n, K]
        k = _lin(h, p["W_k"])                                                  # [E, n, K]
        s = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])                   # [E, n(recv), n(send)]
        # finite mask value (not -inf) so that an expert without in-neighbours gets a uniform row that
        # the adjacency then zeroes: a_i = 0 with finite gradients (an all -inf row would give NaN)
        s = s.masked_fill(adj <= 0, -1e9)
        w = torch.softmax(s, dim=2) * (adj > 0)
        return w @ m                                                           # [E, n, M]

    def _readout(self, p: dict, h: torch.Tensor, st: BadgerState, n_out: int) -> torch.Tensor:
        """g [E, N] from expert states h [E, n, H]."""
        c = self.cfg
        alive = st.alive                                                       # [E, n]
        if c.readout == "pooled":
            pooled = (h * alive[..., None]).sum(1) / alive.sum(1, keepdim=True).clamp(min=1.0)  # [E, H]
            return _lin(pooled[:, None, :], p["W_o"][..., :n_out, :],
                        p["b_o"][..., :n_out])[:, 0]                             # [E, N]
        if c.readout == "designated":
            n_e = alive.sum(1).long().clamp(min=1)                             # [E]
            idx = torch.arange(n_out, device=h.device)[None, :] % n_e[:, None]  # [E, N] expert of coordinate d
            hd = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))  # [E, N, H]
            return (hd * _vec(p["w_o"], 3)).sum(-1) + _vec(p["b_o"], 2)         # [E, N]
        # attention readout (R3)
        e = h.shape[0]
        stub = p["q_stub"]
        stub = stub.expand(n_out, -1)[None].expand(e, -1, -1) if stub.dim() == 1 else \
            stub[:, None, :].expand(-1, n_out, -1)                              # [E, N, K - K']
        q = torch.cat([stub, st.addr[:, :n_out]], dim=-1)                       # [E, N, K]
        k = _lin(h, p["W_rk"])                                                  # [E, n, K]
        v = _lin(h, p["W_rv"])                                                  # [E, n, H]
        s = c.attn_beta * (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])     # [E, N, n]
        s = s.masked_fill(alive[:, None, :] <= 0, float("-inf"))
        r = torch.softmax(s, dim=2) @ v                                        # [E, N, H]
        return (r * _vec(p["w_o"], 3)).sum(-1) + _vec(p["b_o"], 2)             # [E, N]

    def step(self, p: dict, st: BadgerState, target: torch.Tensor, dmask: torch.Tensor,
             n_active: torch.Tensor) -> tuple[BadgerState, torch.Tensor, torch.Tensor]:
        """One inner step (module docstring 1-7).  target [E, N], dmask [E, N] (1 on the episode's
        coordinates), n_active [E].  Returns (new state, guess g_t [E, N], err_t [E])."""
        c = self.cfg
        e, n, hd = st.h.shape
        # initial states h₀ᵢ = h₀ + s·ε_i (used at t = 0 and as the anchor of the exp update)
        h0 = _vec(p["h0"], 3) + c.init_noise * st.eps                           # [E, n, H]
        h0 = h0 * st.alive[..., None]
        first = (st.t == 0)[:, None, None]
        h = torch.where(first, h0, st.h)                                        # [E, n, H]
        # 1. feedback of the previous guess
        fb = c.feedback_scale * ((st.guess - target) ** 2 * dmask).sum(1) / n_active  # [E]
        # 2-3. messages and aggregation
        m = torch.tanh(_lin(h, p["W_m"], p["b_m"]))                             # [E, n, M]
        m = m * st.alive[..., None]
        a = self._aggregate(p, h, m, st.adj)                                    # [E, n, M]
        # 4. observation
        obs = [fb[:, None, None].expand(e, n, 1)]
        if c.log_feedback:
            obs.append(torch.log(fb + 1e-4)[:, None, None].expand(e, n, 1))
        obs.append(a)
        if c.id_dim:
            obs.append(st.ids)
        if c.feed_own_output:
            obs.append(st.msg)
        x = torch.cat(obs, dim=-1)                                              # [E, n, X]
        # 5. gated update
        gx = _lin(x, p["W_x"], p["b"])                                          # [E, n, ng*H]
        gh = _lin(h, p["U_g"])                                                  # [E, n, (ng-1)*H]
        z = torch.sigmoid(gx[..., :hd] + gh[..., :hd])
        if c.reset_gate:
            r = torch.sigmoid(gx[..., hd:2 * hd] + gh[..., hd:2 * hd])
            hv = r * h
        else:
            hv = h
        v = gx[..., -hd:] + _lin(hv, p["U_v"])
        if c.candidate == "tanh":
            v = torch.tanh(v)
        h_new = z * h + (1 - z) * v
        if c.update == "exp":
            h_new = c.exp_a * h0 + c.exp_b * h_new
        h_new = h_new * st.alive[..., None]                                     # padding experts stay 0
        # 6-7. readout and error of this guess
        g = self._readout(p, h_new, st, target.shape[1]) * dmask                # [E, N]
        err = c.feedback_scale * ((g - target) ** 2 * dmask).sum(1) / n_active  # [E]
        new = BadgerState(h=h_new, eps=st.eps, ids=st.ids, adj=st.adj, alive=st.alive, addr=st.addr,
                          guess=g, msg=m, t=st.t + 1)
        return new, g, err

    def unroll(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None,
               state: BadgerState | None = None, generator: torch.Generator | None = None,
               record: bool | None = None) -> BadgerOutput:
        """Run T inner steps of E guessing episodes.

        x [E, T, N]: the hidden targets at every step (zero beyond the episode's N); y [E, T] int:
        the number of active coordinates minus one (constant over T for the Guessing Game).
        """
        c = self.cfg
        if x.dim() != 3:
            raise ValueError(f"MicroBadger.unroll: x must be [E, T, N] (the hidden targets), got {list(x.shape)}")
        e, t_len, n_out = x.shape
        if tuple(y.shape) != (e, t_len):
            raise ValueError(f"MicroBadger.unroll: y must be [E, T] = {[e, t_len]}, got {list(y.shape)}")
        if c.readout == "pooled" and n_out > c.max_outputs:
            raise ValueError(f"MicroBadger: the task has N = {n_out} numbers but the pooled readout writes at most "
                             f"badger.max_outputs = {c.max_outputs}; raise --badger.max_outputs")
        if theta.dim() == 2 and theta.shape[0] != e:
            raise ValueError(f"per-episode θ has {theta.shape[0]} rows but x has {e} episodes")
        if state is None:
            state = self.init_state(e, n_out, num_classes, generator, x.dtype, x.device)
        if tuple(state.guess.shape) != (e, n_out):
            raise ValueError(f"state is for {list(state.guess.shape)} [E, N] but x has [E, N] = {[e, n_out]}")
        if c.readout == "designated" and bool((state.alive.sum(1) < (y[:, 0] + 1)).any()):
            raise ValueError("the designated readout needs at least as many experts as numbers to guess (n >= N)")
        p = self.params(theta)
        record = self.record_states if record is None else record
        d_idx = torch.arange(n_out, device=x.device)
        guesses, errs, hs = [], [], []
        st = state
        for t in range(t_len):
            n_act = (y[:, t] + 1).to(x.dtype)                                   # [E]
            dmask = (d_idx[None, :] < n_act[:, None]).to(x.dtype)               # [E, N]
            st, g, err = self.step(p, st, x[:, t], dmask, n_act)
            guesses.append(g)
            errs.append(err)
            if record:
                hs.append(st.h)
        error = torch.stack(errs, 1)                                            # [E, T]
        w = meta_loss_weights(c.meta_loss, t_len, c.exp_base, c.exp_window, error.dtype, error.device)
        return BadgerOutput(logits=torch.stack(guesses, 1), loss=error * (w * t_len), correct=error < c.solved_threshold,
                            state=st, error=error, hidden=torch.stack(hs, 1) if record else None)
