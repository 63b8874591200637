"""Meta-test a trained learner online on unseen tasks, next to baselines.

    python eval.py --checkpoint runs/default                          # a run directory
    python eval.py --checkpoint runs/default/theta.safetensors --tasks "digits;sum" --length 2000
    python eval.py --checkpoint runs/cpu-mnist --tasks "fashion_mnist+resize14" --data_dir ../shared/datasets
    python eval.py --baselines sgd,adam --tasks digits                # baselines only

Writes <out>/results.json (per task and learner: online accuracy, final accuracy, loss, the per-step
curve with its 95% band) and one PNG learning-curve plot per task, and prints a table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vsml.evaluation.load import load_learner


@dataclass(frozen=True)
class EvalArgs:
    """Meta-test options (every flag: ``python eval.py --help``)."""

    checkpoint: str | None = None   # run directory, checkpoint .pt, θ .safetensors, pretrained:NAME (see --list_pretrained) or analytic:sgd[alpha=..] / analytic:backprop[alpha=..,hidden_alpha=..] (online SGD / backprop written into θ)
    list_pretrained: bool = False   # list the shipped learners and exit
    tasks: str | None = None        # task specs separated by ';' (default: the run's eval tasks)
    baselines: str = "sgd,adam"     # comma-separated baselines ('' for none)
    episodes: int | None = None     # episodes per task (default 16; a badger run: its eval.episodes)
    length: int | None = None       # examples per episode (T) (default 2000; a badger run: its eval.length inner steps)
    seed: int = 22
    smooth: int = 25                # trailing window (steps) each episode's curve is averaged over before the band
    out: str | None = None          # output folder (default <run>/eval or eval_out)
    data_dir: str | None = None     # folder with the dataset files (or set VSML_DATA_DIR)
    device: str = "cpu"
    # no-grad path of a VSML learner (kernels/backend.py): auto (default: the fused Triton kernel on CUDA, the
    # C++ kernel on CPU), torch (eager), compile, cpu, triton; a forced one that cannot run is a one-line error
    backend: Literal["auto", "torch", "compile", "cpu", "triton"] | None = None
    no_compile: bool = False        # eager PyTorch path (the same as --backend torch)
    no_plot: bool = False

    def __post_init__(self):
        if (self.episodes is not None and self.episodes < 1) or (self.length is not None and self.length < 1):
            raise ValueError(f"--episodes and --length must be >= 1, got {self.episodes} and {self.length}")
        if self.no_compile and self.backend not in (None, "torch"):
            raise ValueError(f"--no-compile means --backend torch; it contradicts --backend {self.backend}")


def main(argv: list[str] | None = None) -> int:
    from vsml.training.cli import fail, parse

    args = parse(EvalArgs, argv, prog="eval.py", description=__doc__)
    if args.list_pretrained:
        from vsml.pretrained import HERE, available
        for name in available():
            print(f"pretrained:{name}    (model card: {HERE / (name + '.md')})")
        return 0
    from tqdm.auto import tqdm

    from vsml.evaluation.evaluate import FrozenLearner
    from vsml.evaluation.metrics import SavedEval, metric_for
    from vsml.learners import registry
    from vsml.training.checkpoint import CheckpointError
    from vsml.training.preflight import check_device
    from vsml.training.threads import apply_thread_policy

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    apply_thread_policy()
    backend = args.backend or ("torch" if args.no_compile else "auto")
    learners, cfg_dict = [], {}
    try:
        check_device(args.device)
        if args.checkpoint:
            say(f"[eval] loading {args.checkpoint} ...")
            name, learner, theta, cfg_dict = load_learner(args.checkpoint, args.device, backend=backend)
            from kernels.backend import check_backend
            check_backend(backend, args.device, getattr(learner, "cfg", None), learner=name)
            if hasattr(learner, "no_grad_backend"):
                print(f"[eval] {name}: backend {backend} -> {learner.no_grad_backend(theta)} on {args.device}")
            learners.append(FrozenLearner(name, learner, theta))
        for b in [s.strip() for s in args.baselines.split(",") if s.strip()]:
            bl = registry.build(b)
            learners.append(FrozenLearner(b, bl, bl.init_theta()))
    except (CheckpointError, KeyError, ValueError) as exc:     # ValueError covers ConfigError / BackendError
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    if not learners:
        fail("eval.py", "nothing to evaluate: pass --checkpoint and/or --baselines")
    # the first learner's metric (its registry entry) runs the meta-test, writes and prints its own report
    metric = metric_for(learners[0].name)
    req = SavedEval(checkpoint=args.checkpoint, tasks=args.tasks, episodes=args.episodes, length=args.length,
                    seed=args.seed, smooth=args.smooth, out=args.out, data_dir=args.data_dir, plot=not args.no_plot)
    from tasks import DatasetError
    try:
        return metric.evaluate_saved(learners, cfg_dict, req, progress=say)
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
