"""Vectorised per-episode sampling and augmentation operations.

Every function takes an explicit ``torch.Generator`` and works on a whole batch of episodes at once
(leading axis E). Shapes are given as [E, T, ...]: E episodes, T steps, D features, C classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

__all__ = [
    "apply_permutation",
    "glorot_uniform_limit",
    "random_permutations",
    "random_projection",
    "relabel_to_subset",
    "resize_images",
    "sample_class_subsets",
    "sample_indices",
]

#: Largest number of projection-matrix entries materialised at once (chunks over episodes).
PROJECTION_CHUNK_ELEMENTS: int = 1 << 25


def random_permutations(num_rows: int, n: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """int64 [num_rows, n]: an independent uniformly random permutation of 0..n-1 per row (argsort of
    uniform keys)."""
    keys = torch.rand(num_rows, n, generator=gen, device=device or gen.device)  # [R, n]
    return keys.argsort(dim=1)


def _floor_uniform(shape: tuple[int, ...], pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """int64 uniform integers in [0, pool) per row; pool int64 [R] broadcast over the last axis."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)  # float64: exact enough for pools up to 2**40
    v = (u * pool.to(torch.float64)[:, None]).long()
    return torch.minimum(v, (pool - 1)[:, None])


def sample_indices(
    pool_sizes: torch.Tensor, length: int, gen: torch.Generator, *, replacement: bool = False
) -> torch.Tensor:
    """Draw ``length`` indices per row, row r from 0..pool_sizes[r]-1.

    Args:
        pool_sizes: int64 [R], every entry >= 1.
        length: T.
        gen: a CPU generator.
        replacement: draw independently with replacement. Otherwise rows with T <= pool get T distinct indices
            (uniform over ordered T-subsets), and rows with T > pool get consecutive random permutations of the
            pool (each index appears floor or ceil of T / pool times, like an epoch-wise shuffle).

    Returns:
        int64 [R, T].

    Rows with pool >= 2T use rejection (draw with replacement, redraw the later copies of repeated values until
    none is left): exact, and O(R T log T). Rows with T <= pool < 2T sort R x pool random keys.
    """
    pool_sizes = pool_sizes.to(torch.int64).cpu()
    rows = int(pool_sizes.shape[0])
    if rows and int(pool_sizes.min()) < 1:
        raise ValueError("sample_indices: every pool must hold at least one element")
    if replacement:
        return _floor_uniform((rows, length), pool_sizes, gen)
    out = torch.empty(rows, length, dtype=torch.int64)

    sparse = pool_sizes >= 2 * length  # rejection
    if bool(sparse.any()):
        idx = sparse.nonzero().squeeze(1)
        pool = pool_sizes[idx]
        v = _floor_uniform((idx.numel(), length), pool, gen)  # [R_s, T]
        for _ in range(200):
            s, order = v.sort(dim=1, stable=True)  # equal values keep their original order
            dup_sorted = torch.zeros_like(v, dtype=torch.bool)
            dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]  # every copy but the first (in time order)
            if not bool(dup_sorted.any()):
                break
            dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)  # back to time order
            v = torch.where(dup, _floor_uniform((idx.numel(), length), pool, gen), v)
        else:  # pragma: no cover - astronomically unlikely at pool >= 2T
            raise RuntimeError("sample_indices: rejection sampling did not converge")
        out[idx] = v

    dense = (pool_sizes >= length) & ~sparse
    if bool(dense.any()):
        idx = dense.nonzero().squeeze(1)
        pool = pool_sizes[idx]
        width = int(pool.max())
        keys = torch.rand(idx.numel(), width, generator=gen)  # [R_d, P_max]
        keys.masked_fill_(torch.arange(width)[None, :] >= pool[:, None], 2.0)  # padding sorts last
        out[idx] = keys.argsort(dim=1)[:, :length]

    short = pool_sizes < length  # epoch-style: concatenated permutations
    if bool(short.any()):
        for p in torch.unique(pool_sizes[short]).tolist():
            idx = (short & (pool_sizes == p)).nonzero().squeeze(1)
            reps = math.ceil(length / p)
            keys = torch.rand(idx.numel(), reps, p, generator=gen)  # [R_p, reps, p]
            out[idx] = keys.argsort(dim=2).reshape(idx.numel(), reps * p)[:, :length]
    return out


