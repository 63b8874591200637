"""Hand-built θ: online SGD written into the sub-LSTMs (issue 15), a starting point for meta-training
("meta-learn backpropagation, then improve it") that needs no cloning.

In the backward-pass schedule (``VSMLConfig.backward_pass``, vsml.md §1.5) the reverse sweep of example t
feeds x_t (forward element 0) and its error e_t = softmax(ŷ_t) − onehot(y_t) (backward element 0) to the
layer together, so the bilinear cell's gate term w_xe·x_a e_b (``SubLSTMConfig.bilinear``) is exactly the
product online SGD integrates.  :func:`sgd_theta` sets every θ value to zero except these, for one state
element k (the first one the initial state leaves at zero, k = ``cell.num_rand``):

    β_i[k] = β_f[k] = β_o[k] = 20           input, forget and output gates open:
                                            σ(20 − 5), σ(20 + 5), σ(20) = 1 − O(1e-7)
    w_xe[g, k] = −ε α / micro_ticks          c_k ← c_k + tanh(−ε α x_a e_b / micro_ticks) per micro-step
    W_xφ[output_idx, k] = 1 / ε             φ_ab = x_a · tanh(c_ab,k) / ε

With w_ab := c_ab,k / ε the sweep of example t therefore makes w_ab ← w_ab − α x_a e_b (up to tanh's
curvature; the forward sweep's error input is zero, so it leaves c_k alone) and the read-out gives
ŷ_b = κ · mean_a x_a tanh(ε w_ab) / ε ≈ κ · mean_a x_a w_ab: online SGD on a linear softmax classifier
W = κ w / A from W = 0, with learning rate η = α κ / A (A inputs; α = 1, κ = 2, A = 196 gives η ≈ 0.0102,
the reference SGD baseline's 0.01).  ε sets how far |w| stays in tanh's linear range: tanh(ε w) / ε
shrinks w by 5 % at |ε w| = 0.4 (ε = 0.01 holds |w| ≈ 40, well above the 2000-example weights on
MNIST-14).  All other sub-LSTM paths are zero, so meta-training starts from this learner and may use
them (their gradients are not zero; the saturated gates' are ~1e-7).

    python eval.py --checkpoint analytic:sgd ...          # evaluate it
    python eval.py --checkpoint "analytic:sgd[alpha=0.5,boost=6,tau=500]" ...   # with a bounded step schedule (sgd_theta)
    python train.py --init_from analytic:sgd ...         # meta-train from it
"""

from __future__ import annotations

import math
import re

import torch

from vsml.engine.cell import GATE_I_OFFSET
from vsml.engine.config import ConfigError, SubLSTMConfig, VSMLConfig
from vsml.engine.params import param_shapes

GATE_OPEN = 20.0

#: the learner config of ``analytic:NAME`` when no other is given (eval.py): one dense layer, the
#: backward-pass schedule, the bilinear cell, κ = 2
DEFAULT_CONFIG = VSMLConfig(logit_scale=2.0, backward_pass=True, cell=SubLSTMConfig(bilinear=True))


def check_sgd_config(cfg: VSMLConfig) -> None:
    """ConfigError unless ``cfg`` can hold :func:`sgd_theta` (see the module docstring)."""
    need = {"one dense layer (--vsml.hidden_sizes '()', no --vsml.conv)": cfg.num_layers == 1 and not cfg.conv,
            "the backward-pass schedule (--vsml.backward_pass true)": cfg.backward_pass,
            "the bilinear cell (--vsml.cell.bilinear true)": cfg.cell.bilinear,
            "no LayerNorm (--vsml.cell.layer_norm false)": not cfg.cell.layer_norm,
            "a state element the initial state leaves at zero (--vsml.cell.init_rand_proportion < 1)":
                cfg.cell.num_rand < cfg.cell.hidden}
    missing = [k for k, ok in need.items() if not ok]
    if missing:
        raise ConfigError("analytic:sgd (online SGD written into θ) needs " + "; ".join(missing))


