"""The meta-parameters θ: layout of the flat vector, initialisation, named views.

θ is stored as one flat float vector per θ set so that ES can perturb it as a whole
(θ ± σε) and Adam can update it as one tensor.  Layout of one set (vsml.md §1.2, §1.8):

    W      [4N, 2M+N]   LSTM weight on concat(fwd msg, bwd msg, h); rows in gate order i, g, f, o
    beta   [4N]         LSTM bias
    W_fwd  [M, N]       forward readout  φ = W_fwd h' + b_fwd
    b_fwd  [M]
    W_bwd  [M, N]       backward readout ψ = W_bwd h' + b_bwd
    b_bwd  [M]
    (LayerNorm only) ln_fwd_g, ln_fwd_b, ln_bwd_g, ln_bwd_b   [M] each
    (bilinear only)  W_xe [4N], W_xphi [M, N], b_xphi [M]     (SubLSTMConfig.bilinear)

With N=16, M=8: 2048 + 64 + 128 + 8 + 128 + 8 = 2384 values (2416 with LayerNorm, +200 bilinear).

Shapes of a full θ tensor:
    shared θ        [L, P]      (one set per layer group; L = 1, or K when layerwise)
    per-episode θ   [E, L, P]   (an ES population: episode e reads θ[e])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tasks.base import episode_generators, truncated_normal  # the one truncated-normal routine (tasks/ is the lower layer)

from vsml.engine.config import SubLSTMConfig, VSMLConfig


def param_shapes(cell: SubLSTMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of one θ set, in storage order."""
    n, m = cell.hidden, cell.msg
    shapes = [
        ("W", (4 * n, 2 * m + n)),
        ("beta", (4 * n,)),
        ("W_fwd", (m, n)),
        ("b_fwd", (m,)),
        ("W_bwd", (m, n)),
        ("b_bwd", (m,)),
    ]
    if cell.layer_norm:
        shapes += [("ln_fwd_g", (m,)), ("ln_fwd_b", (m,)), ("ln_bwd_g", (m,)), ("ln_bwd_b", (m,))]
    if cell.bilinear:
        shapes += [("W_xe", (4 * n,)), ("W_xphi", (m, n)), ("b_xphi", (m,))]
    return shapes


def theta_size(cell: SubLSTMConfig) -> int:
    """|θ| of one set."""
    return sum(math.prod(s) for _, s in param_shapes(cell))


