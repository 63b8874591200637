"""ES meta-steps per second under different intra-op thread counts, alone or next to a busy process.

    python -m benchmarks.threads                          # the README's "Threads" table (about 2 minutes)
    python -m benchmarks.threads --shapes tiny --threads 1,2

Each measurement is a fresh process with ``OMP_NUM_THREADS`` set before torch starts; "loaded" runs
it while another process spins on one core (``python -c 'while True: pass'``), as any other job on
a shared machine would.  Shapes: ``tiny`` = ``--preset tiny``-like ES (digits+proj, 8 pairs, 50-example
episodes); ``default`` = the default job's ES phase (mnist5k+resize8+proj, 32 pairs, 100 examples).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

@dataclass(frozen=True)
class ThreadsArgs:
    shapes: str = "tiny,default"      # comma-separated: tiny, default
    threads: str = "1,2"              # comma-separated intra-op thread counts to compare


SHAPES = {"tiny": {"task": "digits+proj", "pairs": 8, "length": 50, "steps": 12},
          "default": {"task": "mnist5k+resize8+proj", "pairs": 32, "length": 100, "steps": 4}}


def worker(shape: str) -> float:
    import torch

    from tasks import make_family
    from vsml.estimators.core import ESEstimator
    from vsml.estimators.es import ESConfig
    from vsml.learners.registry import build_learner
    from vsml.training.config import TrainConfig
    s = SHAPES[shape]
    cfg = TrainConfig(task=s["task"], es=ESConfig(pairs=s["pairs"]), episode_length=s["length"])
    learner = build_learner(cfg)
    theta = learner.init_theta(torch.Generator().manual_seed(0))
    est = ESEstimator(learner, cfg.es)
    fam = make_family(cfg.task)
    batches = [fam.sample(s["pairs"], s["length"], seed=i, split="train") for i in range(s["steps"] + 2)]
    for b in batches[:2]:                                   # warm-up (kernel load, caches)
        est.estimate(theta, b.x, b.y, b.num_classes, 0)
    t0 = time.perf_counter()
    for i, b in enumerate(batches[2:]):
        est.estimate(theta, b.x, b.y, b.num_classes, i)
    return s["steps"] / (time.perf_counter() - t0)


def measure(threads: int, shape: str, loaded: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        out = subprocess.run([sys.executable, "-c", f"from benchmarks.threads import worker; print(worker({shape!r}))"],
                             env=env, capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from vsml.training.cli import parse
    args = parse(ThreadsArgs, argv, prog="benchmarks/threads.py", description=__doc__)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print("| shape | threads | alone: ES steps/s | next to 1 busy process: ES steps/s |")
    print("|---|---:|---:|---:|")
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        for t in (int(v) for v in args.threads.split(",")):
            alone, loaded = measure(t, shape, False), measure(t, shape, True)
            print(f"| {shape} | {t} | {alone:.2f} | {loaded:.2f} |", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