#: element k's input-gate bias when a step-size schedule (boost > 1) reads the clock: σ(4) = 0.982
SCHEDULE_GATE = 4.0


def sgd_theta(cfg: VSMLConfig, alpha: float = 1.0, eps: float = 0.01, boost: float = 1.0, tau: float = 500.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """θ [L, P] with which the VSML network is online SGD with step α on w (module docstring).

    ``boost`` B > 1 adds a bounded step-size schedule that decays from α·B to α over ~τ = ``tau`` examples
    (issue 15: a fast start that cannot grow without bound).  A clock element j = k + 1 (zero at the
    start, gates open) integrates a constant, c_j ← c_j + 1/(S τ) in each of the S micro-steps of an
    example (S = 2·micro_ticks with the backward pass), so h_j = tanh(t / τ) after t examples; element k's
    input gate reads it, i_k = σ(β + w h_j) with β = 4 (after the cell's −5 input-gate offset) and
    w = logit(σ(β)/B) − β, and w_xe is scaled by B / σ(β):

        α(t) = α · B · σ(β + w · tanh(t / τ)) / σ(β)          α(0) = α·B,  α(t ≫ τ) = α
    """
    check_sgd_config(cfg)
    if not (alpha > 0 and eps > 0 and boost >= 1 and tau > 0):
        raise ConfigError(f"analytic:sgd needs alpha > 0, eps > 0, boost >= 1 and tau > 0, got alpha={alpha}, "
                          f"eps={eps}, boost={boost}, tau={tau}")
    n, m, k = cfg.cell.hidden, cfg.cell.msg, cfg.cell.num_rand
    if boost > 1 and k + 1 >= n:
        raise ConfigError("analytic:sgd[boost>1] needs two state elements the initial state leaves at zero (the "
                          "weight and the clock): lower --vsml.cell.init_rand_proportion")
    parts = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in param_shapes(cfg.cell)}
    beta = parts["beta"]                                    # [4N], gates i, g, f, o
    for gate in (0, 2, 3):
        beta[gate * n + k] = GATE_OPEN
    parts["W_xe"][n + k] = -eps * alpha / cfg.micro_ticks   # the g gate of element k
    parts["W_xphi"][cfg.output_idx, k] = 1.0 / eps
    if boost > 1:
        j, steps = k + 1, 2 * cfg.micro_ticks if cfg.backward_pass else cfg.micro_ticks
        for gate in (0, 2, 3):                              # the clock: gates open, g_j = 1 / (S τ)
            beta[gate * n + j] = GATE_OPEN
        beta[n + j] = math.atanh(1.0 / (steps * tau))
        g0 = 1.0 / (1.0 + math.exp(-SCHEDULE_GATE))         # σ(β)
        beta[k] = SCHEDULE_GATE - GATE_I_OFFSET             # i_k = σ(β + w h_j), W's columns: [fwd M, bwd M, h N]
        parts["W"][k, 2 * m + j] = math.log((g0 / boost) / (1.0 - g0 / boost)) - SCHEDULE_GATE
        parts["W_xe"][n + k] *= boost / g0
    flat = torch.cat([parts[name].flatten() for name, _ in param_shapes(cfg.cell)])   # [P]
    return flat.to(dtype)[None].repeat(cfg.num_theta_sets, 1)                         # [L, P]


#: the learner config of ``analytic:backprop`` when no other is given: one hidden layer of 16 (196→16→10 on
#: MNIST-14), one θ per layer, the backward-pass schedule with ``bwd_reset``, one micro-step per sweep, the bilinear
#: cell, κ = 1, and a logit bound of 1000 instead of 100 (the MLP's logits reach ~7, where bound·tanh(ŷ/bound)
#: is 0.2 % below ŷ at bound 100 and 2e-5 at 1000)
BACKPROP_CONFIG = VSMLConfig(hidden_sizes=(16,), micro_ticks=1, backward_pass=True, bwd_reset=True, layerwise=True,
                             tanh_bound=1000.0, cell=SubLSTMConfig(bilinear=True))

