"""The convolutional VSML layer (vsml.md §1.9), on the PyTorch path.

A conv layer with kernel k (odd), stride s, IC input and OC output channels owns one sub-LSTM per
(kernel tap (i, j), in-channel ic, out-channel oc): state [E, k, k, IC, OC, N], shared by every
output position, exactly as a conv weight is.  One layer update, for input image H x W and output
Ho x Wo = ceil(H/s) x ceil(W/s) (SAME padding, TensorFlow's rule: total (Ho − 1)·s + k − H, top
P = total // 2, likewise for the width; ``ConvGeometry.pads``):

* every output position (p, q) runs a private copy of every tap's sub-LSTM for ``micro_ticks``
  micro-steps (§1.2) on
      forward message  →m[p·s + i − P, q·s + j − P, ic]   (zero outside the image: padded taps run too),
      backward message ←m[p, q, oc],
      the tap's shared state;
* forward message sent on: →m'[p, q, oc] = mean over (i, j, ic) of φ (padded taps count, as in the
  reference);
* weight sharing: the new shared tap state (h and c) is the mean over all output positions of the
  per-position updated states (§1.9 "Weight sharing");
* backward message sent back to input (r, c, ic): ψ̄ = mean over oc of ψ, then the contributions of
  every (output position, tap) pair whose receptive field contains (r, c) are combined:
  ``bwd_norm="connected"`` (default) takes their mean; ``"kernel"`` takes sum / k² like the reference
  (invalid taps count as zeros in a denominator of k per axis).

Corrections of the reference quirks (vsml.md §8 #1, #2): the back-projection is the exact adjoint of
the patch gathering (``F.fold`` of ``F.unfold``'s layout), so it is right for every odd k and every
stride: every input position inside some receptive field receives its message, and with the SAME
padding above that is every position whenever s <= k (for s > k, positions between receptive fields
touch no sub-LSTM and receive zero); there is no fixed −1 offset and no ``width // stride`` mask.
The padding differs from the reference's k//2 on each side only at stride > 1, where the reference
can leave the last rows/columns outside every receptive field.  The initial tap-state scale is a
ConvSpec option (§8 #3).

Messages are flat between layers: a layer's forward input is [E, H·W·IC, M] (channel-last order
(H, W, IC), the order the dense layer after it sees as its A inputs), its backward input
[E, Ho·Wo·OC, M].  Cheap formulation as in the dense layer (vsml.md §7.2-7.3): W is split into
W_f, W_r, W_h so the message terms broadcast over the grid; without LayerNorm the readouts are
mean-then-project.

Limitations: the compiled no-grad path (``VSMLNetwork(compile=True)``) and the fused Triton kernel
cover dense layers only; conv layers always run this eager PyTorch code (dense layers after them
still use the compiled path).  Memory per update is E · Ho·Wo · k²·IC·OC · 4N floats for the gates.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from vsml.engine.config import ConvGeometry, ConvSpec
from vsml.engine.cell import _layer_norm, _linear, micro_steps
from vsml.engine.params import CellParams

__all__ = ["backward_counts", "conv_layer_update", "gather_patches", "scatter_patches"]


def gather_patches(msg: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """Patches of an image of messages, zero-padded by k//2 (SAME), taken with stride s.

    msg [E, H·W·IC, M] (flat, order (H, W, IC))  ->  [E, Ho·Wo, k, k, IC, M]; entry
    [e, p·Wo + q, i, j, ic] is msg at (p·s + i − top, q·s + j − left, ic) or 0 outside the image.
    """
    k = g.kernel
    top, bottom, left, right = g.pads
    img = rearrange(msg, "e (h w ic) m -> e (ic m) h w", h=g.height, w=g.width)   # channels first for unfold
    cols = F.unfold(F.pad(img, (left, right, top, bottom)), k, stride=g.stride)   # [E, IC·M·k·k, L]
    n_pos = g.out_height * g.out_width
    if cols.shape[-1] != n_pos:  # cannot happen for odd k with P = k//2; guards the geometry formula
        raise RuntimeError(f"unfold produced {cols.shape[-1]} positions, expected {n_pos} for {g}")
    return rearrange(cols, "e (ic m ki kj) l -> e l ki kj ic m", ic=g.in_channels, ki=k, kj=k)


def scatter_patches(vals: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """Adjoint of :func:`gather_patches`: sum every patch entry back onto its input position.

    vals [E, Ho·Wo, k, k, IC, M]  ->  [E, H·W·IC, M] (entries that fell on padding are dropped).
    """
    k = g.kernel
    top, bottom, left, right = g.pads
    cols = rearrange(vals, "e l ki kj ic m -> e (ic m ki kj) l")                       # F.fold's layout
    img = F.fold(cols, (g.height + top + bottom, g.width + left + right), k, stride=g.stride)
    img = img[:, :, top:top + g.height, left:left + g.width]                            # crop the padding
    return rearrange(img, "e (ic m) h w -> e (h w ic) m", ic=g.in_channels)


def backward_counts(g: ConvGeometry, dtype=torch.float32, device=None) -> torch.Tensor:
    """How many (output position, tap) pairs touch each input position: [H, W] (0 between receptive
    fields when s > k)."""
    k, n_pos = g.kernel, g.out_height * g.out_width
    ones = torch.ones(1, 1, k, k, 1, 1, dtype=dtype, device=device).expand(1, n_pos, k, k, 1, 1)
    return scatter_patches(ones, dataclasses.replace(g, in_channels=1)).reshape(g.height, g.width)  # [H, W]


def conv_layer_update(p: CellParams, spec: ConvSpec, g: ConvGeometry, fwd_in: torch.Tensor,
                      bwd_in: torch.Tensor, h: torch.Tensor, c: torch.Tensor, micro_ticks: int,
                      ln_eps: float):
    """One conv-layer update (module docstring; vsml.md §1.9 with the §8 #1-2 corrections).

    fwd_in [E, H·W·IC, M], bwd_in [E, Ho·Wo·OC, M], h, c [E, k, k, IC, OC, N]  ->
    h', c' [E, k, k, IC, OC, N] (mean over output positions), →m' [E, Ho·Wo·OC, M],
    ←m' [E, H·W·IC, M].  θ may be shared or per episode (CellParams with a leading E axis).
    """
    oc = g.out_channels
    patches = gather_patches(fwd_in, g)                                   # [E, L, k, k, IC, M]
    f_term = _linear(patches, p.W_f)                                      # [E, L, k, k, IC, 4N]
    r_term = _linear(rearrange(bwd_in, "e (l oc) m -> e l oc m", oc=oc), p.W_r, p.beta)   # β folded in
    x_term = (rearrange(f_term, "e l ki kj ic g -> e l ki kj ic 1 g")
              + rearrange(r_term, "e l oc g -> e l 1 1 1 oc g"))        # [E, L, k, k, IC, OC, 4N]
    # every output position l runs a private copy of the shared tap states
    shared = "e ki kj ic oc n -> e 1 ki kj ic oc n"
    hp, cp = micro_steps(p.W_h, (x_term,), rearrange(h, shared), rearrange(c, shared), micro_ticks)
    # forward: mean over (i, j, ic) of φ at every (p, q, oc)
    over_taps = "e l ki kj ic oc x -> e l oc x"
    if p.ln_fwd_g is None:
        fwd_out = _linear(reduce(hp, over_taps, "mean"), p.W_fwd, p.b_fwd)   # [E, L, OC, M]
    else:
        phi = _layer_norm(_linear(hp, p.W_fwd, p.b_fwd), p.ln_fwd_g, p.ln_fwd_b, ln_eps)
        fwd_out = reduce(phi, over_taps, "mean")                          # [E, L, OC, M]
    # backward: ψ̄ = mean over oc, then back-projected onto the input positions
    over_oc = "e l ki kj ic oc x -> e l ki kj ic x"
    if p.ln_bwd_g is None:
        psi = _linear(reduce(hp, over_oc, "mean"), p.W_bwd, p.b_bwd)      # [E, L, k, k, IC, M]
    else:
        psi = reduce(_layer_norm(_linear(hp, p.W_bwd, p.b_bwd), p.ln_bwd_g, p.ln_bwd_b, ln_eps), over_oc, "mean")
    bwd_sum = scatter_patches(psi, g)                                     # [E, H·W·IC, M]
    if spec.bwd_norm == "kernel":
        bwd_out = bwd_sum / (g.kernel * g.kernel)
    else:
        cnt = backward_counts(g, bwd_sum.dtype, bwd_sum.device).clamp(min=1.0)
        bwd_out = bwd_sum / repeat(cnt, "h w -> (h w ic) 1", ic=g.in_channels)
    # weight sharing: one state per tap, the mean over output positions
    per_tap = "e l ki kj ic oc n -> e ki kj ic oc n"
    return (reduce(hp, per_tap, "mean"), reduce(cp, per_tap, "mean"),
            rearrange(fwd_out, "e l oc m -> e (l oc) m"), bwd_out)


def check_state(cfg, state, num_episodes: int, in_dim: int) -> None:
    """Raise a clear error when a carried VSMLState does not fit a conv network and inputs of
    ``in_dim`` features (tap states [E, k, k, IC, OC, N], backward messages [E, Ho·Wo·OC, M],
    dense layers [E, A, B, N])."""
    geo = cfg.conv_geometry(in_dim)
    n, m = cfg.cell.hidden, cfg.cell.msg
    if len(state.h) != cfg.num_layers:
        raise ValueError(f"the carried state has {len(state.h)} layers but the config has {cfg.num_layers}")
    for k, g in enumerate(geo):
        want_h = (num_episodes, g.kernel, g.kernel, g.in_channels, g.out_channels, n)
        want_b = (num_episodes, g.out_dim, m)
        if tuple(state.h[k].shape) != want_h or tuple(state.bwd[k].shape) != want_b:
            raise ValueError(f"the carried state of conv layer {k} has h {list(state.h[k].shape)}, bwd "
                             f"{list(state.bwd[k].shape)} but E={num_episodes}, D={in_dim} needs {list(want_h)}, "
                             f"{list(want_b)}")
    for k, (a, b) in enumerate(cfg.layer_dims(in_dim, state.num_classes), start=len(geo)):
        if tuple(state.h[k].shape) != (num_episodes, a, b, n):
            raise ValueError(f"the carried state of dense layer {k} has h {list(state.h[k].shape)} but E={num_episodes}, "
                             f"D={in_dim} needs {[num_episodes, a, b, n]}")
