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


BUILDERS = {"sgd": sgd_theta}
_SPEC = re.compile(r"^analytic:(\w+)(?:\[(.*)\])?$")


def is_analytic(spec: str | None) -> bool:
    return bool(spec) and spec.startswith("analytic:")


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``analytic:sgd`` or ``analytic:sgd[alpha=2,eps=0.005]`` -> ("sgd", {"alpha": 2.0, "eps": 0.005})."""
    m = _SPEC.match(spec.strip())
    if not m or m.group(1) not in BUILDERS:
        raise ConfigError(f"unknown analytic learner {spec!r}; use analytic:sgd or analytic:sgd[alpha=1,eps=0.01]")
    kw = {}
    for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
        key, _, val = item.partition("=")
        if key not in ("alpha", "eps", "boost", "tau"):
            raise ConfigError(f"{spec}: unknown option {key!r}; analytic:sgd takes alpha, eps, boost and tau")
        try:
            kw[key] = float(val)
        except ValueError:
            raise ConfigError(f"{spec}: {key}={val!r} is not a number") from None
    return m.group(1), kw


def analytic_theta(spec: str, cfg: VSMLConfig) -> torch.Tensor:
    """θ [L, P] of ``analytic:NAME[...]`` for the learner config ``cfg``."""
    name, kw = parse_spec(spec)
    return BUILDERS[name](cfg, **kw)