#: elements of the hidden→output layer of analytic:backprop, counted from k = cell.num_rand: the weight's one
#: accumulator, three read-out copies re-made every micro-step, and two one-example memories of the update
_BP_ACC, _BP_F, _BP_BP, _BP_BM, _BP_DS, _BP_DE = range(6)


def check_backprop_config(cfg: VSMLConfig) -> None:
    """ConfigError unless ``cfg`` can hold :func:`backprop_theta`."""
    need = {"one hidden dense layer (--vsml.hidden_sizes 16, no --vsml.conv)": len(cfg.hidden_sizes) == 1
            and not cfg.conv,
            "one θ per layer (--vsml.layerwise true)": cfg.layerwise,
            "the backward-pass schedule with bwd_reset (--vsml.backward_pass true --vsml.bwd_reset true)":
                cfg.backward_pass and cfg.bwd_reset,
            "one micro-step per sweep (--vsml.micro_ticks 1)": cfg.micro_ticks == 1,
            "the bilinear cell (--vsml.cell.bilinear true)": cfg.cell.bilinear,
            "no LayerNorm (--vsml.cell.layer_norm false)": not cfg.cell.layer_norm,
            "no label feeding (--vsml.feed_label false)": not cfg.feed_label,
            "a random initial element and six the initial state leaves at zero (0 < --vsml.cell.init_rand_proportion"
            " and num_rand + 6 <= --vsml.cell.hidden)":
                0 < cfg.cell.num_rand and cfg.cell.num_rand + 6 <= cfg.cell.hidden}
    missing = [k for k, ok in need.items() if not ok]
    if missing:
        raise ConfigError("analytic:backprop (online backprop written into θ) needs " + "; ".join(missing))


