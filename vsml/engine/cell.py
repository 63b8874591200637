"""The sub-LSTM cell of a dense VSML layer: gate math, micro-steps and message readouts (vsml.md §1.2-1.3).

Every weight of the host network is one sub-LSTM with state (h, c) ∈ R^N × R^N; all of them share
the cell parameters of one layer (:class:`vsml.engine.params.CellParams`).  Shapes: E episodes,
A inputs, B outputs, N state size, M message size.
"""

from __future__ import annotations

import torch

from vsml.engine.params import CellParams

GATE_I_OFFSET = -5.0
GATE_F_OFFSET = 5.0


# --------------------------------------------------------------------------------------------
# building blocks


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ (+ b) with either a shared weight or one weight per episode.

    x: [E, *, in]; w: [out, in] (shared) or [E, out, in] (per episode); b: [out] or [E, out].
    Returns [E, *, out].
    """
    if w.dim() == 2:
        y = x @ w.t()
        return y if b is None else y + b
    e = x.shape[0]
    xf = x.reshape(e, -1, x.shape[-1])                      # [E, X, in]
    y = torch.bmm(xf, w.transpose(1, 2))                    # [E, X, out]
    if b is not None:
        y = y + b[:, None, :]
    return y.reshape(*x.shape[:-1], w.shape[-2])            # [E, *, out]


def _expand_to_grid(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-episode vector [E, F] -> [E, 1, ..., 1, F] to broadcast against an ndim tensor;
    a shared vector [F] broadcasts as is."""
    if v.dim() == 1:
        return v
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last (message) axis with biased variance (haiku's LayerNorm)."""
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).square().mean(-1, keepdim=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    return y * _expand_to_grid(g, x.dim()) + _expand_to_grid(b, x.dim())


def tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) = 2σ(2x) − 1: one exp instead of the costlier vectorised tanh in fused CPU code
    (equal to torch.tanh to float32 rounding)."""
    return 2.0 * torch.sigmoid(2.0 * x) - 1.0


def gates_to_state(gates: torch.Tensor, c: torch.Tensor, tanh=torch.tanh) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-LSTM state update from its gate pre-activations (§1.2): the one place this math is written.

    gates [..., 4N] in the order i, g, f, o; c [..., N]  ->  h', c' [..., N] with
    c' = σ(f + 5)·c + σ(i − 5)·tanh(g),  h' = σ(o)·tanh(c').
    ``tanh``: ``torch.tanh``, or ``tanh_via_sigmoid`` on the compiled no-grad path.
    """
    gi, gg, gf, go = gates.chunk(4, dim=-1)                 # 4 x [..., N]
    c = torch.sigmoid(gf + GATE_F_OFFSET) * c + torch.sigmoid(gi + GATE_I_OFFSET) * tanh(gg)
    return torch.sigmoid(go) * tanh(c), c


def micro_steps(W_h: torch.Tensor, input_terms: tuple[torch.Tensor, ...], h: torch.Tensor, c: torch.Tensor,
                micro_ticks: int, tanh=torch.tanh) -> tuple[torch.Tensor, torch.Tensor]:
    """``micro_ticks`` sub-LSTM steps with frozen incoming messages, used by the dense layer (eager and
    compiled) and the conv layer.

    gates = h W_hᵀ + Σ input_terms, the input terms (precomputed message projections) broadcasting
    against h [..., N]: the eager dense path passes one materialised term [E, A, B, 4N], the compiled
    path the two unmaterialised ones [E, a, 1, 4N] and [E, 1, B, 4N] (the compiler fuses the
    broadcast), the conv layer one term [E, L, k, k, IC, OC, 4N].  W_h [4N, N] or [E, 4N, N].
    """
    for _ in range(micro_ticks):
        gates = _linear(h, W_h)                             # [..., 4N]
        for term in input_terms:
            gates = gates + term
        h, c = gates_to_state(gates, c, tanh)
    return h, c


