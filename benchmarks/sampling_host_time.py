"""Host (CPU) time per meta-step spent on sampling data and initial states, at the paper preset's shapes.

    python benchmarks/sampling_host_time.py                      # paper-mnist: 1024 pairs x 500, mnist+proj
    python benchmarks/sampling_host_time.py --episodes 2048 --repeats 1

Two numbers (issue 14, item 2):

* before -- what a CUDA run's host did every ES step before the sampling moved to the device: the whole
  batch built on the CPU (``family.sample(P, T, ...)``: index draw, gather, normalise and P per-episode
  784x784 projections by bmm) and the P initial states drawn on the CPU (float64 truncated normal), then
  copied to the GPU.  Measured here by running exactly that on this CPU.
* after (host part) -- what stays on the host when ``device`` is CUDA: the example-index draw (O(E*T)),
  the per-episode generator seeds of the projections and of the initial states (derive_seed /
  pair_seed, one generator object per episode).  The gather, projections and states then run on the GPU
  (not measurable here: no GPU in this session; ``benchmarks/gpu_check.py`` times them there).

Prints one Markdown table row per measurement; threads: torch's default unless --threads.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout's vsml/, tasks/, kernels/

import torch

from tasks import make_family
from tasks.base import torch_generator
from vsml.engine.config import VSMLConfig
from vsml.engine.network import VSMLNetwork
from vsml.estimators.core import ESEstimator, state_seed
from vsml.estimators.es import ESConfig


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class HostTimeArgs:
    """Options of benchmarks/sampling_host_time.py (``--help``)."""

    task: str = "mnist+proj"
    episodes: int = 1024            # data episodes per step (paper: 1024 pairs)
    length: int = 500
    repeats: int = 2
    threads: int | None = None
    data_dir: str | None = None     # default $VSML_DATA_DIR


def main(argv=None) -> None:
    from vsml.training.cli import parse
    a = parse(HostTimeArgs, argv, prog="sampling_host_time.py", description=__doc__)
    a = replace(a, data_dir=a.data_dir or os.environ.get("VSML_DATA_DIR"))
    if a.threads:
        torch.set_num_threads(a.threads)
    fam = make_family(a.task, data_dir=a.data_dir)
    fam.prepare(("train",))
    src = fam.members()[0].source
    e, t = a.episodes, a.length
    d, c = fam.input_dim, fam.num_classes
    net = VSMLNetwork(VSMLConfig())
    est = ESEstimator(net, ESConfig(pairs=e, seed=0))
    fam.sample(2, 2, 0, "train")                                        # warm caches

    def before_sample():
        b = fam.sample(e, t, 7, "train")                                # everything on the CPU
        return b.x.shape

    def before_states():
        return est.initial_state(e, d, c, step=7)                       # CPU, one stream

    def after_host():
        real, y = src.draw_indices(e, t, 7, "train", None)              # the host's share of sample()
        gens = [torch_generator(7, "train", "proj", i) for i in range(e)]   # per-episode seeds
        seeds = [state_seed(0, 7, i) for i in range(e)]                 # per-pair state seeds
        gs = [torch.Generator().manual_seed(s) for s in seeds]
        return real.shape, len(gens), len(gs)

    rows = []
    tb_s = _best(before_sample, a.repeats)
    tb_st = _best(before_states, a.repeats)
    ta = _best(after_host, max(a.repeats, 3))
    rows.append(("before: family.sample on CPU", tb_s))
    rows.append(("before: initial states on CPU (float64 TN)", tb_st))
    rows.append(("before: total host time per step", tb_s + tb_st))
    rows.append(("after (device=cuda): host part (indices + per-episode seeds)", ta))
    print(f"## host sampling time per ES step: {a.task}, {e} episodes x {t} examples, D={d}, "
          f"784->{c} states; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"best of {a.repeats}; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| what | seconds |")
    print("|---|---:|")
    for name, v in rows:
        print(f"| {name} | {v:.3f} |")
    print(f"\nhost time per step: {tb_s + tb_st:.2f} s before -> {ta:.3f} s after "
          f"({(tb_s + tb_st) / ta:.0f}x less on the host)")


if __name__ == "__main__":
    main()
