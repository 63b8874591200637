"""Fused Triton kernel: all ticks of an online VSML episode chunk in one launch.

``fused_unroll(cfg, theta, x, y, state)`` has the semantics of ``VSMLNetwork.unroll`` (vsml/engine/network.py)
for a given state: T examples x K dense layers x micro-ticks x every sub-LSTM of every episode run
inside one kernel launch; per-example logits (and the cross-entropy) come out, and the final state.
Design, limits, roofline and precision notes: ``kernels/README.md``.  In short:

* grid = (E,): **one program per episode**.  It loops over time, over layers (forward sweep, and the
  reverse sweep with ``backward_pass``), over a-tiles of BA inputs and, inside, over the B outputs.
  A tile is ``[BA, N]``: the sub-LSTMs (a0..a0+BA-1, b), so padding is only ever on the a axis.
* The sub-LSTM state h, c lives in **global memory** (flat layer-major buffers, so each layer's
  ``[E, A_k, B_k, N]`` block is a contiguous view); a tile loads h, c once per layer update, runs all
  ``micro_ticks`` micro-steps in registers (messages are frozen within an update) and stores them once.
* Gates = F[a] + R[b] + h W_h^T: F = fwd_in W_f^T once per a-tile, R = bwd_in W_r^T + β once per layer
  update (in scratch), four [BA, N] x [N, N] gate dots per micro-step (``tl.dot``, or a broadcast-sum
  fallback with ``use_dot=False``).  Sizes are padded to powers of two (>= 16 for tl.dot), masked.
* The bilinear cell (``SubLSTMConfig.bilinear``, constexpr ``BILINEAR``): with x_a = fwd_in[a, 0] (loaded
  once per a-tile) and e_b = bwd_in[b, 0] (one scalar per b), the frozen gate term gains w_xe · x_a e_b
  before the micro-steps, and the per-pair forward read-out φ gains x_a (W_xφ h + b_xφ) before LayerNorm.
  Without it the kernel compiles to the plain code.
* Messages live in a small per-episode scratch (slot 0 = embedded x_t, slot k = output of layer k-1,
  slot K -> logits; plus R) and in the state's ``bwd`` buffer.  Mean over a: load-add-store into the
  output slot per (a-tile, b); mean over b: a register accumulator per a-tile.  ``tl.debug_barrier()``
  orders every write of one phase before the reads of the next (all within one program).

Run on CPU only under the Triton interpreter: ``TRITON_INTERPRET=1`` must be in the environment before
this module is imported (tests only; slow).  Without CUDA and without the interpreter ``fused_unroll``
raises ``RuntimeError`` saying so.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from vsml.engine.config import VSMLConfig
from vsml.engine.params import theta_size
from vsml.engine.state import VSMLState

try:  # keep this module importable without triton (the torch backend never needs it)
    import triton
    import triton.language as tl
    HAS_TRITON = True
    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = exc

#: TRITON_INTERPRET as it was when this module (and its @triton.jit kernels) was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Largest class count the logits/softmax vector handles (a [next_pow2(C)] register vector).
MAX_CLASSES = 4096
#: Largest hidden size N and message size M (tiles are [pairs, next_pow2(N)] register blocks).
MAX_HIDDEN = 64
MAX_MSG = 32
PRECISIONS = ("ieee", "tf32", "tf32x3")


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


# ------------------------------------------------------------------------------------------------
# kernels

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        """tanh without tl.tanh/libdevice (absent or broken under the interpreter): an odd series near
        0 (keeps relative accuracy for tiny x, e.g. m / tanh_bound) and (1 - e) / (1 + e), e = exp(-2|x|)."""
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        x2 = ax * ax
        small = ax * (1.0 + x2 * (-0.33333333333333333 + x2 * 0.13333333333333333))
        r = tl.where(ax < 0.05, small, big)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _mm(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """[R, K] @ [K, Q] -> [R, Q] in fp32: tl.dot (tensor cores unless PRECISION='ieee') or a
        broadcast-multiply-sum fallback (CUDA cores, no minimum sizes)."""
        if USE_DOT:
            return tl.dot(a, b, input_precision=PRECISION)
        else:
            return tl.sum(a[:, :, None] * b[None, :, :], axis=1)

    @triton.jit
    def _mm4(a, b_i, b_g, b_f, b_o, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """a @ each of the four gate blocks (one call: nested jit calls are slow under the interpreter)."""
        if USE_DOT:
            return (tl.dot(a, b_i, input_precision=PRECISION), tl.dot(a, b_g, input_precision=PRECISION),
                    tl.dot(a, b_f, input_precision=PRECISION), tl.dot(a, b_o, input_precision=PRECISION))
        else:
            return (tl.sum(a[:, :, None] * b_i[None, :, :], axis=1),
                    tl.sum(a[:, :, None] * b_g[None, :, :], axis=1),
                    tl.sum(a[:, :, None] * b_f[None, :, :], axis=1),
                    tl.sum(a[:, :, None] * b_o[None, :, :], axis=1))

    @triton.jit
    def _cell(h, c, x_i, x_g, x_f, x_o, w_i, w_g, w_f, w_o,
              MICRO: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """MICRO sub-LSTM micro-steps with the message terms x_* = F[a] + R[b] (incl. β) frozen:
        c' = σ(f̃ + 5) c + σ(ĩ - 5) tanh(g̃),  h' = σ(õ) tanh(c').  tanh is inlined as in _tanh."""
        for _ in tl.static_range(MICRO):
            # the four gate dots, inline (each nested jit call costs ~1 ms under the interpreter)
            if USE_DOT:
                g_i = tl.dot(h, w_i, input_precision=PRECISION)
                g_g = tl.dot(h, w_g, input_precision=PRECISION)
                g_f = tl.dot(h, w_f, input_precision=PRECISION)
                g_o = tl.dot(h, w_o, input_precision=PRECISION)
            else:
                g_i = tl.sum(h[:, :, None] * w_i[None, :, :], axis=1)
                g_g = tl.sum(h[:, :, None] * w_g[None, :, :], axis=1)
                g_f = tl.sum(h[:, :, None] * w_f[None, :, :], axis=1)
                g_o = tl.sum(h[:, :, None] * w_o[None, :, :], axis=1)
            g_g = g_g + x_g
            ag = tl.abs(g_g)
            eg = tl.exp(-2.0 * ag)
            sg = ag * ag
            tg = tl.where(ag < 0.05, ag * (1.0 + sg * (-0.33333333333333333 + sg * 0.13333333333333333)),
                          (1.0 - eg) / (1.0 + eg))
            tg = tl.where(g_g < 0, -tg, tg)
            c = tl.sigmoid(g_f + x_f + 5.0) * c + tl.sigmoid(g_i + x_i - 5.0) * tg
            ac = tl.abs(c)
            ec = tl.exp(-2.0 * ac)
            sc = ac * ac
            tc = tl.where(ac < 0.05, ac * (1.0 + sc * (-0.33333333333333333 + sc * 0.13333333333333333)),
                          (1.0 - ec) / (1.0 + ec))
            tc = tl.where(c < 0, -tc, tc)
            h = tl.sigmoid(g_o + x_o) * tc
        return h, c

    @triton.jit
    def _readout(h, w_t, bias, extra, ln_g, ln_b, ln_eps, rmask, M: tl.constexpr, MP: tl.constexpr,
                 LAYER_NORM: tl.constexpr, EXTRA: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """φ = [LN](h W^T + b [+ extra]) per row [R, MP]; padded message columns and rows outside rmask are 0.
        ``extra`` [R, MP] (only with the constexpr EXTRA; pass 0.0 otherwise) is added before LayerNorm: the
        bilinear cell's x_a (W_xφ h + b_xφ)."""
        if USE_DOT:
            v = tl.dot(h, w_t, input_precision=PRECISION) + bias[None, :]
        else:
            v = tl.sum(h[:, :, None] * w_t[None, :, :], axis=1) + bias[None, :]
        if EXTRA:
            v = v + extra
        if LAYER_NORM:
            mm = (tl.arange(0, MP) < M)[None, :]
            mu = tl.sum(tl.where(mm, v, 0.0), axis=1) / M
            d = tl.where(mm, v - mu[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / M
            v = d * tl.rsqrt(var + ln_eps)[:, None] * ln_g[None, :] + ln_b[None, :]
        return tl.where(rmask[:, None], v, 0.0)

    @triton.jit
    def _layer_update(e, k, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, rbuf, write_fwd, write_bwd, ln_eps,
                      N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                      BA: tl.constexpr, BR: tl.constexpr, MICRO: tl.constexpr,
                      LAYER_NORM: tl.constexpr, BILINEAR: tl.constexpr, USE_DOT: tl.constexpr,
                      PRECISION: tl.constexpr):
        """One update of dense layer k of episode e: MICRO micro-steps of every (a, b) pair with the
        incoming messages frozen; then, if asked, the forward message mean_a φ into the scratch slot of
        layer k+1 and the backward message mean_b ψ into the backward-message slot of layer k-1.
        BILINEAR (the bilinear cell): gates += w_xe · x_a e_b and φ += x_a (W_xφ h + b_xφ), with
        x_a = fwd_in[a, 0] and e_b = bwd_in[b, 0].

        Tiles are BA consecutive inputs a (the rows of every tl.dot) for one output b; the loop runs
        over a-tiles (outer) and over b = 0..B-1 (inner, runtime), so no lane is wasted on padding b
        (B = 10 classes is not a power of two).  Per pair gates = F[a] + R[b] + h W_h^T, where
        F = fwd_in W_f^T is computed once per a-tile and R = bwd_in W_r^T + β once per layer update."""
        mrow = meta_ptr + k * 8
        A = tl.load(mrow + 0)
        B = tl.load(mrow + 1)
        h_off = tl.load(mrow + 2)
        bwd_off = tl.load(mrow + 3)
        bwdp_off = tl.load(mrow + 4)
        fin_off = tl.load(mrow + 5)
        fout_off = tl.load(mrow + 6)
        th_off = tl.load(mrow + 7)

        h_base = h_ptr + h_off + e * (A * B * N)
        c_base = c_ptr + h_off + e * (A * B * N)
        bwd_in = bwd_ptr + bwd_off + e * (B * M)          # [B, M] backward message into this layer
        bwd_out = bwd_ptr + bwdp_off + e * (A * M)        # [A, M] backward message into layer k-1
        fwd_in = scr + fin_off                            # [A, M]
        fwd_out = scr + fout_off                          # [B, M]
        w = th + th_off                                   # this layer's θ set

        WROW: tl.constexpr = 2 * M + N
        OFF_BETA: tl.constexpr = 4 * N * WROW
        OFF_WF: tl.constexpr = OFF_BETA + 4 * N
        OFF_BF: tl.constexpr = OFF_WF + M * N
        OFF_WB: tl.constexpr = OFF_BF + M
        OFF_BB: tl.constexpr = OFF_WB + M * N
        OFF_LN: tl.constexpr = OFF_BB + M
        # bilinear values, stored last (after the LayerNorm values when there are any): W_xe [4N], W_xphi [M, N],
        # b_xphi [M]
        OFF_XE: tl.constexpr = OFF_LN + 4 * M * LAYER_NORM
        OFF_XPHI: tl.constexpr = OFF_XE + 4 * N
        OFF_BXPHI: tl.constexpr = OFF_XPHI + M * N
        G4: tl.constexpr = 4 * N

        offs_n = tl.arange(0, NP)
        offs_k = tl.arange(0, NP)
        offs_m = tl.arange(0, MP)
        offs_j = tl.arange(0, MP)
        nmask = offs_n < N
        mmask = offs_m < M
        do_fwd = write_fwd != 0
        do_bwd = write_bwd != 0

        # ---- phase 1: R[b, g*N + n] = β[g*N + n] + Σ_j bwd_in[b, j] W[g*N + n, M + j]  (scratch) ----
        wr_ptrs = w + offs_n[None, :] * WROW + M + offs_j[:, None]        # [MP, NP], (j, n)
        wr_mask = (offs_j[:, None] < M) & nmask[None, :]
        offs_r = tl.arange(0, BR)
        for r0 in range(0, B, BR):
            rows = r0 + offs_r
            rmask = rows < B
            bw = tl.load(bwd_in + rows[:, None] * M + offs_m[None, :],
                         mask=rmask[:, None] & mmask[None, :], other=0.0)
            r_ptrs = rbuf + rows[:, None] * G4 + offs_n[None, :]
            r_mask = rmask[:, None] & nmask[None, :]
            for g in tl.static_range(4):
                wr = tl.load(wr_ptrs + g * N * WROW, mask=wr_mask, other=0.0)
                beta = tl.load(w + OFF_BETA + g * N + offs_n, mask=nmask, other=0.0)
                tl.store(r_ptrs + g * N, _mm(bw, wr, USE_DOT, PRECISION) + beta[None, :], mask=r_mask)
        tl.debug_barrier()

        # ---- θ blocks used by every tile (transposed: [in, out]) ----
        # W_f^T gate g: [MP, NP], element (j, n) = W[g*N + n, j]
        wf_ptrs = w + offs_n[None, :] * WROW + offs_j[:, None]
        wf_i = tl.load(wf_ptrs + 0 * N * WROW, mask=wr_mask, other=0.0)
        wf_g = tl.load(wf_ptrs + 1 * N * WROW, mask=wr_mask, other=0.0)
        wf_f = tl.load(wf_ptrs + 2 * N * WROW, mask=wr_mask, other=0.0)
        wf_o = tl.load(wf_ptrs + 3 * N * WROW, mask=wr_mask, other=0.0)
        # W_h^T gate g: [NP, NP], element (kk, n) = W[g*N + n, 2M + kk]
        wh_ptrs = w + offs_n[None, :] * WROW + 2 * M + offs_k[:, None]
        wh_mask = (offs_k[:, None] < N) & nmask[None, :]
        wh_i = tl.load(wh_ptrs + 0 * N * WROW, mask=wh_mask, other=0.0)
        wh_g = tl.load(wh_ptrs + 1 * N * WROW, mask=wh_mask, other=0.0)
        wh_f = tl.load(wh_ptrs + 2 * N * WROW, mask=wh_mask, other=0.0)
        wh_o = tl.load(wh_ptrs + 3 * N * WROW, mask=wh_mask, other=0.0)
        # readouts W^T: [NP, MP], element (n, m) = W_[m, n]
        ro_ptrs = offs_m[None, :] * N + offs_k[:, None]
        ro_mask = (offs_k[:, None] < N) & mmask[None, :]
        wo_f = tl.load(w + OFF_WF + ro_ptrs, mask=ro_mask, other=0.0)
        wo_b = tl.load(w + OFF_WB + ro_ptrs, mask=ro_mask, other=0.0)
        bo_f = tl.load(w + OFF_BF + offs_m, mask=mmask, other=0.0)
        bo_b = tl.load(w + OFF_BB + offs_m, mask=mmask, other=0.0)
        ln_mask = mmask & LAYER_NORM                      # no LN parameters in θ without LayerNorm
        lnf_g = tl.load(w + OFF_LN + 0 * M + offs_m, mask=ln_mask, other=0.0)
        lnf_b = tl.load(w + OFF_LN + 1 * M + offs_m, mask=ln_mask, other=0.0)
        lnb_g = tl.load(w + OFF_LN + 2 * M + offs_m, mask=ln_mask, other=0.0)
        lnb_b = tl.load(w + OFF_LN + 3 * M + offs_m, mask=ln_mask, other=0.0)
        if BILINEAR:
            # w_xe per gate block g: [NP], element n = W_xe[g*N + n]
            xe_i = tl.load(w + OFF_XE + 0 * N + offs_n, mask=nmask, other=0.0)
            xe_g = tl.load(w + OFF_XE + 1 * N + offs_n, mask=nmask, other=0.0)
            xe_f = tl.load(w + OFF_XE + 2 * N + offs_n, mask=nmask, other=0.0)
            xe_o = tl.load(w + OFF_XE + 3 * N + offs_n, mask=nmask, other=0.0)
            # W_xphi^T: [NP, MP], element (n, m) = W_xphi[m, n]; b_xphi [MP]
            wx_t = tl.load(w + OFF_XPHI + ro_ptrs, mask=ro_mask, other=0.0)
            bx = tl.load(w + OFF_BXPHI + offs_m, mask=mmask, other=0.0)

        offs_a = tl.arange(0, BA)
        inv_a = 1.0 / A.to(tl.float32)
        inv_b = 1.0 / B.to(tl.float32)
        for at in range(tl.cdiv(A, BA)):
            a = at * BA + offs_a
            amask = a < A
            fin = tl.load(fwd_in + a[:, None] * M + offs_m[None, :],
                          mask=amask[:, None] & mmask[None, :], other=0.0)          # [BA, MP]
            f_i, f_g, f_f, f_o = _mm4(fin, wf_i, wf_g, wf_f, wf_o, USE_DOT, PRECISION)  # [BA, NP] each
            if BILINEAR:
                xa = tl.load(fwd_in + a * M, mask=amask, other=0.0)                # [BA]: x_a = fwd_in[a, 0]
            row_ptrs = a.to(tl.int64)[:, None] * (B * N) + offs_n[None, :]       # pair (a, 0)
            s_mask = amask[:, None] & nmask[None, :]
            acc_b = tl.zeros([BA, MP], dtype=tl.float32)
            for b in range(B):
                r_i = tl.load(rbuf + b * G4 + 0 * N + offs_n, mask=nmask, other=0.0)
                r_g = tl.load(rbuf + b * G4 + 1 * N + offs_n, mask=nmask, other=0.0)
                r_f = tl.load(rbuf + b * G4 + 2 * N + offs_n, mask=nmask, other=0.0)
                r_o = tl.load(rbuf + b * G4 + 3 * N + offs_n, mask=nmask, other=0.0)
                s_ptrs = row_ptrs + b * N
                h = tl.load(h_base + s_ptrs, mask=s_mask, other=0.0)
                c = tl.load(c_base + s_ptrs, mask=s_mask, other=0.0)
                # frozen message terms F[a] + R[b] (+ w_xe x_a e_b): [BA, NP] per gate
                x_i = f_i + r_i[None, :]
                x_g = f_g + r_g[None, :]
                x_f = f_f + r_f[None, :]
                x_o = f_o + r_o[None, :]
                if BILINEAR:
                    eb = tl.load(bwd_in + b * M)                                   # scalar: e_b = bwd_in[b, 0]
                    xe = (xa * eb)[:, None]                                        # [BA, 1]: x_a e_b
                    x_i += xe * xe_i[None, :]
                    x_g += xe * xe_g[None, :]
                    x_f += xe * xe_f[None, :]
                    x_o += xe * xe_o[None, :]
                h, c = _cell(h, c, x_i, x_g, x_f, x_o, wh_i, wh_g, wh_f, wh_o, MICRO, USE_DOT, PRECISION)
                tl.store(h_base + s_ptrs, h, mask=s_mask)
                tl.store(c_base + s_ptrs, c, mask=s_mask)
                if do_fwd:
                    if BILINEAR:   # x_a (W_xφ h + b_xφ): [BA, NP] x [NP, MP] -> [BA, MP], added before LN
                        xphi = xa[:, None] * (_mm(h, wx_t, USE_DOT, PRECISION) + bx[None, :])
                    else:
                        xphi = 0.0
                    phi = _readout(h, wo_f, bo_f, xphi, lnf_g, lnf_b, ln_eps, amask, M, MP, LAYER_NORM,
                                   BILINEAR, USE_DOT, PRECISION)                   # [BA, MP]
                    part = tl.sum(phi, axis=0) * inv_a                             # [MP]
                    # mean over a: accumulated across a-tiles in the output slot (barrier per a-tile)
                    o_ptrs = fwd_out + b * M + offs_m
                    prev = tl.load(o_ptrs, mask=mmask & (at > 0), other=0.0)
                    tl.store(o_ptrs, prev + part, mask=mmask)
                if do_bwd:
                    acc_b += _readout(h, wo_b, bo_b, 0.0, lnb_g, lnb_b, ln_eps, amask, M, MP, LAYER_NORM,
                                      False, USE_DOT, PRECISION)                   # mean over b
            if do_bwd:
                tl.store(bwd_out + a[:, None] * M + offs_m[None, :], acc_b * inv_b,
                         mask=amask[:, None] & mmask[None, :])
            tl.debug_barrier()

    @triton.jit
    def vsml_episode_fwd_kernel(
        x_ptr, y_ptr, theta_ptr, h_ptr, c_ptr, bwd_ptr, scr_ptr, logits_ptr, loss_ptr, meta_ptr,
        T, D, C, K, theta_estride, scr_estride, r_off, tanh_bound, logit_scale, ln_eps,
        N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
        BA: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr,
        MICRO: tl.constexpr, BACKWARD: tl.constexpr, LAYER_NORM: tl.constexpr, FEED_LABEL: tl.constexpr,
        IN_IDX: tl.constexpr, OUT_IDX: tl.constexpr, ERR_IDX: tl.constexpr, LBL_IDX: tl.constexpr,
        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BILINEAR: tl.constexpr,
    ):
        """One program = one episode, all T ticks.  See the module docstring and kernels/README.md."""
        e = tl.program_id(0).to(tl.int64)
        th = theta_ptr + e * theta_estride
        scr = scr_ptr + e * scr_estride
        rbuf = scr + r_off                    # [max B, 4N]: R = bwd_in W_r^T + β of the current layer
        offs_m = tl.arange(0, MP)
        mmask = offs_m < M
        offs_x = tl.arange(0, BX)
        offs_c = tl.arange(0, BC)
        cmask = offs_c < C
        # last layer: where its forward output (the logits' source) and its error input live
        last = meta_ptr + (K - 1) * 8
        err_base = bwd_ptr + tl.load(last + 3) + e * (C * M)
        out_slot = scr + tl.load(last + 6)

        for t in range(T):
            row = e * T + t
            # ---- x_t -> forward messages into layer 1 (scratch slot 0): (x_a, 0, ..., 0) ----
            for d0 in range(0, D, BX):
                offs_d = d0 + offs_x
                dmask = offs_d < D
                xv = tl.load(x_ptr + row * D + offs_d, mask=dmask, other=0.0)
                v = tl.where(offs_m[None, :] == IN_IDX, xv[:, None], 0.0)
                tl.store(scr + offs_d[:, None] * M + offs_m[None, :], v, mask=dmask[:, None] & mmask[None, :])
            tl.debug_barrier()

            # ---- forward sweep ----
            for k in range(K):
                # write_bwd is k (non-zero iff k > 0: layer 1's backward message is dropped); in
                # backward-pass mode only the reverse sweep sends backward messages
                wb = 0 if BACKWARD else k
                _layer_update(e, k, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, rbuf, 1, wb, ln_eps,
                              N, M, NP, MP, BA, BR, MICRO, LAYER_NORM, BILINEAR, USE_DOT, PRECISION)
                tl.debug_barrier()

            # ---- logits, loss, error message (e, λ·y) into the last layer's backward input ----
            mo = tl.load(out_slot + offs_c * M + OUT_IDX, mask=cmask, other=0.0)
            lg = tanh_bound * _tanh(mo * logit_scale / tanh_bound)   # VSMLConfig.logit_scale κ
            tl.store(logits_ptr + row * C + offs_c, lg, mask=cmask)
            yt = tl.load(y_ptr + row)
            is_y = offs_c == yt
            mx = tl.max(tl.where(cmask, lg, float("-inf")), axis=0)
            ex = tl.where(cmask, tl.exp(lg - mx), 0.0)
            s = tl.sum(ex, axis=0)
            onehot = tl.where(is_y, 1.0, 0.0)
            err = ex / s - onehot
            loss = tl.log(s) + mx - tl.sum(tl.where(is_y & cmask, lg, 0.0), axis=0)
            tl.store(loss_ptr + row, loss)
            msg = tl.where(offs_m[None, :] == ERR_IDX, err[:, None], 0.0)
            if FEED_LABEL:
                msg += tl.where(offs_m[None, :] == LBL_IDX, onehot[:, None], 0.0)
            e_ptrs = err_base + offs_c[:, None] * M + offs_m[None, :]
            e_mask = cmask[:, None] & mmask[None, :]
            tl.store(e_ptrs, msg, mask=e_mask)
            tl.debug_barrier()

            if BACKWARD:
                # ---- reverse sweep K..1: the error enters the last layer and moves down at once ----
                for kk in range(K):
                    k2 = K - 1 - kk
                    _layer_update(e, k2, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, rbuf, 0, k2, ln_eps,
                                  N, M, NP, MP, BA, BR, MICRO, LAYER_NORM, BILINEAR, USE_DOT, PRECISION)
                    tl.debug_barrier()
                # error reset after the sweep
                tl.store(e_ptrs, tl.zeros([BC, MP], dtype=tl.float32), mask=e_mask)
                tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
# host side


class FusedResult(NamedTuple):
    logits: torch.Tensor   # [E, T, C]
    loss: torch.Tensor     # [E, T] cross-entropy computed in the kernel
    state: VSMLState


def fused_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the fused kernel can run on ``device``; the reason when it cannot."""
    if not HAS_TRITON:
        return False, f"triton is not importable ({_TRITON_IMPORT_ERROR!r}); pip install 'vsml[triton]'"
    dev = torch.device(device) if device is not None else None
    if INTERPRET:
        return True, "Triton interpreter (TRITON_INTERPRET=1 at import): runs on CPU, slow"
    if dev is not None and dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "a CUDA device was requested but torch.cuda.is_available() is False"
        return True, "CUDA"
    why = f"device {dev}" if dev is not None else "no CUDA device"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, (f"{why}: TRITON_INTERPRET=1 was set only after kernels.vsml_fused was imported; "
                       f"Triton reads it when the kernels are decorated, so set it before the import")
    return False, (f"{why}: the fused Triton kernel needs a CUDA GPU; to run it on CPU (slowly, for "
                   f"testing) set TRITON_INTERPRET=1 in the environment before importing kernels, "
                   f"or use backend='torch'")


def _fail(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


def _check_tensor(name: str, t, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> None:
    _fail(torch.is_tensor(t), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _fail(t.dtype == dtype, TypeError, f"{name} must have dtype {dtype} for the fused kernel, got {t.dtype}")
    _fail(tuple(t.shape) == tuple(shape), ValueError,
          f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    _fail(t.device == device, ValueError, f"{name} is on {t.device} but x is on {device}; "
                                          f"all inputs must be on one device")
    _fail(t.is_contiguous(), ValueError, f"{name} must be contiguous for the fused kernel "
                                         f"(call .contiguous() first); strides {t.stride()}")


def _validate(cfg: VSMLConfig, theta, x, y, state,
              check_labels: bool = True) -> tuple[int, int, int, int, list[tuple[int, int]]]:
    _fail(isinstance(cfg, VSMLConfig), TypeError, f"cfg must be a VSMLConfig, got {type(cfg).__name__}")
    _fail(not cfg.conv, NotImplementedError, "the fused kernel covers dense VSML layers only; conv layers "
          f"({', '.join(map(str, cfg.conv))}) run on the PyTorch path (VSMLNetwork, vsml/engine/conv.py)")
    _fail(not cfg.bwd_reset, NotImplementedError, "the fused kernel does not implement VSMLConfig.bwd_reset; "
          "use the PyTorch path (VSMLNetwork)")
    _fail(isinstance(state, VSMLState), TypeError,
          f"state must be a VSMLState (e.g. net.init_state(...)), got {type(state).__name__}")
    _fail(torch.is_tensor(x), TypeError, f"x must be a torch.Tensor [E, T, D], got {type(x).__name__}")
    _fail(x.dim() == 3, ValueError, f"x must have shape [E, T, D], got {list(x.shape)}")
    e, t_len, d = x.shape
    dev = x.device
    ok, why = fused_available(dev)
    _fail(ok, RuntimeError, f"fused backend cannot run: {why}")
    _fail(e >= 1 and d >= 1, ValueError, f"x must have E >= 1 and D >= 1, got {list(x.shape)}")
    _check_tensor("x", x, torch.float32, (e, t_len, d), dev)
    _check_tensor("y", y, torch.int64, (e, t_len), dev)
    k_layers = cfg.num_layers
    _fail(len(state.h) == k_layers and len(state.c) == k_layers and len(state.bwd) == k_layers, ValueError,
          f"state has {len(state.h)}/{len(state.c)}/{len(state.bwd)} layers (h/c/bwd) but the config has "
          f"{k_layers} layers")
    num_classes = state.h[-1].shape[2] if state.h[-1].dim() == 4 else -1
    _fail(2 <= num_classes <= MAX_CLASSES, ValueError,
          f"the state's class count must lie in [2, {MAX_CLASSES}], got {num_classes}")
    n, m = cfg.cell.hidden, cfg.cell.msg
    _fail(n <= MAX_HIDDEN and m <= MAX_MSG, ValueError,
          f"fused kernel supports hidden <= {MAX_HIDDEN} and msg <= {MAX_MSG}, got N={n}, M={m}")
    dims = cfg.layer_dims(d, num_classes)
    for k, (a, b) in enumerate(dims):
        _check_tensor(f"state.h[{k}]", state.h[k], torch.float32, (e, a, b, n), dev)
        _check_tensor(f"state.c[{k}]", state.c[k], torch.float32, (e, a, b, n), dev)
        _check_tensor(f"state.bwd[{k}]", state.bwd[k], torch.float32, (e, b, m), dev)
    p, l_sets = theta_size(cfg.cell), cfg.num_theta_sets
    _fail(torch.is_tensor(theta), TypeError, f"θ must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() == 2:
        _check_tensor("θ (shared)", theta, torch.float32, (l_sets, p), dev)
    else:
        _check_tensor("θ (per-episode)", theta, torch.float32, (e, l_sets, p), dev)
    if check_labels and y.numel():
        lo, hi = int(y.min()), int(y.max())
        _fail(lo >= 0 and hi < num_classes, ValueError,
              f"labels must lie in [0, {num_classes}), got range [{lo}, {hi}]")
    return e, t_len, d, num_classes, dims


def default_block_a(dims: list[tuple[int, int]], use_dot: bool = True, precision: str = "ieee") -> int:
    """BA, the inputs a per tile (the row count of every tl.dot).  On GPU the largest tile without
    register spills in an sm_90 compile (``python -m kernels.aot``): 16 for ieee / tf32x3, 64 for tf32.
    Under the interpreter the widest layer's A (up to 1024): there the cost is per executed op, not
    per element, so one wide tile is fastest."""
    if INTERPRET:
        ba = min(_next_pow2(max(a for a, _ in dims)), 1024)
    else:
        ba = 64 if precision == "tf32" else 16
    return max(ba, 16) if use_dot else ba


def fused_episode(cfg: VSMLConfig, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, state: VSMLState, *,
                  out: torch.Tensor | None = None, loss_out: torch.Tensor | None = None,
                  block_a: int | None = None, use_dot: bool = True, precision: str = "ieee",
                  num_warps: int = 4, check_labels: bool = True) -> FusedResult:
    """Run T examples of E episodes in one kernel launch; returns logits, in-kernel loss and the new state.

    Args:
        cfg: the network config (schedule, layer norm, layerwise θ, message indices, ...).
        theta: [L, P] shared or [E, L, P] per-episode θ, float32, contiguous.
        x: [E, T, D] float32 contiguous; y: [E, T] int64 labels in [0, C).
        state: the state to continue from (see ``vsml.engine.state.init_state``); not modified.
        out, loss_out: optional preallocated [E, T, C] / [E, T] float32 outputs (every element is written).
        block_a: inputs a per tile (power of two, >= 16 with ``use_dot``); default ``default_block_a``.
        use_dot: tl.dot for the small matmuls (default) or the broadcast-and-sum fallback.
        precision: tl.dot input precision: "ieee" (exact fp32, default), "tf32", "tf32x3" (GPU only;
            ignored by the interpreter).
        num_warps: warps per program (GPU only).
        check_labels: check 0 <= y < C (one device sync); off when the caller already checked.
    """
    e, t_len, d, num_classes, dims = _validate(cfg, theta, x, y, state, check_labels)
    _fail(precision in PRECISIONS, ValueError, f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = x.device
    n, m = cfg.cell.hidden, cfg.cell.msg
    k_layers = len(dims)
    for name, buf, shape in (("out", out, (e, t_len, num_classes)), ("loss_out", loss_out, (e, t_len))):
        if buf is not None:
            _check_tensor(name, buf, torch.float32, shape, dev)
    logits = out if out is not None else torch.empty(e, t_len, num_classes, dtype=torch.float32, device=dev)
    loss = loss_out if loss_out is not None else torch.empty(e, t_len, dtype=torch.float32, device=dev)

    # flat, layer-major copies of the state: layer k's [E, A, B, N] block is one contiguous view
    h_flat = torch.cat([h.reshape(-1) for h in state.h])
    c_flat = torch.cat([c.reshape(-1) for c in state.c])
    bwd_flat = torch.cat([b.reshape(-1) for b in state.bwd])

    if t_len > 0:
        ba = block_a if block_a is not None else default_block_a(dims, use_dot, precision)
        _fail(isinstance(ba, int) and ba >= 1 and (ba & (ba - 1)) == 0, ValueError,
              f"block_a must be a power of two, got {ba}")
        _fail(not use_dot or ba >= 16, ValueError, f"tl.dot needs block_a >= 16, got {ba}")
        pad_min = 16 if use_dot else 1                    # tl.dot: every dimension >= 16
        np_ = max(_next_pow2(n), pad_min)
        mp = max(_next_pow2(m), pad_min)
        br = max(min(_next_pow2(max(b for _, b in dims)), 64), pad_min)

        # per-layer descriptor table (int64): A, B, h/c offset, bwd offset, bwd offset of layer k-1,
        # fwd-scratch offset of the input slot and of the output slot, θ-set offset
        p_size = theta_size(cfg.cell)
        l_sets = cfg.num_theta_sets
        meta = []
        h_off, bwd_offs, off = 0, [], 0
        for _, b in dims:
            bwd_offs.append(off)
            off += e * b * m
        slot_rows = [d] + [b for _, b in dims]            # slot 0 = x_t, slot k = output of layer k-1
        slot_offs = [sum(slot_rows[:i]) * m for i in range(len(slot_rows))]
        for k, (a, b) in enumerate(dims):
            meta.append([a, b, h_off, bwd_offs[k], bwd_offs[k - 1] if k > 0 else 0,
                         slot_offs[k], slot_offs[k + 1], min(k, l_sets - 1) * p_size])
            h_off += e * a * b * n
        meta_t = torch.tensor(meta, dtype=torch.int64, device=dev)
        r_off = sum(slot_rows) * m                        # then R = bwd_in W_r^T + β: [max B, 4N]
        scr_per_ep = r_off + max(b for _, b in dims) * 4 * n
        scratch = torch.empty(e * scr_per_ep, dtype=torch.float32, device=dev)
        theta_estride = l_sets * p_size if theta.dim() == 3 else 0
        bx = min(_next_pow2(d), 1024 if INTERPRET else 128)
        bc = max(_next_pow2(num_classes), 2)

        vsml_episode_fwd_kernel[(e,)](
            x, y, theta, h_flat, c_flat, bwd_flat, scratch, logits, loss, meta_t,
            t_len, d, num_classes, k_layers, theta_estride, scr_per_ep, r_off, float(cfg.tanh_bound),
            float(cfg.logit_scale),
            float(cfg.cell.ln_eps),
            N=n, M=m, NP=np_, MP=mp, BA=ba, BR=br, BC=bc, BX=bx,
            MICRO=cfg.micro_ticks, BACKWARD=bool(cfg.backward_pass), LAYER_NORM=bool(cfg.cell.layer_norm),
            FEED_LABEL=bool(cfg.feed_label), IN_IDX=cfg.input_idx, OUT_IDX=cfg.output_idx,
            ERR_IDX=cfg.error_idx, LBL_IDX=cfg.label_idx, USE_DOT=bool(use_dot), PRECISION=precision,
            BILINEAR=bool(cfg.cell.bilinear), num_warps=num_warps,
        )

    hs, cs, bwds = [], [], []
    off, boff = 0, 0
    for a, b in dims:
        sz = e * a * b * n
        hs.append(h_flat[off:off + sz].view(e, a, b, n))
        cs.append(c_flat[off:off + sz].view(e, a, b, n))
        off += sz
        bwds.append(bwd_flat[boff:boff + e * b * m].view(e, b, m))
        boff += e * b * m
    return FusedResult(logits, loss, VSMLState(hs, cs, bwds))


def fused_unroll(cfg: VSMLConfig, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, state: VSMLState,
                 **kwargs) -> tuple[torch.Tensor, VSMLState]:
    """The fused equivalent of ``VSMLNetwork.unroll`` for a given state: returns (logits [E, T, C], new
    state).  Inputs are validated (device, dtype float32 / int64 labels, contiguity, shapes) and not
    modified.  Keyword arguments go to :func:`fused_episode`."""
    res = fused_episode(cfg, theta, x, y, state, **kwargs)
    return res.logits, res.state