def backprop_theta(cfg: VSMLConfig, alpha: float = 1.0, hidden_alpha: float = 0.01, gain: float = 14.0,
                   eps: float = 0.002, eta: float = 0.1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """θ [2, P] with which the two-layer VSML network is online backprop on an MLP with tanh hidden units.

    The MLP is ``cloning_deep``'s teacher (``mlp_sgd_step``) with the hidden gain γ = ``gain`` (√196 = 14 matches
    its γ = √A on 14×14 inputs), α_1 = ``alpha`` (output layer) and α_0 = ``hidden_alpha``:

        z_0 = mean_a w_0[a, b] x_a,   u = γ z_0,   a_b = tanh(u_b),   ŷ = κ · mean_b w_1[b, c] a_b
        e = softmax(ŷ) − onehot(y),   δ_0[b] = mean_c γ (1 − a_b²) w_1[b, c] e_c        (w_1 before its update)
        w_1 ← w_1 − α_1 a_b e_c,      w_0 ← w_0 − α_0 x_a δ_0[b]

    from w_0 = tanh(c_0) (the random initial cell element 0 of layer 0, vsml.md §1.6) and w_1 = 0 (so the
    hidden units differ from the first example on and the symmetric zero start of w_1 is broken by w_0).
    One micro-step per sweep; k = ``cell.num_rand`` (the first element the initial state leaves at zero).

    Layer 0, sub-LSTM (a, b): element 0 keeps its random c_0 (forget gate open, no input) and element k
    integrates the bilinear term as in :func:`sgd_theta`, c_k ← c_k + tanh(−ε α_0 x_a δ_b) in the reverse sweep,
    so w_0 = tanh(c_0) + tanh(c_k) / ε; its forward element ``output_idx`` carries γ w_0 x_a, whose mean over a
    is u_b.

    Layer 1, sub-LSTM (b, c), sees u_b (forward element ``output_idx``) and e_c (backward element 0).  One element
    accumulates c_A = ε w_1 (gates open).  Three more are re-made from it in every micro-step (forget gate closed,
    c ← tanh(h_A + …) ≈ c_A), so they never accumulate a difference of their own, and differ only in their output
    gates; with tanh(u) = 2σ(2u) − 1 and 1 − tanh²(u) = 4σ'(2u):

        forward:   F = σ(2u) tanh(c), A = tanh(c_A)     φ[output_idx] = (2 F − A) / ε = tanh(u) · w_1
        backward:  B± = σ(2u ± η e) tanh(c)             ψ[0] = 2γ (B+ − B−) / (η ε) = γ (1 − a²) w_1 e + O(η² e³)

    The update must reach w_1 *after* the backward read-out (backprop uses w_1 before its update), so two memory
    elements with closed forget gates store it in the reverse sweep, c_S = σ(2u) tanh(−2 ε α_1 e),
    c_E = tanh(ε α_1 e) (their sum ≈ −ε α_1 tanh(u) e), and the accumulator adds tanh(h_S + h_E) at the next
    forward sweep's micro-step (the copies take c ← tanh(h_A + h_S + h_E) then), before the forward read-out; that
    micro-step clears the memories (no error then).  ε keeps ε w_1 in tanh's linear range (the copies' nested tanh
    is exact to (ε w_1)²/3); η sets the finite difference of the σ's.  One accumulator per weight, because two
    accumulating copies would turn any asymmetry a change of θ puts between them into a difference that grows
    over the episode.  A change of θ still enters ψ amplified by 2γ/(ηε) (no faster than it is made, though):
    this θ is an exact learner, not a well-conditioned start for meta-training (RESULTS.md, twelfth session).
    """
    check_backprop_config(cfg)
    if not (alpha > 0 and hidden_alpha > 0 and gain > 0 and eps > 0 and eta > 0):
        raise ConfigError(f"analytic:backprop needs alpha, hidden_alpha, gain, eps and eta > 0, got alpha={alpha}, "
                          f"hidden_alpha={hidden_alpha}, gain={gain}, eps={eps}, eta={eta}")
    n, m, k, out = cfg.cell.hidden, cfg.cell.msg, cfg.cell.num_rand, cfg.output_idx
    col_u, col_e, col_h = out, m + cfg.error_idx, 2 * m       # W's columns: [fwd M, bwd M, h N]
    gi, gg, gf, go = (g * n for g in range(4))                 # row offsets of the gates i, g, f, o
    sets = []
    # layer 0: the random element 0 kept (forget open) plus the learned element k (the bilinear x·δ update)
    p0 = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in param_shapes(cfg.cell)}
    p0["beta"][gf + 0] = p0["beta"][go + 0] = GATE_OPEN
    for gate in (gi, gf, go):
        p0["beta"][gate + k] = GATE_OPEN
    p0["W_xe"][gg + k] = -eps * hidden_alpha / cfg.micro_ticks
    p0["W_xphi"][out, 0] = gain
    p0["W_xphi"][out, k] = gain / eps
    sets.append(p0)
    # layer 1: the accumulator of ε w_1, three copies re-made from it, two memories of the update (docstring)
    p1 = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in param_shapes(cfg.cell)}
    beta, w = p1["beta"], p1["W"]
    acc, fc, bp, bm, ds, de = (k + j for j in (_BP_ACC, _BP_F, _BP_BP, _BP_BM, _BP_DS, _BP_DE))
    for gate in (gi, gf, go):                                  # the accumulator: gates open, g = h_S + h_E
        beta[gate + acc] = GATE_OPEN
    w[gg + acc, col_h + ds] = w[gg + acc, col_h + de] = 1.0
    for j in (fc, bp, bm):                                     # the copies: forget closed, c ← tanh(h_A + h_S + h_E)
        beta[gi + j], beta[gf + j] = GATE_OPEN, -GATE_OPEN - 10.0
        w[gg + j, col_h + acc] = w[gg + j, col_h + ds] = w[gg + j, col_h + de] = 1.0
        w[go + j, col_u] = 2.0                                 # output gates σ(2u), σ(2u ± η e)
    w[go + bp, col_e], w[go + bm, col_e] = eta, -eta
    for j in (ds, de):                                         # the memories: forget closed, output open
        beta[gf + j] = -GATE_OPEN - 10.0                       # σ(−30 + 5): c is overwritten every micro-step
        beta[go + j] = GATE_OPEN
    beta[gi + ds] = -GATE_I_OFFSET                             # i_S = σ(2u)
    w[gi + ds, col_u] = 2.0
    w[gg + ds, col_e] = -2.0 * eps * alpha
    beta[gi + de] = GATE_OPEN                                  # i_E = 1
    w[gg + de, col_e] = eps * alpha
    p1["W_fwd"][out, fc], p1["W_fwd"][out, acc] = 2.0 / eps, -1.0 / eps
    p1["W_bwd"][cfg.error_idx, bp] = 2.0 * gain / (eta * eps)
    p1["W_bwd"][cfg.error_idx, bm] = -2.0 * gain / (eta * eps)
    sets.append(p1)
    flat = [torch.cat([s[name].flatten() for name, _ in param_shapes(cfg.cell)]) for s in sets]   # 2 x [P]
    return torch.stack(flat).to(dtype)                                                          # [2, P]


