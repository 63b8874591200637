"""Tail (Polyak) averaging of θ over meta-training (``TrainConfig.average_every``).

With ``average_every = K > 0`` a run also keeps the mean of θ at every K-th meta-step after the cloning phase,

    θ̄_n = (1/n) Σ_{k=1..n} θ_{s_k},    s_k = clone.steps + k·K,

(Polyak & Juditsky 1992; SWA, Izmailov et al. 2018; model soups, Wortsman et al. 2022).  With a noisy
meta-gradient Adam moves every θ value by ~lr per step whatever the sign's reliability, so the iterate
random-walks around a slowly moving mean; θ̄ keeps the drift and cancels the walk (issue 15, RESULTS.md,
eleventh session: the mean beat the iterate at both steps measured).  θ̄ is *the run's θ*: the final and
periodic meta-tests use it, ``theta.safetensors`` holds it, and ``eval.py --checkpoint RUN`` loads it.  The
float64 sum and the count travel in every checkpoint (``extra["average"]``), so a resumed run averages
exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ThetaAverage:
    every: int                          # K; 0 = off (the run's θ is the iterate)
    after: int = 0                      # clone.steps: only meta-training steps are averaged
    total: torch.Tensor | None = None   # float64 Σ θ_{s_k}, θ's shape
    n: int = 0
    first: int | None = None            # s_1 and s_n, for the record
    last: int | None = None

    def update(self, step: int, theta: torch.Tensor) -> None:
        """Call after meta-step ``step`` (1-based): adds θ when step is one of the s_k."""
        if not self.every or step <= self.after or (step - self.after) % self.every:
            return
        t = theta.detach().to(torch.float64)
        self.total = t.clone() if self.total is None else self.total + t
        self.n += 1
        self.first = step if self.first is None else self.first
        self.last = step

    def value(self, theta: torch.Tensor) -> torch.Tensor:
        """The run's θ: θ̄_n once it has a member, else the iterate ``theta``."""
        return _mean(self.total, self.n, theta)

    def describe(self) -> str:
        if self.n == 1:
            return f"θ at step {self.first} (the first member of the mean every {self.every} steps)"
        steps = (f"{self.first} and {self.last}" if self.n == 2
                 else f"{self.first}, {self.first + self.every}, ..., {self.last}")
        return f"the mean of {self.n} θ at steps {steps}"

    def state_dict(self) -> dict:
        return {"every": self.every, "after": self.after, "sum": None if self.total is None else self.total.cpu(),
                "n": self.n, "first": self.first, "last": self.last}

    def load_state_dict(self, d: dict | None, device: torch.device | str = "cpu") -> None:
        if not d:
            return
        self.total = None if d["sum"] is None else d["sum"].to(device)
        self.n, self.first, self.last = int(d["n"]), d["first"], d["last"]


def checkpoint_theta(ck: dict) -> torch.Tensor:
    """The θ a training checkpoint stands for: its running mean θ̄ when the run averages (and has a member),
    else its iterate."""
    d = ck.get("extra", {}).get("average") or {}
    return _mean(d.get("sum"), d.get("n", 0), ck["theta"])


def _mean(total: torch.Tensor | None, n: int, theta: torch.Tensor) -> torch.Tensor:
    """θ̄ = total / n in θ's dtype and device; the iterate θ while n = 0."""
    return (total / n).to(dtype=theta.dtype, device=theta.device) if n else theta.detach()