def init_theta(cfg: VSMLConfig, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Reference initialisation (vsml.md §1.2): weights TN(0, 1/√fan_in) cut at ±2σ, biases 0,
    LayerNorm scale 1 and offset 0.  Returns θ of shape [L, P].  The bilinear weights W_xe (one more input
    column of W) and W_xphi (one more read-out) are drawn like W and W_fwd: TN(0, 1/√(2M+N)), TN(0, 1/√N)."""
    fan_in = {"W_xe": 2 * cfg.cell.msg + cfg.cell.hidden}
    sets = []
    for _ in range(cfg.num_theta_sets):
        parts = []
        for name, shape in param_shapes(cfg.cell):
            if name.startswith("W"):
                std = 1.0 / math.sqrt(fan_in.get(name, shape[-1]))
                parts.append(truncated_normal(shape, std, generator, dtype, device).flatten())
            elif name.endswith("_g"):
                parts.append(torch.ones(shape, dtype=dtype, device=device))
            else:
                parts.append(torch.zeros(shape, dtype=dtype, device=device))
        sets.append(torch.cat(parts))
    return torch.stack(sets)  # [L, P]


@dataclass
class CellParams:
    """Named views of one θ set, with an optional leading episode axis.

    Each tensor has shape ``[*batch, ...]`` where batch is ``()`` (shared θ) or ``(E,)``
    (per-episode θ).  The LSTM weight is split by input columns (vsml.md §7.2) so the
    forward- and backward-message terms can be computed once per message and broadcast
    over the grid instead of materialising the 32-dim concatenation per sub-LSTM.
    """

    W_f: torch.Tensor     # [*b, 4N, M]  columns of W acting on the forward message
    W_r: torch.Tensor     # [*b, 4N, M]  columns acting on the backward message
    W_h: torch.Tensor     # [*b, 4N, N]  columns acting on h
    beta: torch.Tensor    # [*b, 4N]
    W_fwd: torch.Tensor   # [*b, M, N]
    b_fwd: torch.Tensor   # [*b, M]
    W_bwd: torch.Tensor   # [*b, M, N]
    b_bwd: torch.Tensor   # [*b, M]
    ln_fwd_g: torch.Tensor | None = None
    ln_fwd_b: torch.Tensor | None = None
    ln_bwd_g: torch.Tensor | None = None
    ln_bwd_b: torch.Tensor | None = None
    W_xe: torch.Tensor | None = None     # [*b, 4N]     bilinear only: gate weights of x_a·e_b
    W_xphi: torch.Tensor | None = None   # [*b, M, N]   bilinear only: φ += x_a·(W_xphi h + b_xphi)
    b_xphi: torch.Tensor | None = None   # [*b, M]

    @property
    def bilinear(self) -> bool:
        return self.W_xe is not None

    @property
    def per_episode(self) -> bool:
        return self.beta.dim() == 2


def unflatten(theta_set: torch.Tensor, cell: SubLSTMConfig) -> CellParams:
    """Split one θ set ``[P]`` or ``[E, P]`` into named views (no copies)."""
    batch = theta_set.shape[:-1]
    out: dict[str, torch.Tensor] = {}
    off = 0
    for name, shape in param_shapes(cell):
        size = math.prod(shape)
        out[name] = theta_set[..., off:off + size].reshape(*batch, *shape)
        off += size
    m = cell.msg
    W = out.pop("W")  # [*b, 4N, 2M+N]
    return CellParams(W_f=W[..., :m], W_r=W[..., m:2 * m], W_h=W[..., 2 * m:], **out)


def extend_theta(theta: torch.Tensor, cell: SubLSTMConfig) -> torch.Tensor:
    """θ of the same cell without its bilinear paths ``[..., P₀]`` -> ``[..., P]`` for ``cell`` (bilinear),
    the new values W_xe, W_xphi, b_xphi set to 0: with them at zero the bilinear cell computes exactly what the
    plain one does, so a trained learner can be continued with the extra paths.  Returns θ unchanged when it
    already has the size of ``cell``."""
    p = theta_size(cell)
    if not cell.bilinear or theta.shape[-1] == p:
        return theta
    p0 = theta_size(dataclasses.replace(cell, bilinear=False))
    if theta.shape[-1] != p0:
        raise ValueError(f"θ has {theta.shape[-1]} values per set; a bilinear cell needs {p} (or {p0} for a plain "
                         f"θ, extended with zeros)")
    return torch.cat([theta, theta.new_zeros(*theta.shape[:-1], p - p0)], -1)


def check_theta(theta: torch.Tensor, cfg: VSMLConfig, num_episodes: int | None = None) -> None:
    """Raise a clear error when θ does not fit the config (shape, dtype)."""
    p, l = theta_size(cfg.cell), cfg.num_theta_sets
    if not torch.is_tensor(theta) or not theta.is_floating_point():
        raise TypeError(f"θ must be a floating-point tensor, got {type(theta).__name__} "
                        f"{getattr(theta, 'dtype', '')}")
    ok = (theta.dim() == 2 and tuple(theta.shape) == (l, p)) or (
        theta.dim() == 3 and tuple(theta.shape[1:]) == (l, p)
        and (num_episodes is None or theta.shape[0] == num_episodes))
    if not ok:
        want = f"[{l}, {p}] (shared) or [E, {l}, {p}] (one θ per episode"
        want += f", E={num_episodes})" if num_episodes is not None else ")"
        raise ValueError(f"θ has shape {list(theta.shape)} but this config needs {want}; "
                         f"L={l} θ sets (layerwise={cfg.layerwise}), |θ|={p} "
                         f"(layer_norm={cfg.cell.layer_norm}, bilinear={cfg.cell.bilinear}, N={cfg.cell.hidden}, "
                         f"M={cfg.cell.msg})")
