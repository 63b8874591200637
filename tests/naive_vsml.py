"""A deliberately naive VSML written straight from shared/reference/vsml.md (§1.2-1.5, §1.11).

Independent of ``vsml.engine.network``: one Python call per sub-LSTM per micro-step, the LSTM input is
the explicit concatenation [fwd msg, bwd msg, h] times the full 64x32 matrix, readouts are
computed per pair and then averaged, one episode at a time.  Used only by the tests, on tiny
shapes, in float64.
"""

from __future__ import annotations

import torch


def split_theta(vec, n=16, m=8, layer_norm=False, bilinear=False):
    """Flat θ set -> dict, in the documented storage order."""
    sizes = [("W", (4 * n, 2 * m + n)), ("beta", (4 * n,)), ("W_fwd", (m, n)), ("b_fwd", (m,)),
             ("W_bwd", (m, n)), ("b_bwd", (m,))]
    if layer_norm:
        sizes += [("g_f", (m,)), ("o_f", (m,)), ("g_b", (m,)), ("o_b", (m,))]
    if bilinear:
        sizes += [("w_xe", (4 * n,)), ("W_xphi", (m, n)), ("b_xphi", (m,))]
    out, off = {}, 0
    for name, shape in sizes:
        cnt = 1
        for s in shape:
            cnt *= s
        out[name] = vec[off:off + cnt].reshape(shape)
        off += cnt
    assert off == vec.numel(), (off, vec.numel())
    return out


def ln(v, g, o, eps=1e-5):
    mu = v.mean()
    var = ((v - mu) ** 2).mean()
    return (v - mu) / torch.sqrt(var + eps) * g + o


def sub_lstm_step(P, f, r, h, c, n):
    u = torch.cat([f, r, h])
    z = P["W"] @ u + P["beta"]
    if "w_xe" in P:                                   # bilinear cell: + w_xe · x_a e_b
        z = z + P["w_xe"] * (f[0] * r[0])
    i = torch.sigmoid(z[0:n] - 5)
    g = torch.tanh(z[n:2 * n])
    fg = torch.sigmoid(z[2 * n:3 * n] + 5)
    o = torch.sigmoid(z[3 * n:4 * n])
    c2 = fg * c + i * g
    h2 = o * torch.tanh(c2)
    return h2, c2


def readouts(P, h, layer_norm, x=None):
    phi = P["W_fwd"] @ h + P["b_fwd"]
    if "W_xphi" in P:                                 # bilinear cell: + x_a (W_xφ h + b_xφ)
        phi = phi + x * (P["W_xphi"] @ h + P["b_xphi"])
    psi = P["W_bwd"] @ h + P["b_bwd"]
    if layer_norm:
        phi = ln(phi, P["g_f"], P["o_f"])
        psi = ln(psi, P["g_b"], P["o_b"])
    return phi, psi


def layer_update(P, fwd_in, bwd_in, H, C, micro, layer_norm, n, m):
    """fwd_in [A][M], bwd_in [B][M], H/C nested lists [A][B] of [N] tensors (updated in place)."""
    A, B = len(H), len(H[0])
    phis = [[None] * B for _ in range(A)]
    psis = [[None] * B for _ in range(A)]
    for a in range(A):
        for b in range(B):
            h, c = H[a][b], C[a][b]
            for _ in range(micro):
                h, c = sub_lstm_step(P, fwd_in[a], bwd_in[b], h, c, n)
            H[a][b], C[a][b] = h, c
            phis[a][b], psis[a][b] = readouts(P, h, layer_norm, fwd_in[a][0])
    fwd_out = [sum(phis[a][b] for a in range(A)) / A for b in range(B)]
    bwd_out = [sum(psis[a][b] for b in range(B)) / B for a in range(A)]
    return fwd_out, bwd_out


def naive_episode(thetas, x, y, num_classes, h0, c0, *, micro=2, backward_pass=False, feed_label=False,
                  layer_norm=False, n=16, m=8, bound=100.0, bilinear=False):
    """One episode.  thetas: list of flat θ sets, one per layer (repeat the same for shared θ).
    x [T, D], y [T]; h0, c0: lists over layers of [A, B, N] initial states.  Returns logits [T, C]."""
    K = len(h0)
    Ps = [split_theta(t, n, m, layer_norm, bilinear) for t in thetas]
    H = [[[h0[k][a, b].clone() for b in range(h0[k].shape[1])] for a in range(h0[k].shape[0])] for k in range(K)]
    C = [[[c0[k][a, b].clone() for b in range(c0[k].shape[1])] for a in range(c0[k].shape[0])] for k in range(K)]
    dt = x.dtype
    bwd = [[torch.zeros(m, dtype=dt) for _ in range(h0[k].shape[1])] for k in range(K)]
    out = []
    for t in range(x.shape[0]):
        fwd = [torch.zeros(m, dtype=dt) for _ in range(x.shape[1])]
        for a in range(x.shape[1]):
            fwd[a][0] = x[t, a]
        if not backward_pass:
            for k in range(K):
                fo, bo = layer_update(Ps[k], fwd, bwd[k], H[k], C[k], micro, layer_norm, n, m)
                if k > 0:
                    bwd[k - 1] = bo
                fwd = fo
        else:
            ins = []
            for k in range(K):
                ins.append(fwd)
                fwd, _ = layer_update(Ps[k], fwd, bwd[k], H[k], C[k], micro, layer_norm, n, m)
        logits = torch.stack([bound * torch.tanh(fwd[b][1] / bound) for b in range(num_classes)])
        out.append(logits)
        p = torch.softmax(logits, 0)
        errmsg = []
        for b in range(num_classes):
            v = torch.zeros(m, dtype=dt)
            v[0] = p[b] - (1.0 if b == int(y[t]) else 0.0)
            if feed_label:
                v[1] = 1.0 if b == int(y[t]) else 0.0
            errmsg.append(v)
        if not backward_pass:
            bwd[K - 1] = errmsg
        else:
            msg = errmsg
            for k in range(K - 1, -1, -1):
                _, bo = layer_update(Ps[k], ins[k], msg, H[k], C[k], micro, layer_norm, n, m)
                if k > 0:
                    bwd[k - 1] = bo
                    msg = bo
            bwd[K - 1] = [torch.zeros(m, dtype=dt) for _ in range(num_classes)]
    return torch.stack(out)