def bilinear_gate_term(p: CellParams, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The bilinear cell's update path (``SubLSTMConfig.bilinear``): w_xe · x_a e_b.

    x [E, a] (forward element 0 of the inputs), e [E, B] (backward element 0)  ->  [E, a, B, 4N]."""
    w = p.W_xe if p.W_xe.dim() == 1 else p.W_xe[:, None, None, :]   # [4N] or [E, 1, 1, 4N]
    return (x[:, :, None] * e[:, None, :])[..., None] * w           # [E, a, B, 4N]


def lstm_micro_steps(p: CellParams, fwd_in: torch.Tensor, bwd_in: torch.Tensor, h: torch.Tensor,
                     c: torch.Tensor, micro_ticks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``micro_ticks`` sub-LSTM steps of every pair of a dense layer with frozen messages (§1.2-1.3); the bilinear
    cell adds w_xe·x_a e_b to the gates (:func:`bilinear_gate_term`).

    fwd_in [E, A, M], bwd_in [E, B, M], h, c [E, A, B, N]  ->  h', c' [E, A, B, N]
    (The no-grad compiled path computes the same in ``_chunk_update``.)
    """
    f_term = _linear(fwd_in, p.W_f)                         # [E, A, 4N]
    r_term = _linear(bwd_in, p.W_r, p.beta)                 # [E, B, 4N]  (β folded in)
    x_term = f_term[:, :, None, :] + r_term[:, None, :, :]  # [E, A, B, 4N], fixed for all micro-ticks
    if p.bilinear:
        x_term = x_term + bilinear_gate_term(p, fwd_in[..., 0], bwd_in[..., 0])
    return micro_steps(p.W_h, (x_term,), h, c, micro_ticks)


def _bilinear_needs_x(p: CellParams, x: torch.Tensor | None) -> None:
    if p.bilinear and x is None:
        raise ValueError("the bilinear cell's forward read-out needs the layer input x [E, A] (forward element 0)")


def forward_phi(p: CellParams, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Every sub-LSTM's forward output before LayerNorm: φ_ab = W_fwd h_ab + b_fwd, plus x_a·(W_xφ h_ab + b_xφ)
    in the bilinear cell.  h [E, A, B, N], x [E, A] (forward element 0 of the inputs)  ->  φ [E, A, B, M]."""
    phi = _linear(h, p.W_fwd, p.b_fwd)                      # [E, A, B, M]
    if p.bilinear:
        _bilinear_needs_x(p, x)
        phi = phi + x[:, :, None, None] * _linear(h, p.W_xphi, p.b_xphi)
    return phi


def readout_fwd(p: CellParams, h: torch.Tensor, ln_eps: float, x: torch.Tensor | None = None) -> torch.Tensor:
    """Forward message sent on: →m'_b = mean_a φ_ab, φ = [LN](:func:`forward_phi`).  h [E, A, B, N], x [E, A]
    (bilinear cell only)  ->  [E, B, M].  Without LayerNorm it is mean-then-project (§7.3); the bilinear
    term likewise: mean_a x_a(W_xφ h_ab + b_xφ) = W_xφ mean_a(x_a h_ab) + b_xφ mean_a x_a."""
    if p.ln_fwd_g is None:
        out = _linear(h.mean(1), p.W_fwd, p.b_fwd)          # mean-then-project, [E, B, M]
        if p.bilinear:
            _bilinear_needs_x(p, x)
            xh = (x[:, :, None, None] * h).mean(1)          # [E, B, N]
            out = out + _linear(xh, p.W_xphi) + _expand_to_grid(p.b_xphi, 3) * x.mean(1)[:, None, None]
        return out
    return _layer_norm(forward_phi(p, h, x), p.ln_fwd_g, p.ln_fwd_b, ln_eps).mean(1)


def readout_bwd(p: CellParams, h: torch.Tensor, ln_eps: float) -> torch.Tensor:
    """Backward message sent back: ←m'_a = mean_b ψ_ab.  h [E, A, B, N] -> [E, A, M]."""
    if p.ln_bwd_g is None:
        return _linear(h.mean(2), p.W_bwd, p.b_bwd)         # [E, A, M]
    psi = _linear(h, p.W_bwd, p.b_bwd)                      # [E, A, B, M]
    return _layer_norm(psi, p.ln_bwd_g, p.ln_bwd_b, ln_eps).mean(2)


def layer_update(p: CellParams, fwd_in: torch.Tensor, bwd_in: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                 micro_ticks: int, ln_eps: float):
    """One dense-layer update (§1.3): micro-steps, then both readouts.

    Returns h', c' [E, A, B, N], →m' [E, B, M] (mean over a) and ←m' [E, A, M] (mean over b).
    """
    h, c = lstm_micro_steps(p, fwd_in, bwd_in, h, c, micro_ticks)
    return h, c, readout_fwd(p, h, ln_eps, fwd_in[..., 0]), readout_bwd(p, h, ln_eps)


def _chunk_update(p: CellParams, f_term: torch.Tensor, r_term: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                  micro_ticks: int, ln_eps: float, x: torch.Tensor | None = None, e: torch.Tensor | None = None):
    """The compiled kernel of the no-grad path: micro-steps and readouts of a chunk of inputs a.

    Same arithmetic as ``lstm_micro_steps`` + readouts, except that the message terms are broadcast
    inside every micro-step (never materialised) and tanh is written through σ (one exp), so the
    compiler fuses everything after the h-matmul into one pass over the chunk.

    f_term [E, a, 4N] (this chunk's forward-message term), r_term [E, B, 4N] (with β), h, c [E, a, B, N];
    bilinear cell only: x [E, a] (this chunk's forward element 0), e [E, B] (backward element 0).
    Returns h', c', the chunk's *sum* over a of φ [E, B, M] (the caller divides by A and, without LayerNorm,
    adds b_fwd) and the chunk's ←m' [E, a, M].  Sized so the [E, a, B, 4N] gates stay in cache.
    """
    f4, r4 = f_term[:, :, None, :], r_term[:, None, :, :]    # [E, a, 1, 4N], [E, 1, B, 4N]
    terms = (f4, r4) if not p.bilinear else (f4, r4, bilinear_gate_term(p, x, e))
    h, c = micro_steps(p.W_h, terms, h, c, micro_ticks, tanh_via_sigmoid)   # gates [E, a, B, 4N]
    if p.ln_fwd_g is None:
        fwd_sum = _linear(h.sum(1), p.W_fwd)                 # [E, B, M]  (bias added by the caller)
        if p.bilinear:                                       # Σ_a x_a(W_xφ h_ab + b_xφ)
            fwd_sum = fwd_sum + _linear((x[:, :, None, None] * h).sum(1), p.W_xphi) \
                + _expand_to_grid(p.b_xphi, 3) * x.sum(1)[:, None, None]
        bwd_out = _linear(h.mean(2), p.W_bwd, p.b_bwd)       # [E, a, M]
    else:
        fwd_sum = _layer_norm(forward_phi(p, h, x), p.ln_fwd_g, p.ln_fwd_b, ln_eps).sum(1)
        bwd_out = _layer_norm(_linear(h, p.W_bwd, p.b_bwd), p.ln_bwd_g, p.ln_bwd_b, ln_eps).mean(2)
    return h, c, fwd_sum, bwd_out
