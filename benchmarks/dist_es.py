"""Throughput of distributed ES (vsml/training/distributed.py): episodes/s with 1, 2, ... processes.

    python benchmarks/dist_es.py                         # 1 and 2 gloo processes on this machine
    python benchmarks/dist_es.py --procs 1,2,4 --pairs 64 --length 100 --trials 5
    python benchmarks/dist_es.py --device cuda --procs 1,2,4,8   # one GPU per process (NCCL)

Each row launches ``torchrun --standalone --nproc_per_node W`` on this script in worker mode.  A
worker builds the ES step of ``--preset default-clone``, the default job before 2026-12-07 (VSML 1 layer,
``--task`` episodes, ``--pairs`` antithetic pairs, ``--length`` examples per episode), samples the step's global data batch, and times
:class:`vsml.estimators.core.ESEstimator` sharded by :class:`vsml.training.distributed.ShardedEstimator`, ``.estimate`` + the Adam step (the part that is
distributed; the data sampling, replicated on every rank, is timed separately and reported) over
``--steps`` meta-steps per trial, ``--trials`` trials after one warm-up step.  Rank 0 prints one
JSON line; the launcher prints a table: episodes/s = 2·pairs·steps / time (one episode = one
population member's unroll of ``--length`` examples), best and spread over the trials, speed-up
over the first row and parallel efficiency = speed-up / W.  Intra-op threads per process:
``--threads`` (1 by default, so W processes use W cores).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(a: DistESArgs) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from tasks import derive_seed, make_family
    from vsml.estimators.core import ESEstimator
    from vsml.training.distributed import ShardedEstimator, init_distributed
    from vsml.estimators.core import make_optimizer
    from vsml.engine.network import VSMLNetwork
    from vsml.training.presets import get, replace

    cfg = get("default-clone")          # the ES workload of the default job before 2026-12-07 (cloning + ES)
    cfg = replace(cfg, task=a.task, episode_length=a.length, device=a.device,
                  backend=("auto" if a.compile else "torch"),
                  clone=replace(cfg.clone, steps=0), es=replace(cfg.es, pairs=a.pairs))
    ctx = init_distributed(cfg)
    net = VSMLNetwork(cfg.vsml, backend=cfg.backend)
    theta = torch.nn.Parameter(net.init_theta(torch.Generator().manual_seed(0)).to(ctx.device))
    opt = make_optimizer(theta, 0.025)
    est = ShardedEstimator(ESEstimator(net, cfg.es, max_batch=a.member_batch or None), ctx)
    family = make_family(cfg.task)
    family.prepare(("train",))

    def batch(step):
        b = family.sample(cfg.es.pairs, cfg.episode_length, seed=derive_seed(0, "meta-train-data", step),
                          split="train")
        return b.x.to(ctx.device), b.y.to(ctx.device), b.num_classes

    def one_step(step, data):
        x, y, c = data
        grad, _ = est.estimate(theta.detach(), x, y, c, step)
        theta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if ctx.distributed:
            torch.distributed.barrier()

    one_step(0, batch(0))                                   # warm-up (and compilation, if any)
    times, sample_s, step = [], [], 1
    for _ in range(a.trials):
        data = []
        t0 = time.perf_counter()
        for k in range(a.steps):
            data.append(batch(step + k))
        sample_s.append((time.perf_counter() - t0) / a.steps)
        sync()
        t0 = time.perf_counter()
        for k in range(a.steps):
            one_step(step + k, data[k])
        sync()
        times.append(time.perf_counter() - t0)
        step += a.steps
    ctx.check_in_sync(step, theta, opt)                     # the timed steps kept θ identical
    if ctx.is_main:
        eps = [2 * a.pairs * a.steps / t for t in times]
        print("BENCH " + json.dumps({"procs": ctx.world_size, "threads": a.threads, "eps": eps,
                                     "sample_s_per_step": statistics.median(sample_s)}), flush=True)
    ctx.close()


def launch(a: DistESArgs) -> None:
    rows, load_before = [], os.getloadavg()[0]
    for w in [int(v) for v in a.procs.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(w),
               str(Path(__file__).resolve()), "--worker", "--pairs", str(a.pairs), "--length", str(a.length),
               "--task", a.task, "--trials", str(a.trials), "--steps", str(a.steps), "--threads", str(a.threads),
               "--device", a.device, "--member_batch", str(a.member_batch)] + (["--compile"] if a.compile else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
               "PYTHONPATH": str(ROOT)}
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH ")]
        if p.returncode != 0 or not lines:
            sys.exit(f"W={w} failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][6:]))
    base = max(rows[0]["eps"])
    print(f"ES, VSML 1 layer, task {a.task}, {a.pairs} pairs ({2 * a.pairs} episodes/step) x {a.length} "
          f"examples, {a.threads} thread(s)/process, device {a.device}, compile={a.compile}; "
          f"{a.trials} trials x {a.steps} steps; 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print()
    print("| processes | episodes/s (best) | median | min–max | speed-up (best) | efficiency | data sampling s/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e = r["eps"]
        sp = max(e) / base
        print(f"| {r['procs']} | {max(e):.1f} | {statistics.median(e):.1f} | {min(e):.1f}–{max(e):.1f} | "
              f"{sp:.2f}x | {sp / (r['procs'] / rows[0]['procs']):.0%} | {r['sample_s_per_step']:.3f} |")


@dataclass(frozen=True)
class DistESArgs:
    procs: str = "1,2"                # comma-separated process counts
    pairs: int = 32
    length: int = 100
    task: str = "digits+proj"
    trials: int = 5
    steps: int = 3                    # meta-steps per trial
    threads: int = 1                  # intra-op threads per process
    device: str = "cpu"
    compile: bool = False             # torch.compile the no-grad tick (as train.py)
    member_batch: int = 0
    worker: bool = False              # internal: run as one torchrun worker (set by the launcher)


def main() -> None:
    from vsml.training.cli import parse
    a = parse(DistESArgs, prog="benchmarks/dist_es.py", description=__doc__)
    worker(a) if a.worker else launch(a)


if __name__ == "__main__":
    main()
