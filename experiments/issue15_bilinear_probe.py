"""Issue 15 probe (not product code): run a command with two *bilinear* paths added to the shallow VSML
cell, without changing θ's layout, to test whether the gate-product approximation of SGD's per-synapse
x·e update and w·x read-out is what stops the clone (RESULTS.md, issue 15, sixth session).

In the single-layer forward-only schedule, backward-message elements 1..M−1 are always zero (no label
feeding) and forward-output rows other than ``output_idx`` are never read, so their θ entries are free:
  * the update path: gates += W_r[:, XE_COL] · (x_a · e_b)        (x_a = fwd element 0, e_b = bwd element 0)
  * the read-out path: φ_ab[output_idx] += x_a · φ_ab[PHI_ROW]     (φ = W_fwd h + b_fwd)
Only the eager PyTorch path is patched (the cloning losses and VSMLNetwork's torch ticks): train.py must get
--backend torch, and every learner loaded through vsml.evaluation.load.load_learner is forced onto the torch
backend.  θ trained under this script is only meaningful under it.

    python experiments/issue15_bilinear_probe.py train.py --task mnist+resize14+proj --clone.steps 600 \\
        --steps 0 --vsml.logit_scale 2 --backend torch --seed 3 --name i15-bil-s1 --data_dir ../shared/datasets
    python experiments/issue15_bilinear_probe.py train.py --preset clone-long-k2 --init_from runs/i15-bil-s1 \\
        --clone.steps 200 --backend torch --name i15-bil-s2 --data_dir ../shared/datasets
    python experiments/issue15_bilinear_probe.py experiments/issue15_val.py \\
        --checkpoints runs/i15-bil-s2/checkpoints/step_000200.pt --episodes 16 --baselines "" --data_dir ../shared/datasets
"""
from __future__ import annotations

from vsml.engine import cell, network
from vsml.engine.cell import _linear, micro_steps, readout_bwd, readout_fwd
from vsml.estimators import cloning

XE_COL = 2        # the free backward-message column of W_r that carries x_a·e_b
PHI_ROW = 2       # the free forward-output row whose φ is multiplied by x_a
OUTPUT_IDX = 1    # VSMLConfig.output_idx (checked below)
_x = {}           # the last layer input x [E, A] seen by lstm_micro_steps (for the cloning read-out)


def lstm_micro_steps(p, fwd_in, bwd_in, h, c, micro_ticks):
    """cell.lstm_micro_steps plus the bilinear update term W_r[:, XE_COL]·x_a·e_b.  fwd_in [E, A, M],
    bwd_in [E, B, M], h, c [E, A, B, N]."""
    x, e = fwd_in[..., 0], bwd_in[..., 0]                          # [E, A], [E, B]
    _x["x"] = x
    f_term = _linear(fwd_in, p.W_f)                                 # [E, A, 4N]
    r_term = _linear(bwd_in, p.W_r, p.beta)                         # [E, B, 4N]
    w_xe = p.W_r[..., XE_COL]                                       # [4N] or [E, 4N]
    if w_xe.dim() == 2:
        w_xe = w_xe[:, None, None, :]
    xe = (x[:, :, None] * e[:, None, :])[..., None] * w_xe          # [E, A, B, 4N]
    return micro_steps(p.W_h, (f_term[:, :, None, :] + r_term[:, None, :, :] + xe,), h, c, micro_ticks)


def _bilinear_phi(phi, x):
    """φ [E, A, B, M] -> φ with φ[..., OUTPUT_IDX] += x_a·φ[..., PHI_ROW]."""
    phi = phi.clone()
    phi[..., OUTPUT_IDX] = phi[..., OUTPUT_IDX] + x[:, :, None] * phi[..., PHI_ROW]
    return phi


def cloning_linear(h, w, b=None):
    """cloning's φ = W_fwd h + b_fwd, with the bilinear read-out (the only _linear call in cloning.py)."""
    return _bilinear_phi(_linear(h, w, b), _x["x"])


def layer_update(p, fwd_in, bwd_in, h, c, micro_ticks, ln_eps):
    """cell.layer_update with both bilinear paths (no LayerNorm: cloning's configs)."""
    h, c = lstm_micro_steps(p, fwd_in, bwd_in, h, c, micro_ticks)
    phi = _bilinear_phi(_linear(h, p.W_fwd, p.b_fwd), fwd_in[..., 0])      # [E, A, B, M]
    return h, c, phi.mean(1), readout_bwd(p, h, ln_eps)


if __name__ == "__main__":
    from issue15_probe_runner import run_script

    from vsml.engine.config import VSMLConfig
    assert VSMLConfig().output_idx == OUTPUT_IDX and readout_fwd is cell.readout_fwd
    cell.lstm_micro_steps = lstm_micro_steps
    cloning.lstm_micro_steps = lstm_micro_steps
    cloning._linear = cloning_linear
    network.layer_update = layer_update
    run_script("python experiments/issue15_bilinear_probe.py")
