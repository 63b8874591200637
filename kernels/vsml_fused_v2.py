"""Fused Triton kernel v2 for Hopper-class GPUs: pair tiles, one gate dot per micro-step on tensor cores.

Same semantics and host API as v1 (:mod:`kernels.vsml_fused`): ``fused_episode_v2(cfg, θ, x, y, state, ...)``
returns ``FusedResult(logits, loss, state)`` equal to ``VSMLNetwork.unroll`` within the documented
tolerance.  The dispatch reaches it as ``kernels.backend.fused_kernel("v2")`` (``VSMLNetwork(cfg,
kernel="v2")``, ``kernels.backend.unroll(..., kernel="v2")``).  v1 stays untouched and selectable; design, limits and roofline in ``kernels/README.md``
("Kernel v2").  In short:

* **Pair tiles.**  A tile is ``ROWS`` sub-LSTMs of one layer (rows = pairs, flattened a·B + b), aligned
  to whole inputs a: TA = ROWS // B inputs × all B outputs when B <= ROWS (B = 10, ROWS = 128: 12 inputs,
  120 live rows), else one input × a chunk of ROWS outputs.  No lane is spent on padding B to a power
  of two.
* **One gate dot per micro-step.**  gates [ROWS, 4N] = X + h [ROWS, N] · W_hᵀ [N, 4N], where
  X = F[a(row)] + R[b(row)] is gathered once per layer update (F = fwd_in W_fᵀ per input a, R =
  bwd_in W_rᵀ + β per output b, both precomputed per layer update into scratch, then added as
  broadcast terms: the dot's accumulator starts at X).  The accumulator is split into the i, g, f, o
  gates by a reshape/permute/split (no slicing in Triton).
* **Precision.**  ``precision="tf32x3"`` (GPU default): every dot is three TF32 tensor-core products
  of an explicit split x = hi + lo, hi = tf32 round-to-nearest(x) (bit arithmetic, so the same code runs
  in the interpreter), lo·hi + hi·lo + hi·hi accumulated small terms first; the weight splits are done
  once per layer update.  ``"ieee"``: exact fp32 FMA dots (v1's default).  ``"tf32"``: one pass.
  Under the interpreter every dot is fp32 whatever the precision.
* **Mean-then-project readouts.**  Without LayerNorm the forward message is W_fwd·mean_a(h) + b and the
  backward one W_bwd·mean_b(h) + b (exact by linearity): the tile reduces h itself over a (per b) and
  over b (per a) with two one-hot dots ([TBP, ROWS] · [ROWS, N] and [TAP, ROWS] · [ROWS, N]; the
  one-hot factor is exact in TF32, so two passes, h_hi and h_lo, keep fp32 accuracy) and projects the
  [·, N] sums with fp32 FMAs.  With LayerNorm the per-pair φ/ψ are computed (a [ROWS, N] · [N, M] dot
  each) and then reduced the same way.
* **The bilinear cell** (``SubLSTMConfig.bilinear``, constexpr ``BILINEAR``; off: the plain code).  Per
  tile, x_a = fwd_in[a, 0] (layer 1: the pixel x_t[a]) and e_b = bwd_in[b, 0] are gathered per row and
  w_xe · x_a e_b joins the frozen term X before the micro-steps.  Both read-outs are then per pair (as
  with LayerNorm): φ_ab = W_fwd h + b_fwd + x_a (W_xφ h + b_xφ) [LN] and ψ_ab = W_bwd h + b_bwd [LN]
  (two more [ROWS, N] · [N, M] dots), reduced by the same one-hot sums, so RW = MP.
* **Cheaper transcendentals** (``FAST``, on only when compiled for a GPU): 2^x by ``ex2.approx.ftz.f32``
  and 1/x by ``rcp.approx.ftz.f32`` (inline PTX); σ(ĩ−5)·tanh(g̃) and σ(õ)·tanh(c') each take one
  reciprocal of a product: 5 ex2 + 3 rcp per element and micro-step (v1: 5 exp + 5 IEEE-ish divisions).
  The interpreter runs the same formulas with ``tl.exp2`` and ``1/x``.
* **Programs.**  ``split_a = 1``: one program per episode runs all T ticks in one launch (as v1).
  ``split_a = S > 1`` (small E): S programs per episode each own a contiguous range of a-groups of every
  layer; each layer update is one launch of grid (E, S) writing per-program partial sums of the forward
  message, followed by a one-program-per-episode "finish" launch that reduces the S partials, projects,
  and writes the next layer's forward input (or the logits, loss and error).  Backward messages are
  complete inside a program (it owns whole inputs a).  2K launches per example (4K with
  ``backward_pass``); capture them in a CUDA graph on the GPU for small E.
* **Autotuning** (GPU only): a host-side autotuner times the (rows, warps, stages, maxnreg) candidates of
  ``GPU_CONFIGS`` once per shape key and caches the fastest (the tile size enters the host tiling table,
  which ``triton.autotune``'s fixed constexpr configs cannot express); default 64 pairs, 8 warps, at most
  168 registers (sm_90: 167 registers, no spills).  Under the interpreter exactly one config runs.
* ``_layer_tiles`` / ``_layer_finish`` are ``noinline`` device functions: inlined, the compiler hoisted
  their loop-invariant index tensors out of the tick loop, where they stayed live and spilled.

Run on CPU only under the Triton interpreter (``TRITON_INTERPRET=1`` in the environment before this module
is imported); tests: ``tests/kernels/test_fused_v2.py``.
"""

from __future__ import annotations

import math

import torch

from vsml.engine.config import VSMLConfig
from vsml.engine.params import theta_size

from .vsml_fused import (
    HAS_TRITON,
    INTERPRET,
    FusedResult,
    VSMLState,
    _check_tensor,
    _fail,
    _next_pow2,
    _validate,
    fused_available,
    tl,
    triton,
)

__all__ = [
    "GPU_CONFIGS",
    "PRECISIONS_V2",
    "FusedResult",
    "fused_available",
    "fused_episode_v2",
    "fused_unroll_v2",
]

PRECISIONS_V2 = ("ieee", "tf32", "tf32x3")
#: META columns per layer (int64)
META_COLS = 12
LOG2E = 1.4426950408889634

