"""The Guessing Game and its frequency-principle variant as task families (badger-bmg-es.md §A.2, §A.4).

An agent must guess N hidden numbers y ∈ R^N; its only observation is the scalar feedback
e_t = c · mean_d (g_{t−1,d} − y_d)² of its previous guess (c = 3: chance = 1 for U[−1, 1]).

Encoding in an :class:`~tasks.base.EpisodeBatch` (so that ``train()`` and the estimators handle it like
any other family; the learner is :class:`vsml.learners.badger.MicroBadger`):

* ``x`` float32 [E, T, N_max]: the hidden targets, repeated at every inner step t (zero beyond the
  episode's N_e).  The learner never sees x; it computes the feedback from it.
* ``y`` int64 [E, T]: N_e − 1 at every step (the number of active coordinates; N_e ≤ N_max).
* ``num_classes`` = N_max; ``info["targets"]`` [E, N_max] and ``info["n"]`` [E] for analysis.

Families:

* :class:`GuessingFamily` — y_d ~ U[−1, 1] (2019 ``ImageTask``); N fixed or drawn per episode from
  [n_min, n_max] (``guessing[n=3-6]``).
* :class:`SinusoidFamily` — N = 41 samples y_j = Σ_{k∈K} A_k sin(k x_j + φ_k) on the periodic grid
  x_j = 2πj/N with φ_k ~ U[0, 2π) per episode (§A.4, reconstruction [R]).  Amplitudes equal or ∝ 1/k,
  normalised so that E[y_j²] = ``variance`` (default 1/3, the second moment of U[−1, 1], so the same
  c = 3 puts chance at 1).  :func:`frequency_errors` gives Xu et al.'s Δ_F(k).

Spec strings (``make_family``): ``guessing``, ``guessing[n=3]``, ``guessing[n=3-6]``,
``sinusoid``, ``sinusoid[n=41,k=1-5,decay=1]`` (decay=1: A_k ∝ 1/k).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from .base import EpisodeBatch, TaskFamily, check_sample_args, torch_generator

__all__ = ["GuessingFamily", "SinusoidFamily", "frequency_errors", "is_guessing_spec", "make_guessing_family"]


def _batch(targets: torch.Tensor, n_e: torch.Tensor, length: int, name: str, info: dict) -> EpisodeBatch:
    """targets [E, N_max] (zero beyond n_e), n_e [E] -> EpisodeBatch (x [E, T, N_max], y [E, T])."""
    e, nmax = targets.shape
    x = targets[:, None, :].expand(e, length, nmax).contiguous()                # [E, T, N_max]
    y = (n_e - 1)[:, None].expand(e, length).contiguous().to(torch.int64)        # [E, T]
    return EpisodeBatch(x=x.to(torch.float32), y=y, num_classes=nmax, name=name,
                        info={**info, "targets": targets, "n": n_e})


class GuessingFamily(TaskFamily):
    """Guess N numbers y ~ U[−1, 1]^N from scalar feedback (§A.2); N drawn per episode in [n_min, n_max]."""

    def __init__(self, n_min: int = 3, n_max: int | None = None, name: str | None = None):
        n_max = n_min if n_max is None else n_max
        if not (isinstance(n_min, int) and isinstance(n_max, int) and 1 <= n_min <= n_max):
            raise ValueError(f"guessing: need integers 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_min, self.n_max = n_min, n_max
        self.name = name or (f"guessing[n={n_min}]" if n_min == n_max else f"guessing[n={n_min}-{n_max}]")

    @property
    def num_classes(self) -> int:
        return self.n_max

    @property
    def input_dim(self) -> int:
        return self.n_max

    def sample(self, num_episodes, length, seed, split="train", *, device=None) -> EpisodeBatch:
        check_sample_args(num_episodes, length, seed, split)
        gen = torch_generator(seed, split, "guessing")
        y = torch.rand(num_episodes, self.n_max, generator=gen) * 2 - 1          # [E, N_max] ~ U[-1, 1]
        n_e = torch.randint(self.n_min, self.n_max + 1, (num_episodes,), generator=gen)
        y = y * (torch.arange(self.n_max)[None, :] < n_e[:, None])
        b = _batch(y, n_e, length, self.name, {"split": split, "seed": seed})
        return b if device is None else b.to(device)


class SinusoidFamily(TaskFamily):
    """Guess N = 41 samples of a sum of sinusoids with random phases (§A.4 frequency-principle variant)."""

    def __init__(self, n_points: int = 41, freqs: Sequence[int] = (1, 2, 3, 4, 5), decay: bool = False,
                 variance: float = 1.0 / 3.0, name: str | None = None):
        freqs = tuple(int(k) for k in freqs)
        if n_points < 3:
            raise ValueError(f"sinusoid: n_points must be >= 3, got {n_points}")
        if not freqs or min(freqs) < 1 or max(freqs) >= n_points / 2 or len(set(freqs)) != len(freqs):
            raise ValueError(f"sinusoid: frequencies must be distinct integers in 1..{(n_points - 1) // 2} "
                             f"(below Nyquist for N={n_points}), got {freqs}")
        if not variance > 0:
            raise ValueError(f"sinusoid: variance must be > 0, got {variance}")
        self.n_points, self.freqs, self.decay, self.variance = int(n_points), freqs, bool(decay), float(variance)
        raw = np.array([1.0 / k if decay else 1.0 for k in freqs])
        # E[y_j²] = Σ A_k² / 2 over the random phases -> scale to `variance`
        self.amplitudes = raw * math.sqrt(2 * variance / float((raw ** 2).sum()))
        ks = f"{min(freqs)}-{max(freqs)}" if freqs == tuple(range(min(freqs), max(freqs) + 1)) else \
            ":".join(map(str, freqs))
        self.name = name or f"sinusoid[n={n_points},k={ks}{',decay=1' if decay else ''}]"

    @property
    def num_classes(self) -> int:
        return self.n_points

    @property
    def input_dim(self) -> int:
        return self.n_points

    @property
    def grid(self) -> torch.Tensor:
        """x_j = 2πj/N, j = 0..N−1 (periodic, no duplicated end point)."""
        return 2 * math.pi * torch.arange(self.n_points, dtype=torch.float64) / self.n_points

    def sample(self, num_episodes, length, seed, split="train", *, device=None) -> EpisodeBatch:
        check_sample_args(num_episodes, length, seed, split)
        gen = torch_generator(seed, split, "sinusoid")
        phases = torch.rand(num_episodes, len(self.freqs), generator=gen, dtype=torch.float64) * 2 * math.pi
        k = torch.tensor(self.freqs, dtype=torch.float64)                      # [K]
        amp = torch.tensor(self.amplitudes, dtype=torch.float64)               # [K]
        arg = k[None, :, None] * self.grid[None, None, :] + phases[:, :, None]  # [E, K, N]
        y = (amp[None, :, None] * torch.sin(arg)).sum(1).to(torch.float32)     # [E, N]
        n_e = torch.full((num_episodes,), self.n_points, dtype=torch.long)
        b = _batch(y, n_e, length, self.name, {"split": split, "seed": seed, "phases": phases,
                                               "freqs": self.freqs})
        return b if device is None else b.to(device)


def frequency_errors(guess: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                     freqs: Sequence[int]) -> np.ndarray:
    """Relative error per frequency Δ_F(k) = |ĝ_k − ŷ_k| / |ŷ_k| (Xu et al. 2019; §A.4), averaged over tasks.

    guess, target: [..., E, N] (any leading axes, e.g. [T, E, N] for every inner step); the DFT runs over
    the last axis.  Returns [..., K] (the mean over the E axis, the second-to-last).
    """
    g = np.asarray(guess.detach().cpu() if torch.is_tensor(guess) else guess, dtype=np.float64)
    y = np.asarray(target.detach().cpu() if torch.is_tensor(target) else target, dtype=np.float64)
    if g.shape[-1] != y.shape[-1] or g.ndim < 2:
        raise ValueError(f"frequency_errors: guess {g.shape} and target {y.shape} need [..., E, N] with the same N")
    gh = np.fft.rfft(g, axis=-1)                                               # [..., E, N//2+1]
    yh = np.fft.rfft(y, axis=-1)
    ks = list(freqs)
    if max(ks) >= gh.shape[-1]:
        raise ValueError(f"frequency_errors: frequency {max(ks)} above Nyquist for N = {g.shape[-1]}")
    rel = np.abs(gh[..., ks] - yh[..., ks]) / np.maximum(np.abs(yh[..., ks]), 1e-12)  # [..., E, K]
    return rel.mean(axis=-2)


_SPEC_RE = re.compile(r"^(guessing|sinusoid)(?:\[(.*)\])?$")


def is_guessing_spec(spec: str) -> bool:
    """True for specs handled by :func:`make_guessing_family` ("guessing...", "sinusoid...")."""
    return bool(_SPEC_RE.match(re.sub(r"\s+", "", spec).lower()))


def _range(val: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", val)
    if not m:
        raise ValueError(f"{what}: expected an integer or a range a-b, got {val!r}")
    lo = int(m.group(1))
    return lo, int(m.group(2)) if m.group(2) else lo


def make_guessing_family(spec: str) -> TaskFamily:
    """``guessing[n=3]`` / ``guessing[n=3-6]`` / ``sinusoid[n=41,k=1-5,decay=1]`` -> a family."""
    s = re.sub(r"\s+", "", spec).lower()
    m = _SPEC_RE.match(s)
    if not m:
        raise ValueError(f"not a guessing-game spec: {spec!r} (use guessing[n=3], guessing[n=3-6] or "
                         f"sinusoid[n=41,k=1-5,decay=1])")
    kind, body = m.group(1), m.group(2) or ""
    params: dict[str, str] = {}
    for tok in [t for t in body.split(",") if t]:
        if "=" not in tok:
            raise ValueError(f"{spec!r}: parameter {tok!r} must be key=value")
        key, val = tok.split("=", 1)
        params[key] = val
    allowed = {"guessing": {"n"}, "sinusoid": {"n", "k", "decay"}}[kind]
    bad = set(params) - allowed
    if bad:
        raise ValueError(f"{spec!r}: unknown parameter(s) {sorted(bad)}; {kind} takes {sorted(allowed)}")
    if kind == "guessing":
        lo, hi = _range(params.get("n", "3"), f"{spec!r} n")
        return GuessingFamily(lo, hi)
    n = int(params.get("n", "41"))
    if "k" in params:
        if ":" in params["k"]:
            freqs = tuple(int(v) for v in params["k"].split(":"))
        else:
            a, b = _range(params["k"], f"{spec!r} k")
            freqs = tuple(range(a, b + 1))
    else:
        freqs = (1, 2, 3, 4, 5)
    decay = params.get("decay", "0")
    if decay not in ("0", "1"):
        raise ValueError(f"{spec!r}: decay must be 0 or 1, got {decay!r}")
    return SinusoidFamily(n, freqs, decay=decay == "1")