def backprop_initial_weights(state) -> list[torch.Tensor]:
    """The MLP weights [w_0, w_1] ([E, A_k, B_k] each) that :func:`backprop_theta` starts from in the VSML state
    ``state``: w_0 = tanh(c_0) of layer 0, w_1 = 0 (for side-by-side runs with the teacher)."""
    return [torch.tanh(state.c[0][..., 0]), torch.zeros_like(state.c[1][..., 0])]


BUILDERS = {"sgd": sgd_theta, "backprop": backprop_theta}
#: the learner config each ``analytic:NAME`` is built for (eval.py's config for it)
DEFAULT_CONFIGS = {"sgd": DEFAULT_CONFIG, "backprop": BACKPROP_CONFIG}
#: the options of each ``analytic:NAME[...]``
OPTIONS = {"sgd": ("alpha", "eps", "boost", "tau"), "backprop": ("alpha", "hidden_alpha", "gain", "eps", "eta")}
_SPEC = re.compile(r"^analytic:(\w+)(?:\[(.*)\])?$")


def is_analytic(spec: str | None) -> bool:
    return bool(spec) and spec.startswith("analytic:")


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``analytic:sgd`` or ``analytic:sgd[alpha=2,eps=0.005]`` -> ("sgd", {"alpha": 2.0, "eps": 0.005})."""
    m = _SPEC.match(spec.strip())
    if not m or m.group(1) not in BUILDERS:
        raise ConfigError(f"unknown analytic learner {spec!r}; use analytic:sgd[alpha=1,eps=0.01] (online SGD) or "
                          f"analytic:backprop[alpha=1,hidden_alpha=0.01] (online backprop, one hidden layer)")
    name, kw = m.group(1), {}
    for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
        key, _, val = item.partition("=")
        if key not in OPTIONS[name]:
            opts = OPTIONS[name]
            raise ConfigError(f"{spec}: unknown option {key!r}; analytic:{name} takes "
                              f"{', '.join(opts[:-1])} and {opts[-1]}")
        try:
            kw[key] = float(val)
        except ValueError:
            raise ConfigError(f"{spec}: {key}={val!r} is not a number") from None
    return name, kw


def resolved_options(spec: str) -> tuple[str, dict[str, float]]:
    """``analytic:NAME[...]`` -> (NAME, every option of its builder, the spec's values over the builder's defaults)."""
    import inspect
    name, kw = parse_spec(spec)
    params = inspect.signature(BUILDERS[name]).parameters
    return name, {k: float(kw.get(k, params[k].default)) for k in OPTIONS[name]}


def default_config(spec: str) -> VSMLConfig:
    """The learner config ``analytic:NAME[...]`` is evaluated in when no other is given."""
    return DEFAULT_CONFIGS[parse_spec(spec)[0]]


def analytic_theta(spec: str, cfg: VSMLConfig) -> torch.Tensor:
    """θ [L, P] of ``analytic:NAME[...]`` for the learner config ``cfg``."""
    name, kw = parse_spec(spec)
    return BUILDERS[name](cfg, **kw)