if HAS_TRITON:

    # ------------------------------------------------------------------------------------------
    # arithmetic helpers

    @triton.jit
    def _tf32_split(x):
        """x = hi + lo exactly, hi = x rounded to TF32 (10 explicit mantissa bits, round half away from
        zero on the magnitude bits, like ``cvt.rna.tf32.f32``); |lo| <= 2^-11 |x|."""
        bits = x.to(tl.uint32, bitcast=True)
        hi = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return hi, x - hi

    @triton.jit
    def _wsplit(w, PRECISION: tl.constexpr):
        """Split a loop-invariant right-hand operand once: (hi, lo) for tf32x3, (w, w) otherwise."""
        if PRECISION == "tf32x3":
            return _tf32_split(w)
        else:
            return w, w

    @triton.jit
    def _mma(a, b_hi, b_lo, acc, PRECISION: tl.constexpr):
        """acc + a @ b in ~fp32 accuracy.  tf32x3: a_lo·b_hi + a_hi·b_lo + a_hi·b_hi on TF32 tensor cores
        (small terms first); ieee: one exact fp32 dot (b_hi is the whole b); tf32: one TF32 pass."""
        if PRECISION == "tf32x3":
            a_hi, a_lo = _tf32_split(a)
            acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
            return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
        elif PRECISION == "tf32":
            return tl.dot(a, b_hi, acc, input_precision="tf32")
        else:
            return tl.dot(a, b_hi, acc, input_precision="ieee")

    @triton.jit
    def _onehot_mma(q, x, acc, PRECISION: tl.constexpr):
        """acc + q @ x for an exact (0/1) left factor q: two TF32 passes (x_hi, x_lo) give fp32 accuracy."""
        if PRECISION == "tf32x3":
            x_hi, x_lo = _tf32_split(x)
            acc = tl.dot(q, x_lo, acc, input_precision="tf32")
            return tl.dot(q, x_hi, acc, input_precision="tf32")
        elif PRECISION == "tf32":
            return tl.dot(q, x, acc, input_precision="tf32")
        else:
            return tl.dot(q, x, acc, input_precision="ieee")

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _rcp(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _tanh_precise(x):
        """tanh with relative accuracy near 0 (for the logit clip 100·tanh(m/100)); as in v1."""
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        x2 = ax * ax
        small = ax * (1.0 + x2 * (-0.33333333333333333 + x2 * 0.13333333333333333))
        r = tl.where(ax < 0.05, small, big)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _gather_x0(x_row, fin, a, k, valid, M: tl.constexpr, IN_IDX: tl.constexpr):
        """Bilinear cell: x_a = fwd_in[a, 0] for every row's input a [ROWS] (0 on invalid rows).  Layer 1 (k == 0)
        reads the example x_row[a] (element 0 of its embedded input is the pixel iff IN_IDX == 0), later layers
        their forward-input slot fin [A, M]."""
        first = (a * 0 + k) == 0                      # [ROWS] (a scalar bool mask is not portable)
        xa = tl.load(fin + a * M, mask=valid & (~first), other=0.0)
        return tl.where(first, tl.load(x_row + a, mask=valid & first & (IN_IDX == 0), other=0.0), xa)

    # ------------------------------------------------------------------------------------------
    # one layer update of one program: (e, s) owns a-groups [s*GP, (s+1)*GP) of layer k

    @triton.jit
    def _ln_rows(v, g, b, mmask, ln_eps, M: tl.constexpr):
        """LayerNorm of every row of v [ROWS, MP] over its M message columns (biased variance, haiku's); the
        padded columns stay 0 before the scale and shift g, b [MP]."""
        mu = tl.sum(tl.where(mmask[None, :], v, 0.0), axis=1) / M
        dv = tl.where(mmask[None, :], v - mu[:, None], 0.0)
        var = tl.sum(dv * dv, axis=1) / M
        return dv * tl.rsqrt(var + ln_eps)[:, None] * g[None, :] + b[None, :]

    @triton.jit(noinline=True)
    def _layer_tiles(e, s, S, k, t, T, D, x_ptr, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, f_off, r_off, p_off,
                     write_fwd, write_bwd, ln_eps,
                     N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, RW: tl.constexpr,
                     ROWS: tl.constexpr, TAP: tl.constexpr, TBP: tl.constexpr, BR: tl.constexpr,
                     MICRO: tl.constexpr, LAYER_NORM: tl.constexpr, BILINEAR: tl.constexpr, IN_IDX: tl.constexpr,
                     PRECISION: tl.constexpr, FAST: tl.constexpr):
        """The tiles of layer k owned by program s (see the module docstring).  Read-outs: mean-then-project
        (Σ h, RW = NP) for the plain cell; per pair (RW = MP) with LayerNorm or the bilinear cell (BILINEAR:
        gates += w_xe · x_a e_b, φ += x_a (W_xφ h + b_xφ), x_a = fwd_in[a, 0], e_b = bwd_in[b, 0])."""
        mrow = meta_ptr + k * 12
        A64 = tl.load(mrow + 0)
        B64 = tl.load(mrow + 1)
        h_off = tl.load(mrow + 2)
        bwd_off = tl.load(mrow + 3)
        bwdp_off = tl.load(mrow + 4)
        fin_off = tl.load(mrow + 5)
        th_off = tl.load(mrow + 7)
        # in-layer index arithmetic in int32 (A·B·N < 2^31 per layer and episode; episode offsets in int64)
        A = A64.to(tl.int32)
        B = B64.to(tl.int32)
        TA = tl.load(mrow + 8).to(tl.int32)
        TB = tl.load(mrow + 9).to(tl.int32)
        NB = tl.load(mrow + 10).to(tl.int32)
        AG = tl.load(mrow + 11).to(tl.int32)

        h_base = h_ptr + h_off + e * (A64 * B64 * N)
        c_base = c_ptr + h_off + e * (A64 * B64 * N)
        bwd_in = bwd_ptr + bwd_off + e * (B64 * M)        # [B, M] backward message into this layer
        bwd_out = bwd_ptr + bwdp_off + e * (A64 * M)      # [A, M] backward message into layer k-1
        w = th + th_off
        fbuf = scr + f_off                                # [A, 4NP]  F = fwd_in W_f^T (this episode)
        rbuf = scr + r_off                                # [Bmax, 4NP] R of this program (offset by the caller)
        pbuf = scr + p_off                                # [Bmax, RW] this program's forward partial sums

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
        PAIRWISE: tl.constexpr = LAYER_NORM or BILINEAR   # per-pair read-outs (else mean-then-project)
        G4: tl.constexpr = 4 * NP

        offs_m = tl.arange(0, MP)
        offs_n = tl.arange(0, NP)
        offs_q = tl.arange(0, RW)
        offs_g = tl.arange(0, G4)                         # column of the gate block: g * NP + n
        g_of = offs_g // NP
        n_of = offs_g % NP
        gcol_ok = n_of < N
        wrow = g_of * N + n_of                            # row of W for that column
        mmask = offs_m < M
        do_fwd = write_fwd != 0
        do_bwd = write_bwd != 0

        # program's a-groups
        GP = tl.cdiv(AG, S)
        g_lo = s * GP
        g_hi = tl.minimum(AG, g_lo + GP)
        a_lo = tl.minimum(g_lo * TA, A)
        a_hi = tl.minimum(g_hi * TA, A)

        # ---- phase 1: R[b, col] = β + bwd_in[b] W_r^T  and  F[a, col] = fwd_in[a] W_f^T (own a-range) ----
        wmask = mmask[:, None] & gcol_ok[None, :]
        wr = tl.load(w + wrow[None, :] * WROW + M + offs_m[:, None], mask=wmask, other=0.0)    # [MP, G4]
        wf = tl.load(w + wrow[None, :] * WROW + offs_m[:, None], mask=wmask, other=0.0)        # [MP, G4]
        beta = tl.load(w + OFF_BETA + wrow, mask=gcol_ok, other=0.0)
        wr_hi, wr_lo = _wsplit(wr, PRECISION)
        wf_hi, wf_lo = _wsplit(wf, PRECISION)
        offs_r = tl.arange(0, BR)
        is_first = (offs_r * 0 + k) == 0                  # layer 1 (as a block: a scalar bool mask is not portable)
        for r0 in range(0, B, BR):
            rows = r0 + offs_r
            rmask = rows < B
            bw = tl.load(bwd_in + rows[:, None] * M + offs_m[None, :], mask=rmask[:, None] & mmask[None, :],
                         other=0.0)
            rv = _mma(bw, wr_hi, wr_lo, tl.zeros([BR, G4], dtype=tl.float32) + beta[None, :], PRECISION)
            tl.store(rbuf + rows[:, None] * G4 + offs_g[None, :], rv, mask=rmask[:, None])
        for r0 in range(a_lo, a_hi, BR):
            rows = r0 + offs_r
            rmask = rows < a_hi
            # layer 1 reads x_t directly: fwd_in[a] = (x_a at IN_IDX, 0, ...)
            xv = tl.load(x_ptr + (e * T + t) * D + rows, mask=rmask & is_first, other=0.0)
            fin = tl.load(scr + fin_off + rows[:, None] * M + offs_m[None, :],
                          mask=rmask[:, None] & mmask[None, :] & (~is_first)[:, None], other=0.0)
            fin = tl.where((offs_m[None, :] == IN_IDX) & is_first[:, None], xv[:, None], fin)
            fv = _mma(fin, wf_hi, wf_lo, tl.zeros([BR, G4], dtype=tl.float32), PRECISION)
            tl.store(fbuf + rows[:, None] * G4 + offs_g[None, :], fv, mask=rmask[:, None])
        if do_fwd:   # this program's forward partial sums start at 0 (also when it owns no a-group)
            for r0 in range(0, B, BR):
                rows = r0 + offs_r
                tl.store(pbuf + rows[:, None] * RW + offs_q[None, :], tl.zeros([BR, RW], dtype=tl.float32),
                         mask=(rows < B)[:, None])
        tl.debug_barrier()

        # ---- loop-invariant weights ----
        # W_h^T [NP, G4]: element (kk, g*NP + n) = W[g*N + n, 2M + kk]
        wh = tl.load(w + wrow[None, :] * WROW + 2 * M + offs_n[:, None],
                     mask=(offs_n[:, None] < N) & gcol_ok[None, :], other=0.0)
        wh_hi, wh_lo = _wsplit(wh, PRECISION)
        # readouts W^T [NP, MP]: element (n, m) = W_[m, n]
        ro_ptrs = offs_m[None, :] * N + offs_n[:, None]
        ro_mask = (offs_n[:, None] < N) & mmask[None, :]
        wo_f = tl.load(w + OFF_WF + ro_ptrs, mask=ro_mask, other=0.0)
        wo_b = tl.load(w + OFF_WB + ro_ptrs, mask=ro_mask, other=0.0)
        bo_f = tl.load(w + OFF_BF + offs_m, mask=mmask, other=0.0)
        bo_b = tl.load(w + OFF_BB + offs_m, mask=mmask, other=0.0)
        if PAIRWISE:
            wof_hi, wof_lo = _wsplit(wo_f, PRECISION)
            wob_hi, wob_lo = _wsplit(wo_b, PRECISION)
        if LAYER_NORM:
            lnf_g = tl.load(w + OFF_LN + 0 * M + offs_m, mask=mmask, other=0.0)
            lnf_b = tl.load(w + OFF_LN + 1 * M + offs_m, mask=mmask, other=0.0)
            lnb_g = tl.load(w + OFF_LN + 2 * M + offs_m, mask=mmask, other=0.0)
            lnb_b = tl.load(w + OFF_LN + 3 * M + offs_m, mask=mmask, other=0.0)
        if BILINEAR:
            wxe = tl.load(w + OFF_XE + wrow, mask=gcol_ok, other=0.0)            # [G4]: w_xe[g*N + n] at g*NP + n
            wxp = tl.load(w + OFF_XPHI + ro_ptrs, mask=ro_mask, other=0.0)       # [NP, MP]: (n, m) = W_xphi[m, n]
            wxp_hi, wxp_lo = _wsplit(wxp, PRECISION)
            bxp = tl.load(w + OFF_BXPHI + offs_m, mask=mmask, other=0.0)         # [MP]: b_xphi

        offs_row = tl.arange(0, ROWS)
        offs_ta = tl.arange(0, TAP)
        offs_tb = tl.arange(0, TBP)
        inv_b = 1.0 / B.to(tl.float32)
        nmask = offs_n < N
        C1: tl.constexpr = 2.0 * 1.4426950408889634     # 2·log2(e)
        L2E: tl.constexpr = 1.4426950408889634
        for gi in range(g_lo, g_hi):
            a0 = gi * TA
            acc_b = tl.zeros([TAP, RW], dtype=tl.float32)
            for bc in range(NB):
                # the tile is the contiguous pair range [a0*B + b0, a0*B + b0 + n_rows) (pairs are a-major)
                b0 = bc * TB
                n_rows = tl.minimum(TA, A - a0) * tl.minimum(TB, B - b0)
                rel = b0 + offs_row                              # pair offset from (a0, 0)
                # row -> (a, b) without an integer division (computed per tile, not hoisted): rel < B + ROWS
                # is exact in fp32 and (rel + 0.5) / B is never within rounding of an integer
                a_l = ((rel.to(tl.float32) + 0.5) * inv_b).to(tl.int32)
                a = a0 + a_l
                b = rel - a_l * B
                valid = offs_row < n_rows
                # int32 offsets within this layer and episode (A·B·N < 2^31), built from the tile's first
                # pair so that nothing [ROWS, N]-sized is loop-invariant (hoisted, it would stay live)
                s_ptrs = ((a0 * B + b0 + offs_row) * N)[:, None] + offs_n[None, :]
                s_mask = valid[:, None] & nmask[None, :]
                h = tl.load(h_base + s_ptrs, mask=s_mask, other=0.0)
                c = tl.load(c_base + s_ptrs, mask=s_mask, other=0.0)
                x_t = (tl.load(fbuf + a[:, None] * G4 + offs_g[None, :], mask=valid[:, None], other=0.0)
                       + tl.load(rbuf + b[:, None] * G4 + offs_g[None, :], mask=valid[:, None], other=0.0))
                if BILINEAR:
                    xa = _gather_x0(x_ptr + (e * T + t) * D, scr + fin_off, a, k, valid, M, IN_IDX)   # [ROWS]
                    eb = tl.load(bwd_in + b * M, mask=valid, other=0.0)            # [ROWS]: e_b = bwd_in[b, 0]
                    x_t += (xa * eb)[:, None] * wxe[None, :]                       # [ROWS, 4NP]: w_xe x_a e_b
                for _ in tl.static_range(MICRO):
                    gates = _mma(h, wh_hi, wh_lo, x_t, PRECISION)                  # [ROWS, 4NP]
                    g4 = tl.permute(tl.reshape(gates, [ROWS, 2, 2, NP]), (0, 3, 1, 2))
                    g_even, g_odd = tl.split(g4)                                  # (i, f), (g, o)
                    zi, zf = tl.split(g_even)
                    zg, zo = tl.split(g_odd)
                    # c' = σ(f̃+5) c + σ(ĩ-5) tanh(g̃);  σ(u)·tanh(v) = sgn(v)(1-e_v) / ((1+e_u)(1+e_v))
                    e_i = _exp2((5.0 - zi) * L2E, FAST)
                    e_f = _exp2((-5.0 - zf) * L2E, FAST)
                    e_g = _exp2(-C1 * tl.abs(zg), FAST)
                    ig = (1.0 - e_g) * _rcp((1.0 + e_i) * (1.0 + e_g), FAST)
                    c = c * _rcp(1.0 + e_f, FAST) + tl.where(zg < 0, -ig, ig)
                    e_o = _exp2(-zo * L2E, FAST)
                    e_c = _exp2(-C1 * tl.abs(c), FAST)
                    oc = (1.0 - e_c) * _rcp((1.0 + e_o) * (1.0 + e_c), FAST)
                    h = tl.where(c < 0, -oc, oc)
                h = tl.where(s_mask, h, 0.0)
                c = tl.where(s_mask, c, 0.0)
                tl.store(h_base + s_ptrs, h, mask=s_mask)
                tl.store(c_base + s_ptrs, c, mask=s_mask)
                if do_fwd:
                    if PAIRWISE:
                        v = _mma(h, wof_hi, wof_lo, tl.zeros([ROWS, MP], dtype=tl.float32) + bo_f[None, :],
                                 PRECISION)                                             # [ROWS, MP]
                        if BILINEAR:   # φ += x_a (W_xφ h + b_xφ): [ROWS, NP] x [NP, MP], before LayerNorm
                            vx = _mma(h, wxp_hi, wxp_lo, tl.zeros([ROWS, MP], dtype=tl.float32) + bxp[None, :],
                                      PRECISION)                                        # [ROWS, MP]
                            # x_a gathered again rather than kept live across the micro-steps (registers)
                            xa = _gather_x0(x_ptr + (e * T + t) * D, scr + fin_off, a, k, valid, M, IN_IDX)
                            v = v + xa[:, None] * vx
                        if LAYER_NORM:
                            v = _ln_rows(v, lnf_g, lnf_b, mmask, ln_eps, M)
                        red = tl.where(valid[:, None], v, 0.0)
                    else:
                        red = h
                    # Σ over the tile's inputs a, per output b: one-hot [TBP, ROWS] @ [ROWS, RW]
                    q = tl.where(((b - b0)[None, :] == offs_tb[:, None]) & valid[None, :], 1.0, 0.0)
                    part = _onehot_mma(q, red, tl.zeros([TBP, RW], dtype=tl.float32), PRECISION)
                    p_ptrs = pbuf + (b0 + offs_tb)[:, None] * RW + offs_q[None, :]
                    p_mask = ((offs_tb < TB) & (b0 + offs_tb < B))[:, None]
                    prev = tl.load(p_ptrs, mask=p_mask, other=0.0)
                    tl.store(p_ptrs, prev + part, mask=p_mask)
                    tl.debug_barrier()
                if do_bwd:
                    if PAIRWISE:
                        v = _mma(h, wob_hi, wob_lo, tl.zeros([ROWS, MP], dtype=tl.float32) + bo_b[None, :],
                                 PRECISION)                                             # [ROWS, MP]
                        if LAYER_NORM:
                            v = _ln_rows(v, lnb_g, lnb_b, mmask, ln_eps, M)
                        redb = tl.where(valid[:, None], v, 0.0)
                    else:
                        redb = h
                    # Σ over the tile's outputs b, per input a: one-hot [TAP, ROWS] @ [ROWS, RW]
                    pa = tl.where((a_l[None, :] == offs_ta[:, None]) & valid[None, :], 1.0, 0.0)
                    acc_b = _onehot_mma(pa, redb, acc_b, PRECISION)
            if do_bwd:
                mean_b = acc_b * inv_b
                if PAIRWISE:
                    out_b = mean_b                                                  # [TAP, MP]
                else:   # mean-then-project in fp32 FMAs: [TAP, NP] x [NP, MP]
                    out_b = tl.sum(mean_b[:, :, None] * wo_b[None, :, :], axis=1) + bo_b[None, :]
                ar = a0 + offs_ta
                tl.store(bwd_out + ar[:, None] * M + offs_m[None, :], out_b,
                         mask=((offs_ta < TA) & (ar < A))[:, None] & mmask[None, :])

    @triton.jit(noinline=True)
    def _layer_finish(e, S, k, K, t, T, C, meta_ptr, th, bwd_ptr, scr, p_off, p_stride, logits_ptr, loss_ptr,
                      y_ptr, write_fwd, zero_err, tanh_bound, logit_scale,
                      N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, RW: tl.constexpr,
                      BR: tl.constexpr, BC: tl.constexpr, LAYER_NORM: tl.constexpr, BILINEAR: tl.constexpr,
                      FEED_LABEL: tl.constexpr, OUT_IDX: tl.constexpr, ERR_IDX: tl.constexpr, LBL_IDX: tl.constexpr):
        """After layer k's tiles: forward message mean_a = Σ_s partials / A (projected unless the partials are
        per-pair read-outs: LayerNorm or the bilinear cell) into
        layer k+1's input slot, or, for the last layer, logits, loss and the error message.  With
        ``zero_err`` (after a reverse sweep): reset the last layer's incoming error to 0."""
        WROW: tl.constexpr = 2 * M + N
        OFF_WF: tl.constexpr = 4 * N * WROW + 4 * N
        OFF_BF: tl.constexpr = OFF_WF + M * N
        offs_m = tl.arange(0, MP)
        offs_q = tl.arange(0, RW)
        offs_r = tl.arange(0, BR)
        mmask = offs_m < M
        offs_c = tl.arange(0, BC)
        cmask = offs_c < C
        last = meta_ptr + (K - 1) * 12
        err_base = bwd_ptr + tl.load(last + 3) + e * (C * M)
        e_ptrs = err_base + offs_c[:, None] * M + offs_m[None, :]
        e_mask = cmask[:, None] & mmask[None, :]
        if write_fwd != 0:
            mrow = meta_ptr + k * 12
            A = tl.load(mrow + 0)
            B = tl.load(mrow + 1)
            fout_off = tl.load(mrow + 6)
            w = th + tl.load(mrow + 7)
            is_last = k == K - 1
            inv_a = 1.0 / A.to(tl.float32)
            ro_ptrs = offs_m[None, :] * N + offs_q[:, None]
            wo_f = tl.load(w + OFF_WF + ro_ptrs, mask=(offs_q[:, None] < N) & mmask[None, :], other=0.0)
            bo_f = tl.load(w + OFF_BF + offs_m, mask=mmask, other=0.0)
            row = e * T + t
            for r0 in range(0, B, BR):
                rows = r0 + offs_r
                rmask = rows < B
                acc = tl.zeros([BR, RW], dtype=tl.float32)
                for s in range(S):
                    acc += tl.load(scr + p_off + s * p_stride + rows[:, None] * RW + offs_q[None, :],
                                   mask=rmask[:, None], other=0.0)
                mean = acc * inv_a
                if LAYER_NORM or BILINEAR:
                    msg = mean                                                     # [BR, MP]
                else:
                    msg = tl.sum(mean[:, :, None] * wo_f[None, :, :], axis=1) + bo_f[None, :]
                if is_last:
                    mo = tl.sum(tl.where(offs_m[None, :] == OUT_IDX, msg, 0.0), axis=1)
                    lg = tanh_bound * _tanh_precise(mo * logit_scale / tanh_bound)   # VSMLConfig.logit_scale κ
                    tl.store(logits_ptr + row * C + rows, lg, mask=rmask)
                else:
                    tl.store(scr + fout_off + rows[:, None] * M + offs_m[None, :], msg,
                             mask=rmask[:, None] & mmask[None, :])
            if is_last:
                tl.debug_barrier()
                lg = tl.load(logits_ptr + row * C + offs_c, mask=cmask, other=0.0)
                yt = tl.load(y_ptr + row)
                is_y = offs_c == yt
                mx = tl.max(tl.where(cmask, lg, float("-inf")), axis=0)
                ex = tl.where(cmask, tl.exp(lg - mx), 0.0)
                ssum = tl.sum(ex, axis=0)
                onehot = tl.where(is_y, 1.0, 0.0)
                err = ex / ssum - onehot
                loss = tl.log(ssum) + mx - tl.sum(tl.where(is_y & cmask, lg, 0.0), axis=0)
                tl.store(loss_ptr + row, loss)
                msg = tl.where(offs_m[None, :] == ERR_IDX, err[:, None], 0.0)
                if FEED_LABEL:
                    msg += tl.where(offs_m[None, :] == LBL_IDX, onehot[:, None], 0.0)
                tl.store(e_ptrs, msg, mask=e_mask)
        if zero_err != 0:
            tl.store(e_ptrs, tl.zeros([BC, MP], dtype=tl.float32), mask=e_mask)

    # ------------------------------------------------------------------------------------------
    # kernels

    @triton.jit
    def vsml_v2_episode_kernel(
        x_ptr, y_ptr, theta_ptr, h_ptr, c_ptr, bwd_ptr, scr_ptr, logits_ptr, loss_ptr, meta_ptr,
        T, D, C, K, theta_estride, scr_estride, f_off, r_off, p_off, tanh_bound, logit_scale, ln_eps,
        N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, RW: tl.constexpr,
        ROWS: tl.constexpr, TAP: tl.constexpr, TBP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
        MICRO: tl.constexpr, BACKWARD: tl.constexpr, LAYER_NORM: tl.constexpr, FEED_LABEL: tl.constexpr,
        IN_IDX: tl.constexpr, OUT_IDX: tl.constexpr, ERR_IDX: tl.constexpr, LBL_IDX: tl.constexpr,
        PRECISION: tl.constexpr, FAST: tl.constexpr, BILINEAR: tl.constexpr,
    ):
        """split_a = 1: one program per episode, all T ticks in one launch."""
        e = tl.program_id(0).to(tl.int64)
        th = theta_ptr + e * theta_estride
        scr = scr_ptr + e * scr_estride
        for t in range(T):
            for k in range(K):
                wb = 0 if BACKWARD else k
                _layer_tiles(e, 0, 1, k, t, T, D, x_ptr, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, f_off, r_off,
                             p_off, 1, wb, ln_eps, N, M, NP, MP, RW, ROWS, TAP, TBP, BR, MICRO, LAYER_NORM,
                             BILINEAR, IN_IDX, PRECISION, FAST)
                tl.debug_barrier()
                _layer_finish(e, 1, k, K, t, T, C, meta_ptr, th, bwd_ptr, scr, p_off, 0, logits_ptr, loss_ptr,
                              y_ptr, 1, 0, tanh_bound, logit_scale, N, M, NP, MP, RW, BR, BC, LAYER_NORM, BILINEAR,
                              FEED_LABEL,
                              OUT_IDX, ERR_IDX, LBL_IDX)
                tl.debug_barrier()
            if BACKWARD:
                for kk in range(K):
                    k2 = K - 1 - kk
                    _layer_tiles(e, 0, 1, k2, t, T, D, x_ptr, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, f_off,
                                 r_off, p_off, 0, k2, ln_eps, N, M, NP, MP, RW, ROWS, TAP, TBP, BR, MICRO,
                                 LAYER_NORM, BILINEAR, IN_IDX, PRECISION, FAST)
                    tl.debug_barrier()
                _layer_finish(e, 1, 0, K, t, T, C, meta_ptr, th, bwd_ptr, scr, p_off, 0, logits_ptr, loss_ptr,
                              y_ptr, 0, 1, tanh_bound, logit_scale, N, M, NP, MP, RW, BR, BC, LAYER_NORM, BILINEAR,
                              FEED_LABEL,
                              OUT_IDX, ERR_IDX, LBL_IDX)
                tl.debug_barrier()

    @triton.jit
    def vsml_v2_layer_kernel(
        x_ptr, theta_ptr, h_ptr, c_ptr, bwd_ptr, scr_ptr, meta_ptr,
        t, T, D, k, write_fwd, write_bwd, theta_estride, scr_estride, f_off, r_off, r_stride, p_off, p_stride,
        ln_eps,
        N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, RW: tl.constexpr,
        ROWS: tl.constexpr, TAP: tl.constexpr, TBP: tl.constexpr, BR: tl.constexpr,
        MICRO: tl.constexpr, LAYER_NORM: tl.constexpr, IN_IDX: tl.constexpr,
        PRECISION: tl.constexpr, FAST: tl.constexpr, BILINEAR: tl.constexpr,
    ):
        """split_a = S > 1: grid (E, S); program (e, s) updates its a-groups of layer k, writes its forward
        partial sums and the complete backward messages of its inputs."""
        e = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        S = tl.num_programs(1)
        th = theta_ptr + e * theta_estride
        scr = scr_ptr + e * scr_estride
        _layer_tiles(e, s, S, k, t, T, D, x_ptr, meta_ptr, th, h_ptr, c_ptr, bwd_ptr, scr, f_off,
                     r_off + s * r_stride, p_off + s * p_stride, write_fwd, write_bwd, ln_eps,
                     N, M, NP, MP, RW, ROWS, TAP, TBP, BR, MICRO, LAYER_NORM, BILINEAR, IN_IDX, PRECISION, FAST)

    @triton.jit
    def vsml_v2_finish_kernel(
        y_ptr, theta_ptr, bwd_ptr, scr_ptr, logits_ptr, loss_ptr, meta_ptr,
        S, k, K, t, T, C, write_fwd, zero_err, theta_estride, scr_estride, p_off, p_stride, tanh_bound, logit_scale,
        N: tl.constexpr, M: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, RW: tl.constexpr,
        BR: tl.constexpr, BC: tl.constexpr, LAYER_NORM: tl.constexpr, FEED_LABEL: tl.constexpr,
        OUT_IDX: tl.constexpr, ERR_IDX: tl.constexpr, LBL_IDX: tl.constexpr, BILINEAR: tl.constexpr,
    ):
        """split_a = S > 1: grid (E,); reduce the S partial sums of layer k (second phase)."""
        e = tl.program_id(0).to(tl.int64)
        th = theta_ptr + e * theta_estride
        scr = scr_ptr + e * scr_estride
        _layer_finish(e, S, k, K, t, T, C, meta_ptr, th, bwd_ptr, scr, p_off, p_stride, logits_ptr, loss_ptr,
                      y_ptr, write_fwd, zero_err, tanh_bound, logit_scale, N, M, NP, MP, RW, BR, BC, LAYER_NORM, BILINEAR,
                              FEED_LABEL,
                      OUT_IDX, ERR_IDX, LBL_IDX)


# ------------------------------------------------------------------------------------------------
# host side


#: candidate (rows, num_warps, num_stages, maxnreg) for the GPU autotuner; the first one is the default.
#: sm_90 compile (``python -m kernels.aot --kernel v2 --maxnreg 168``): 64 rows / 8 warps: 167 registers,
#: no spills; 64 rows / 4 warps capped at 168: ~40 B of scalar spills, but 3 CTAs (12 warps) per SM.
GPU_CONFIGS = ((64, 8, 1, 168), (64, 4, 1, 168), (64, 4, 1, None), (64, 8, 1, None), (128, 8, 1, None),
               (64, 8, 2, 168))
_TUNED: dict = {}


def default_rows(dims: list[tuple[int, int]]) -> int:
    """Pairs per tile.  GPU: 64 (see ``GPU_CONFIGS``; ``python -m kernels.aot --kernel v2``).
    Interpreter: one tile as wide as the largest layer (<= 256 rows; there the cost is per executed op)."""
    if INTERPRET:
        return max(16, min(_next_pow2(max(a * b for a, b in dims)), 256))
    return GPU_CONFIGS[0][0]


def default_split_a(e: int, dims: list[tuple[int, int]], rows: int, device: torch.device) -> int:
    """Programs per episode.  1 when E alone fills the GPU (or under the interpreter); otherwise enough
    programs to give every SM two of them, at most one per a-group of the largest layer."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if e >= 2 * sms:
        return 1
    ag = max(math.ceil(a / max(rows // b, 1)) if b <= rows else a for a, b in dims)
    return max(1, min(ag, math.ceil(2 * sms / e)))


def layer_tiling(dims: list[tuple[int, int]], rows: int) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """Per layer (TA, TB, NB, AG): TA inputs × TB outputs per tile (TA·TB <= rows), NB output chunks,
    AG a-groups; and the power-of-two covers TAP >= max TA, TBP >= max TB (>= 16 for tl.dot)."""
    out = []
    for a, b in dims:
        if b <= rows:
            ta, tb, nb = rows // b, b, 1
        else:
            ta, tb, nb = 1, rows, math.ceil(b / rows)
        out.append((ta, tb, nb, math.ceil(a / ta)))
    tap = max(16, _next_pow2(max(o[0] for o in out)))
    tbp = max(16, _next_pow2(max(o[1] for o in out)))
    return out, tap, tbp


def fused_episode_v2(cfg: VSMLConfig, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, state: VSMLState, *,
                     out: torch.Tensor | None = None, loss_out: torch.Tensor | None = None,
                     block_a: int | None = None, use_dot: bool = True, precision: str | None = None,
                     num_warps: int | None = None, check_labels: bool = True, num_stages: int | None = None,
                     split_a: int | None = None, autotune: bool | None = None,
                     maxnreg: int | None = None) -> FusedResult:
    """Kernel v2 with v1's signature (:func:`kernels.vsml_fused.fused_episode`) and result.

    Args as in v1, plus:
        block_a: here the *pairs* per tile (ROWS, a power of two >= 16); default :func:`default_rows`.
        use_dot: must be True (v2 has no dot-free fallback).
        precision: "tf32x3" (default on the GPU: tensor cores, ~fp32 accuracy), "ieee" (exact fp32
            FMA dots), "tf32" (one TF32 pass, ~1e-3).  Under the interpreter every dot is fp32.
        num_warps, num_stages, maxnreg: GPU launch options (default: autotuned, else ``GPU_CONFIGS[0]``:
            8 warps, 1 stage, at most 168 registers per thread).
        split_a: programs per episode (default :func:`default_split_a`); > 1 runs one launch per layer
            update plus one reduction launch (see the module docstring).
        autotune: time the candidate tilings ``GPU_CONFIGS`` once per shape key on the GPU and keep the
            fastest (default: on CUDA when neither block_a nor num_warps is given; never in the
            interpreter).  Timing runs use copies of the state, so the call's results are unaffected.
    """
    e, t_len, d, num_classes, dims = _validate(cfg, theta, x, y, state, check_labels)
    if precision is None:
        precision = "ieee" if INTERPRET else "tf32x3"
    _fail(precision in PRECISIONS_V2, ValueError, f"precision must be one of {PRECISIONS_V2}, got {precision!r}")
    _fail(use_dot, ValueError, "kernel v2 always uses tl.dot (use_dot=False exists only in v1)")
    dev = x.device
    for name, buf, shape in (("out", out, (e, t_len, num_classes)), ("loss_out", loss_out, (e, t_len))):
        if buf is not None:
            _check_tensor(name, buf, torch.float32, shape, dev)
    logits = out if out is not None else torch.empty(e, t_len, num_classes, dtype=torch.float32, device=dev)
    loss = loss_out if loss_out is not None else torch.empty(e, t_len, dtype=torch.float32, device=dev)
    h_flat = torch.cat([h.reshape(-1) for h in state.h])
    c_flat = torch.cat([c.reshape(-1) for c in state.c])
    bwd_flat = torch.cat([b.reshape(-1) for b in state.bwd])
    _fail(all(a * b * cfg.cell.hidden < 2 ** 31 for a, b in dims), ValueError,
          f"kernel v2 indexes one layer of one episode in int32: A·B·N must be < 2^31, got layers {dims}")
    if block_a is not None:
        _fail(isinstance(block_a, int) and block_a >= 16 and (block_a & (block_a - 1)) == 0, ValueError,
              f"block_a (pairs per tile) must be a power of two >= 16, got {block_a}")
    if split_a is not None:
        _fail(isinstance(split_a, int) and split_a >= 1, ValueError, f"split_a must be an int >= 1, got {split_a}")

    if t_len > 0:
        if autotune is None:
            autotune = dev.type == "cuda" and not INTERPRET and block_a is None and num_warps is None
        if autotune:
            rows, nw, ns, mr = _tuned(cfg, theta, x, y, state, dims, precision, split_a)
        else:
            d_rows, d_nw, d_ns, d_mr = GPU_CONFIGS[0]
            rows = block_a or default_rows(dims)
            nw, ns = (num_warps or d_nw), (num_stages or d_ns)
            mr = maxnreg if maxnreg is not None else (None if INTERPRET else d_mr)
        s_prog = split_a if split_a is not None else default_split_a(e, dims, rows, dev)
        _launch(cfg, theta, x, y, h_flat, c_flat, bwd_flat, logits, loss, dims, d, num_classes, precision,
                rows, nw, ns, s_prog, mr)

    hs, cs, bwds = [], [], []
    off, boff = 0, 0
    for a, b in dims:
        sz = e * a * b * cfg.cell.hidden
        hs.append(h_flat[off:off + sz].view(e, a, b, cfg.cell.hidden))
        cs.append(c_flat[off:off + sz].view(e, a, b, cfg.cell.hidden))
        off += sz
        bwds.append(bwd_flat[boff:boff + e * b * cfg.cell.msg].view(e, b, cfg.cell.msg))
        boff += e * b * cfg.cell.msg
    return FusedResult(logits, loss, VSMLState(hs, cs, bwds))


def fused_unroll_v2(cfg: VSMLConfig, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, state: VSMLState,
                    **kwargs) -> tuple[torch.Tensor, VSMLState]:
    """``fused_unroll`` with kernel v2: returns (logits [E, T, C], new state)."""
    res = fused_episode_v2(cfg, theta, x, y, state, **kwargs)
    return res.logits, res.state


def _tuned(cfg, theta, x, y, state, dims, precision, split_a):
    """Host-side autotuner (GPU): the fastest of GPU_CONFIGS on <= 4 examples of this call, cached per
    (shapes, E, schedule, precision, split).  The tile shape enters the host-computed tiling table, so
    ``triton.autotune`` (fixed constexpr configs) does not fit; this does the same job explicitly."""
    e = x.shape[0]
    key = (tuple(dims), e, cfg.cell.hidden, cfg.cell.msg, cfg.micro_ticks, bool(cfg.backward_pass),
           bool(cfg.cell.layer_norm), bool(cfg.cell.bilinear), theta.dim(), precision, split_a, x.device.index)
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench
    tn = min(x.shape[1], 4)
    xs, ys = x[:, :tn].contiguous(), y[:, :tn].contiguous()
    best, best_t = GPU_CONFIGS[0], float("inf")
    for rows, nw, ns, mr in GPU_CONFIGS:
        h0 = torch.cat([h.reshape(-1) for h in state.h])
        c0 = torch.cat([c.reshape(-1) for c in state.c])
        b0 = torch.cat([b.reshape(-1) for b in state.bwd])
        lg = torch.empty(e, tn, dims[-1][1], device=x.device)
        ls = torch.empty(e, tn, device=x.device)
        s_prog = split_a if split_a is not None else default_split_a(e, dims, rows, x.device)
        try:
            # the copies h0, c0, b0 evolve over the timing runs (the kernel updates them in place): the
            # call's own state is untouched and the values stay in the same range
            ms = do_bench(lambda: _launch(cfg, theta, xs, ys, h0, c0, b0, lg, ls, dims,
                                          x.shape[2], dims[-1][1], precision, rows, nw, ns, s_prog, mr),
                          warmup=5, rep=20, return_mode="median")
        except Exception:   # a config that does not compile/fit (e.g. shared memory): skip it
            continue
        if ms < best_t:
            best, best_t = (rows, nw, ns, mr), ms
    _TUNED[key] = best
    return best


def _launch(cfg, theta, x, y, h_flat, c_flat, bwd_flat, logits, loss, dims, d, num_classes, precision,
            rows, num_warps, num_stages, s_prog, maxnreg=None):
    e, t_len = x.shape[0], x.shape[1]
    dev = x.device
    n, m = cfg.cell.hidden, cfg.cell.msg
    k_layers = len(dims)
    np_ = max(_next_pow2(n), 16)
    mp = max(_next_pow2(m), 16)
    # partial-sum width: Σ h (NP) for mean-then-project, per-pair read-outs (MP) with LayerNorm or bilinear
    rw = mp if (cfg.cell.layer_norm or cfg.cell.bilinear) else np_
    g4 = 4 * np_
    tiling, tap, tbp = layer_tiling(dims, rows)
    a_max = max(a for a, _ in dims)
    b_max = max(b for _, b in dims)
    br = max(16, min(_next_pow2(max(a_max, b_max)), 1024)) if INTERPRET else 32
    bc = max(_next_pow2(num_classes), 16)

    p_size = theta_size(cfg.cell)
    l_sets = cfg.num_theta_sets
    bwd_offs, off = [], 0
    for _, b in dims:
        bwd_offs.append(off)
        off += e * b * m
    # scratch per episode: forward-input slots of layers 1..K-1, F [Amax, 4NP], R [S, Bmax, 4NP], P [S, Bmax, RW]
    slot_offs, off = [0], 0
    for k in range(1, k_layers):
        slot_offs.append(off)
        off += dims[k][0] * m
    f_off = off
    r_off = f_off + a_max * g4
    r_stride = b_max * g4
    p_off = r_off + s_prog * r_stride
    p_stride = b_max * rw
    scr_per_ep = p_off + s_prog * p_stride
    meta, h_off = [], 0
    for k, (a, b) in enumerate(dims):
        ta, tb, nb, ag = tiling[k]
        meta.append([a, b, h_off, bwd_offs[k], bwd_offs[k - 1] if k > 0 else 0, slot_offs[k],
                     slot_offs[k + 1] if k + 1 < k_layers else 0, min(k, l_sets - 1) * p_size, ta, tb, nb, ag])
        h_off += e * a * b * n
    meta_t = torch.tensor(meta, dtype=torch.int64, device=dev)
    scratch = torch.empty(e * scr_per_ep, dtype=torch.float32, device=dev)
    theta_estride = l_sets * p_size if theta.dim() == 3 else 0
    fast = not INTERPRET
    common = dict(N=n, M=m, NP=np_, MP=mp, RW=rw)
    flags = dict(LAYER_NORM=bool(cfg.cell.layer_norm), PRECISION=precision, BILINEAR=bool(cfg.cell.bilinear))
    out_flags = dict(FEED_LABEL=bool(cfg.feed_label), OUT_IDX=cfg.output_idx, ERR_IDX=cfg.error_idx,
                     LBL_IDX=cfg.label_idx)
    launch = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        launch["maxnreg"] = maxnreg
    tb_, ls_, ln_eps = float(cfg.tanh_bound), float(cfg.logit_scale), float(cfg.cell.ln_eps)
    if s_prog == 1:
        vsml_v2_episode_kernel[(e,)](
            x, y, theta, h_flat, c_flat, bwd_flat, scratch, logits, loss, meta_t,
            t_len, d, num_classes, k_layers, theta_estride, scr_per_ep, f_off, r_off, p_off, tb_, ls_, ln_eps,
            **common, ROWS=rows, TAP=tap, TBP=tbp, BR=br, BC=bc, MICRO=cfg.micro_ticks,
            BACKWARD=bool(cfg.backward_pass), **flags, **out_flags, IN_IDX=cfg.input_idx, FAST=fast, **launch)
        return
    # split A: per tick and layer, grid (E, S) for the tiles, then grid (E,) for the reduction
    lay = dict(**common, ROWS=rows, TAP=tap, TBP=tbp, BR=br, MICRO=cfg.micro_ticks, **flags,
               IN_IDX=cfg.input_idx, FAST=fast, **launch)
    fin = dict(**common, BR=br, BC=bc, LAYER_NORM=bool(cfg.cell.layer_norm), BILINEAR=bool(cfg.cell.bilinear),
               **out_flags, **launch)

    def tiles(t, k, write_fwd, write_bwd):
        vsml_v2_layer_kernel[(e, s_prog)](
            x, theta, h_flat, c_flat, bwd_flat, scratch, meta_t, t, t_len, d, k, write_fwd, write_bwd,
            theta_estride, scr_per_ep, f_off, r_off, r_stride, p_off, p_stride, ln_eps, **lay)

    def finish(t, k, write_fwd, zero_err):
        vsml_v2_finish_kernel[(e,)](
            y, theta, bwd_flat, scratch, logits, loss, meta_t, s_prog, k, k_layers, t, t_len, num_classes,
            write_fwd, zero_err, theta_estride, scr_per_ep, p_off, p_stride, tb_, ls_, **fin)

    for t in range(t_len):
        for k in range(k_layers):
            tiles(t, k, 1, 0 if cfg.backward_pass else k)
            finish(t, k, 1, 0)
        if cfg.backward_pass:
            for k2 in reversed(range(k_layers)):
                tiles(t, k2, 0, k2)
            finish(t, 0, 0, 1)