def sample_class_subsets(
    num_episodes: int, num_classes: int, k: int, gen: torch.Generator
) -> torch.Tensor:
    """int64 [E, k]: a uniformly random k-subset of 0..C-1 per episode, sorted ascending (so relabelling keeps
    the original class order; combine with a label permutation for random orders)."""
    if not 1 <= k <= num_classes:
        raise ValueError(f"class subset size must be in [1, {num_classes}], got {k}")
    perms = random_permutations(num_episodes, num_classes, gen)  # [E, C]
    return perms[:, :k].sort(dim=1).values


def relabel_to_subset(y: torch.Tensor, subsets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Map original labels y [E, T] to their position in the episode's subset [E, k] (-1 if absent)."""
    lookup = torch.full((subsets.shape[0], num_classes), -1, dtype=torch.int64, device=y.device)  # [E, C]
    pos = torch.arange(subsets.shape[1], device=y.device).expand_as(subsets)  # [E, k]
    lookup.scatter_(1, subsets.to(y.device), pos)
    return lookup.gather(1, y)  # [E, T]


def glorot_uniform_limit(fan_in: int, fan_out: int) -> float:
    """l = sqrt(6 / (fan_in + fan_out)): Glorot-uniform entries are U(-l, l)."""
    return math.sqrt(6.0 / (fan_in + fan_out))


def random_projection(x: torch.Tensor, out_dim: int, gen: torch.Generator | Sequence[torch.Generator], *,
                      shared: bool = False) -> torch.Tensor:
    """x' = x R per episode, R [D, D'] with entries U(-l, l), l = sqrt(6 / (D + D')) (Glorot uniform).

    Args:
        x: float32 [E, T, D] (normalised inputs).
        out_dim: D'.
        gen: a generator on x's device (the matrices are drawn there), consumed in episode order; or a
            sequence of E generators on x's device, episode e's matrix drawn from ``gen[e]`` alone
            (per-episode streams: any subset of episodes can be built without the others).
        shared: draw one R for all episodes (the reference's fixed projection) instead of one per episode.

    Returns:
        float32 [E, T, D']. The matrices are drawn and applied in chunks of episodes so that at most
        :data:`PROJECTION_CHUNK_ELEMENTS` matrix entries exist at once.
    """
    e, t, d = x.shape
    limit = glorot_uniform_limit(d, out_dim)
    gens = None if isinstance(gen, torch.Generator) else list(gen)
    if gens is not None and (shared or len(gens) != e):
        raise ValueError(f"random_projection: per-episode generators need shared=False and one per episode "
                         f"({e}), got {len(gens)}")
    if shared:
        r = torch.rand(d, out_dim, generator=gen, device=x.device, dtype=x.dtype).mul_(2.0 * limit).sub_(limit)
        return x @ r  # [E, T, D] @ [D, D'] -> [E, T, D']
    out = torch.empty(e, t, out_dim, dtype=x.dtype, device=x.device)
    chunk = max(1, PROJECTION_CHUNK_ELEMENTS // (d * out_dim))
    for start in range(0, e, chunk):
        stop = min(e, start + chunk)
        if gens is None:
            r = torch.rand(stop - start, d, out_dim, generator=gen, device=x.device, dtype=x.dtype)  # [e_c, D, D']
        else:
            r = torch.empty(stop - start, d, out_dim, device=x.device, dtype=x.dtype)
            for j in range(start, stop):
                torch.rand(d, out_dim, generator=gens[j], device=x.device, dtype=x.dtype, out=r[j - start])
        r.mul_(2.0 * limit).sub_(limit)
        torch.bmm(x[start:stop], r, out=out[start:stop])  # [e_c, T, D] @ [e_c, D, D'] -> [e_c, T, D']
    return out


def apply_permutation(x: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Permute the features of every step of episode e by perms[e]: x [E, T, D], perms [E, D] -> [E, T, D]."""
    t = x.shape[1]
    return x.gather(2, repeat(perms.to(x.device), "e d -> e t d", t=t))


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, no antialiasing, like ``tf.image.resize``):
    [E, T, H, W] -> [E, T, h, w]."""
    e, t, h, w = x.shape
    if (h, w) == tuple(size):
        return x
    flat = rearrange(x, "e t h w -> (e t) 1 h w")  # one single-channel image per example
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    return rearrange(out, "(e t) 1 h w -> e t h w", e=e)
