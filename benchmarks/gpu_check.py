"""The GPU check of issue 14: one command, <= 8 minutes on one H100, writes JSON and a Markdown table.

    python benchmarks/gpu_check.py --out gpu_check_out --data_dir .gpudata      # on a GPU machine
    python benchmarks/gpu_check.py --smoke --out /tmp/gc                         # CPU, seconds (CI runs this)

Sections (each guarded: a failure is recorded in the report and the next section runs):

1. ``pytest -m gpu`` (the GPU-marked tests: fused kernel vs torch on CUDA, backend=triton training step,
   sampling on the device), as a subprocess with a time limit; pass/fail counts and the tail of its output.
2. The kernel bench (``kernels.bench.bench_cell``, ES-style per-episode θ, forward-only, no LayerNorm) at
   E in {1, 16, 256, 2048} for 784->10 and 784->32->10 with the fused kernel v1, v2 (when
   ``kernels.backend.fused_kernel("v2")`` exists; else skipped with a note) and torch eager, in the same run.
3. The measured float32 and TF32 matmul peak of the GPU (torch.mm 8192^2, best of 5).
4. One end-to-end paper-scale ES step (runs before the bench, which is cut at --deadline): 2048 members =
   1024 pairs x 500 examples, 784->10, projections on, task mnist+proj (random+proj when the MNIST files are
   not found), through the trainer's own estimator (``vsml.training.trainer._estimator`` +
   ``distribute_estimator``), timed by phase: sampling (the batch, built on the device), states (the
   per-pair initial states alone; the unroll draws them again), population (es_ask: θ ± σε), unroll (the
   members; backend auto = the fused kernel, launches counted), update (es_tell + Adam).  One warm-up step
   (Triton compile) is not timed.

``--smoke``: the same code at a tiny size on the CPU (the fused kernel under the Triton interpreter,
1 pair x 2 examples of random[side=4]+proj, a 16->4 net), no pytest section; it checks the script, not the GPU.
Outputs: ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``.  Budgets: --budget seconds per bench cell,
--pytest-timeout for section 1; the defaults fit 8 minutes on an H100 with room to spare.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                  # this checkout's vsml/, tasks/, kernels/ (no install needed)


def _setup_env(smoke: bool) -> None:
    import torch
    if smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before kernels is imported


def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------------ sections


def run_pytest(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               [str(ROOT)] + [v for v in [os.environ.get("PYTHONPATH")] if v])})
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    summary = next((ln for ln in reversed(out.splitlines()) if " passed" in ln or " failed" in ln
                    or " error" in ln or "no tests ran" in ln), "")
    return {"command": " ".join(cmd[1:]), "returncode": rc, "summary": summary.strip("= "),
            "seconds": round(time.perf_counter() - t0, 1), "tail": out[-4000:]}


def matmul_peaks(dev, smoke: bool) -> dict:
    import torch
    n = 256 if smoke else 8192
    out = {"n": n}
    for name, tf32 in (("fp32", False), ("tf32", True)):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=dev)
            b = torch.randn(n, n, device=dev)
            c = torch.empty(n, n, device=dev)
            torch.mm(a, b, out=c)
            _sync(dev)
            best = math.inf
            for _ in range(5):
                t0 = time.perf_counter()
                torch.mm(a, b, out=c)
                _sync(dev)
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_tflops"] = round(2 * n ** 3 / best / 1e12, 3)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    if dev.type != "cuda":
        out["note"] = "CPU: TF32 does not apply (both rows are fp32)"
    return out


def kernel_versions(dev) -> dict:
    """{version: version or None, version_why: reason} for the fused kernel versions that run on ``dev``."""
    from kernels import backend as kb
    out = {}
    for v in ("v1", "v2"):
        try:
            kb.fused_kernel(v)
            kb.resolve_backend("triton", dev)
            out[v] = v
        except Exception as exc:   # noqa: BLE001 - v2 lands on another branch; no triton / no GPU
            out[v] = None
            out[f"{v}_why"] = f"{type(exc).__name__}: {exc}"
    return out


def bench(dev, smoke: bool, episodes: list[int], nets: list[str], steps: int, budget: float,
          deadline: float = math.inf) -> dict:
    """Kernel bench rows; cells that would start after ``deadline`` (a perf_counter time) are skipped."""
    import torch

    from kernels import backend as kb
    from kernels.bench import NOMINAL_FLOPS_PER_MICROSTEP, bench_cell, parse_net
    from vsml.engine.config import VSMLConfig
    from vsml.engine.network import VSMLNetwork
    versions = kernel_versions(dev)
    rows, notes = [], []
    for v in ("v1", "v2"):
        if versions[v] is None:
            notes.append(f"fused kernel {v}: skipped ({versions[f'{v}_why']})")
    for spec in nets:
        d, hidden, c = parse_net(spec)
        cfg = VSMLConfig(hidden_sizes=hidden)
        pairs = sum(a * b for a, b in cfg.layer_dims(d, c))
        for e in episodes:
            runners = {"torch eager": None}
            for v in ("v1", "v2"):
                if versions[v] is not None:
                    runners[f"fused {v}"] = v
            eager_rate = None
            for label, ver in runners.items():
                if ver is None:
                    net = VSMLNetwork(cfg, backend="torch")
                    run = (lambda n: lambda th, x, y, st: n.unroll(th, x, y, state=st).state)(net)
                else:
                    net = VSMLNetwork(cfg)
                    run = (lambda n, k: lambda th, x, y, st: kb.unroll(n, th, x, y, state=st, backend="triton",
                                                                         kernel=k).state)(net, ver)
                row = {"backend": label, "net": spec, "E": e}
                if time.perf_counter() > deadline:
                    row["error"] = "skipped: the check's time budget (--deadline) ran out"
                    rows.append(row)
                    continue
                try:
                    calls0 = sum(kb.KERNEL_CALLS.values())
                    rate, timed = bench_cell(run, cfg, e, d, c, steps, max(2, min(steps, 5)), budget, dev)
                    if ver is not None and sum(kb.KERNEL_CALLS.values()) == calls0:
                        raise RuntimeError("the fused kernel was not called")
                    gf = rate * pairs * cfg.micro_ticks * NOMINAL_FLOPS_PER_MICROSTEP / 1e9
                    row.update(examples_per_s=round(rate, 2), gflops=round(gf, 2), timed_T=timed)
                    if ver is None:
                        eager_rate = rate
                    elif eager_rate:
                        row["vs_eager"] = round(rate / eager_rate, 2)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001 - keep the table going
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                rows.append(row)
                print(f"[gpu_check] bench {row}", flush=True)
    return {"rows": rows, "notes": notes, "steps": steps, "budget_s": budget}


def es_step(dev, smoke: bool, data_dir: str | None, task: str | None, backend: str) -> dict:
    """One paper-scale ES step through the trainer's estimator, timed by phase (after one warm-up step)."""
    import torch

    from kernels import backend as kb
    from tasks import DatasetError, make_family
    from tasks.base import derive_seed
    from vsml.estimators.core import make_optimizer
    from vsml.estimators.es import es_ask, es_tell
    from vsml.learners.registry import build_learner
    from vsml.estimators.base import Problem
    from vsml.estimators.registry import build as build_estimator
    from vsml.training.presets import get

    cfg = get("paper-mnist")
    pairs, length = (1, 2) if smoke else (cfg.es.pairs, cfg.episode_length)
    task = task or ("random[side=4]+proj" if smoke else cfg.task)
    cfg = replace(cfg, device=str(dev), backend=backend, task=task, episode_length=length,
                  es=replace(cfg.es, pairs=pairs), data_dir=data_dir)
    try:
        fam = make_family(cfg.task, data_dir=data_dir)
        fam.prepare(("train",))
    except DatasetError as exc:
        fallback = "random+proj"
        print(f"[gpu_check] {cfg.task}: {exc}; using {fallback} (same shapes: 28x28 -> 784)", flush=True)
        cfg = replace(cfg, task=fallback)
        fam = make_family(cfg.task, data_dir=data_dir)
    kb.check_backend(cfg.backend, dev, cfg.vsml, cfg.learner)
    learner = build_learner(cfg)
    theta = torch.nn.Parameter(learner.init_theta(torch.Generator().manual_seed(0)).to(dev))
    opt = make_optimizer(theta, cfg.resolved_lr)
    est = build_estimator("es", cfg, Problem(learner, fam, seed=cfg.seed, device=dev)).inner   # the ESEstimator
    which = learner.no_grad_backend(theta.detach())

    def one(step: int) -> dict:
        t = {}
        _sync(dev)
        t0 = time.perf_counter()
        batch = fam.sample(pairs, length, derive_seed(cfg.seed, "meta-train-data", step), "train", device=dev)
        _sync(dev)
        t["sampling_s"] = time.perf_counter() - t0
        x, y = batch.x.reshape(pairs, length, -1), batch.y
        t0 = time.perf_counter()
        st = est.initial_state(pairs, x.shape[2], batch.num_classes, step, theta.dtype, dev)
        _sync(dev)
        t["states_s"] = time.perf_counter() - t0
        del st                                                        # member_losses draws them again
        th = theta.detach()
        t0 = time.perf_counter()
        pop = es_ask(th, est.cfg, step)                                # θ ± σε (ε drawn per ESConfig.noise_device)
        _sync(dev)
        t["population_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        calls0 = sum(kb.KERNEL_CALLS.values())
        losses, accs = est.member_losses(pop, x, y, batch.num_classes, step)
        _sync(dev)
        t["unroll_s"] = time.perf_counter() - t0
        t["fused_kernel_calls"] = sum(kb.KERNEL_CALLS.values()) - calls0
        del pop
        t0 = time.perf_counter()
        grad, metrics = es_tell(th, losses, est.cfg, step)
        theta.grad = grad.to(theta.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        t["update_s"] = time.perf_counter() - t0
        t["total_s"] = sum(v for k, v in t.items() if k.endswith("_s") and k != "states_s")   # unroll redraws them
        t["loss_mean"] = float(losses.mean())
        t["accuracy"] = float(accs.mean())
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()}

    warm = None if smoke else one(0)               # compiles the kernel (not the timed step)
    timed = one(1)
    members = 2 * pairs
    return {"task": cfg.task, "members": members, "pairs": pairs, "length": length, "net": "784->10"
            if not smoke else f"{fam.input_dim}->10", "backend": cfg.backend, "resolved_backend": which,
            "warmup": warm, "step": timed,
            "examples_per_s": round(members * length / timed["unroll_s"], 1),
            "goal_s": 1.5, "goal_met": (timed["total_s"] < 1.5) if not smoke else None}


# ------------------------------------------------------------------------------------------------ report


def markdown(rep: dict) -> str:
    lines = [f"# GPU check ({'SMOKE, CPU' if rep['smoke'] else rep['device_name']})", "",
             f"- device: {rep['device_name']}; torch {rep['torch']}, triton {rep['triton']}; python {rep['python']}",
             f"- wall time: {rep['seconds']:.0f} s", ""]
    py = rep.get("pytest")
    if py:
        lines += ["## pytest -m gpu", "", f"`{py.get('command', '')}`: {py.get('summary') or py.get('error')} "
                  f"(rc {py.get('returncode')}, {py.get('seconds')} s)", ""]
    mm = rep.get("matmul", {})
    if mm:
        lines += ["## matmul peak (torch.mm)", "", "| precision | TFLOP/s |", "|---|---:|"]
        lines += [f"| {k[:-7]} | {v} |" for k, v in mm.items() if k.endswith("_tflops")]
        lines += (["", f"{mm['note']}"] if mm.get("note") else []) + [""]
        if mm.get("error"):
            lines += [f"error: {mm['error']}", ""]
    b = rep.get("bench", {})
    if b:
        fp32 = mm.get("fp32_tflops")
        lines += ["## kernel bench (ES population, forward-only, N=16, M=8, 2 micro-ticks)", "",
                  "| backend | net | E | examples/s | GFLOP/s (nominal) | % fp32 peak | vs eager | timed T |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in b.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['backend']} | {r['net']} | {r['E']} | {r['error']} | | | | |")
                continue
            pk = f"{100 * r['gflops'] / (1000 * fp32):.1f}%" if fp32 else "-"
            lines.append(f"| {r['backend']} | {r['net']} | {r['E']} | {r['examples_per_s']:,} | {r['gflops']:,} | "
                         f"{pk} | {r.get('vs_eager', '-')} | {r['timed_T']} |")
        lines += [""] + [f"- {n}" for n in b.get("notes", [])] + ([""] if b.get("notes") else [])
        if b.get("error"):
            lines += [f"error: {b['error']}", ""]
    es = rep.get("es_step")
    if es:
        if "error" in es:
            lines += ["## paper-scale ES step", "", f"error: {es['error']}", ""]
        else:
            s = es["step"]
            lines += [f"## ES step through the trainer's estimator: {es['members']} members x {es['length']} "
                      f"examples, {es['net']}, {es['task']}, backend {es['backend']} -> {es['resolved_backend']}", "",
                      "| phase | seconds |", "|---|---:|"]
            lines += [f"| {k[:-2]} | {v} |" for k, v in s.items() if k.endswith("_s")]
            lines += ["", "- states: the per-pair initial-state draw alone; unroll (the members) draws them again, so "
                          "total = sampling + population + unroll + update",
                      f"- fused kernel calls in the timed step: {s['fused_kernel_calls']}; "
                          f"{es['examples_per_s']:,} member-examples/s in the unroll; loss {s['loss_mean']:.4f}",
                      f"- goal (< {es['goal_s']} s per paper-scale step on one H100): "
                      f"{'n/a (smoke)' if es['goal_met'] is None else ('met' if es['goal_met'] else 'not met')}", ""]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GPUCheckArgs:
    """Options of benchmarks/gpu_check.py (``--help``)."""

    smoke: bool = False             # tiny CPU run of every section but pytest (CI)
    out: str | None = None          # output folder (default $OUT, else gpu_check_out)
    data_dir: str | None = None     # folder with mnist/ (default $VSML_DATA_DIR; else random+proj for the ES step)
    task: str | None = None         # ES-step task (default: the paper preset's mnist+proj)
    backend: str | None = None      # ES-step backend (default auto: the fused kernel on CUDA; --smoke: triton, interpreter)
    episodes: str | None = None     # bench E list (default 1,16,256,2048)
    nets: str | None = None         # bench nets (default 784-10,784-32-10)
    steps: int | None = None        # timed examples per bench cell (default 20)
    budget: float | None = None     # seconds per bench cell (default 6)
    pytest_timeout: float = 180.0   # seconds for the pytest -m gpu section
    deadline: float = 420.0         # seconds after the start past which no further bench cell starts (8-minute budget)
    skip: str = ""                  # comma list of sections to skip: pytest,matmul,es,bench


def main(argv: list[str] | None = None) -> int:
    try:
        from vsml.training.cli import parse
    except ImportError as exc:     # the GPU image has no tyro: carry its wheels (BENCHMARKS.md, "The GPU check")
        print(f"[gpu_check] cannot import the project's CLI ({exc}); carry the wheels of tyro, docstring-parser "
              f"and typeguard (BENCHMARKS.md, 'The GPU check')", file=sys.stderr)
        return 2
    a = parse(GPUCheckArgs, argv, prog="gpu_check.py", description=__doc__)
    a = replace(a, out=a.out or os.environ.get("OUT") or "gpu_check_out",
                data_dir=a.data_dir or os.environ.get("VSML_DATA_DIR"))
    _setup_env(a.smoke)
    import torch
    t_start = time.perf_counter()
    gpu = torch.cuda.is_available() and not a.smoke
    dev = torch.device("cuda" if gpu else "cpu")
    if not gpu and not a.smoke:
        print("[gpu_check] no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    skip = {s.strip() for s in a.skip.split(",") if s.strip()} | ({"pytest"} if a.smoke else set())
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    rep = {"smoke": a.smoke, "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if gpu
           else (platform.processor() or platform.machine()), "torch": torch.__version__, "triton": tv,
           "python": platform.python_version(), "interpreter": os.environ.get("TRITON_INTERPRET", "0")}
    episodes = [int(v) for v in (a.episodes or ("1,2" if a.smoke else "1,16,256,2048")).split(",")]
    nets = (a.nets or ("16-4" if a.smoke else "784-10,784-32-10")).split(",")
    backend = a.backend or ("triton" if a.smoke and os.environ.get("TRITON_INTERPRET") == "1" else "auto")
    steps = a.steps or (2 if a.smoke else 20)
    budget = a.budget if a.budget is not None else (30.0 if a.smoke else 6.0)
    sections = [("pytest", lambda: run_pytest(a.pytest_timeout)),
                ("matmul", lambda: matmul_peaks(dev, a.smoke)),
                ("es_step", lambda: es_step(dev, a.smoke, a.data_dir, a.task, backend)),
                ("bench", lambda: bench(dev, a.smoke, episodes, nets, steps, budget, t_start + a.deadline))]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in sections:
        if name in skip or (name == "es_step" and "es" in skip):
            continue
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            rep[name] = fn()
        except Exception as exc:  # noqa: BLE001 - report it, run the next section
            rep[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        rep["seconds"] = time.perf_counter() - t_start
        (out / "gpu_check.json").write_text(json.dumps(rep, indent=2))   # partial results survive a kill
    rep["seconds"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=2))
    md = markdown(rep)
    (out / "gpu_check.md").write_text(md)
    print(md)
    failed = [n for n, _ in sections if isinstance(rep.get(n), dict) and "error" in rep[n]]
    if rep.get("pytest", {}).get("returncode") not in (None, 0, 5):
        failed.append("pytest")
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
          + (f"; FAILED sections: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
